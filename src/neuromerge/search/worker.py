"""Command-line worker: ``python -m neuromerge.search.worker URL STUDY package.module:function [--fingerprint F]``.

Runs :func:`~.distributed.run_worker` with the evaluate callable named ``module:function`` (importable on the
worker's machine). Start as many as wanted, on any machine that reaches the database. Exit code 2 with a one-line
message on bad input (unknown callable, unreachable database, mismatching study).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError, NeuromergeError
from .distributed import run_worker


def load_callable(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` → the function; :class:`ConfigError` when it cannot be imported."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"search worker: expected module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"search worker: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"search worker: {spec!r} is not callable")
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neuromerge.search.worker", description=__doc__.splitlines()[0])
    p.add_argument("storage_url", help="SQLAlchemy URL of the study's database, e.g. postgresql://user@host/db")
    p.add_argument("study_name")
    p.add_argument("evaluate", help="module:function computing f1 of a Configuration")
    p.add_argument("--fingerprint", default=None, help="refuse a study recorded for another model")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between queue polls")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the study to appear")
    p.add_argument("--max-idle", type=float, default=None, help="exit after this many seconds without work")
    a = p.parse_args(argv)
    try:
        n = run_worker(a.storage_url, a.study_name, load_callable(a.evaluate), fingerprint=a.fingerprint,
                       poll_s=a.poll, wait_s=a.wait, max_idle_s=a.max_idle)
    except NeuromergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
