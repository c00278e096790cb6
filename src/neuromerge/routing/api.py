"""Python API of ``neuromerge route build``: :func:`route_build`.

``route_build(method, config, out)`` runs the same builder as the command (:mod:`.cli`'s registry: MIN-Merging,
Twin-Merging, EMR, WEMoE, MERGE) on a config given as a YAML path (relative paths resolve against its folder) or a
mapping (relative paths resolve against the working directory), and returns the routed folder. What the command
prints as ``warning:`` lines — an output folder that overlaps an input, a router near or below chance on a task
(:func:`~neuromerge.routing.router_fit.near_chance`) — is issued as Python warnings
(:class:`RouterNearChanceWarning` for the router). Errors are :class:`~neuromerge.errors.NeuromergeError`\\ s whose
message holds one problem per line; nothing is written then.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import NeuromergeError


class RouterNearChanceWarning(UserWarning):
    """The router's validation accuracy on a task (or over all tasks) is near or below chance."""


def route_build(method: str, config: str | os.PathLike[str] | Mapping[str, Any], out: str | os.PathLike[str], *,
                force: bool = False, threads: int | None = None, allow_download: bool = False) -> Path:
    """Build the routed model ``method`` (``min_merging``, ``twin``, ``emr``, ``wemoe``, ``merge``) that ``config``
    describes into the folder ``out`` and return its path.

    ``config``: a YAML file or a mapping with the builder's keys (docs/min_merging.md: ``base``, ``tasks``,
    ``experts``, ``variant``, ``params``…; a ``method:`` key, if any, must name ``method``). ``force`` replaces an
    existing ``out``; ``threads`` sets torch's intra-op threads for the build (restored afterwards);
    ``allow_download`` lets a base given as a Hugging Face id missing from the local cache be downloaded.
    """
    import torch

    from .cli import _read_yaml, call_builder, route_inputs
    from .folder import read_manifest
    from .router_fit import near_chance

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise NeuromergeError(f"threads must be a positive integer, got {threads!r}")
    source: Path | None = None
    if isinstance(config, Mapping):
        params = dict(config)
    else:
        source = Path(config)
        params = _read_yaml(source)
    named = params.pop("method", method)
    if named != method:
        raise NeuromergeError(f"the config's method {named!r} differs from {method!r}")
    out = Path(out)
    from ..io.output_guard import check_output

    for line in check_output(out, route_inputs(method, source, params)):
        warnings.warn(line, UserWarning, stacklevel=2)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        path = call_builder(method, params, out, force=force, source=source, allow_download=allow_download)
    finally:
        torch.set_num_threads(previous)
    try:
        validation = read_manifest(path).get("router_validation")
    except NeuromergeError:  # a registered builder that writes no routed-model manifest
        validation = None
    for line in near_chance(validation):
        warnings.warn(line, RouterNearChanceWarning, stacklevel=2)
    return Path(path)


__all__ = ["RouterNearChanceWarning", "route_build"]
