"""Hugging Face model ids (``org/name``) resolved to a local snapshot folder.

The local cache follows ``huggingface_hub``'s layout
(https://huggingface.co/docs/huggingface_hub/guides/manage-cache): ``<cache>/models--org--name/refs/main``
holds a commit hash and ``<cache>/models--org--name/snapshots/<hash>/`` the files. The cache folder is
``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
Nothing is downloaded unless asked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from neuromerge.errors import CheckpointError

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

#: files fetched by ``--allow-download``: weights, configs, tokenizer and processor files
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def looks_like_hf_id(text: str) -> bool:
    """``org/name`` with exactly one slash, no leading dot and no path-like prefix."""
    return bool(_HF_ID.match(text)) and ".." not in text


def hf_cache_dir() -> Path:
    """The local hub cache folder (see the module docstring for the environment variables read)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a ref name or a commit hash), or None.

    Without ``refs/<revision>`` a lone snapshot folder is used; several snapshots and no ref is ambiguous →
    None.
    """
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        return candidate if candidate.is_dir() else None
    if (snapshots / revision).is_dir():
        return snapshots / revision
    found = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def resolve_hf_id(repo_id: str, *, allow_download: bool = False) -> Path:
    """Local folder for ``repo_id``: the cached snapshot, else a download when ``allow_download``.

    Raises :class:`CheckpointError` when the model is not cached and downloads are not allowed.
    """
    local = cached_snapshot(repo_id)
    if local is not None:
        return local
    if not allow_download:
        raise CheckpointError(
            f"{repo_id} is not a local path and not in the local HF cache ({hf_cache_dir()}); "
            "pass --allow-download to fetch it"
        )
    from huggingface_hub import snapshot_download  # lazy: only this path needs the network

    return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
