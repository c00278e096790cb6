"""``neuromerge mergekit-yaml CONFIG OUT_PATH`` (also installed as ``neuromerge-yaml``): mergekit's ``mergekit-yaml``
command line on neuromerge's engine, so that a mergekit user's scripts run with one word changed.

mergekit 0.1.5's flags (``mergekit/options.py``) are honoured where they mean something here and otherwise accepted
with a one-line note saying why they change nothing (:data:`IGNORED_FLAGS`); an unknown flag stays an error.

| mergekit flag | here |
|---|---|
| ``--out-shard-size N`` (parameters: ``5B``, ``500M``) | at most N parameters per shard (``output.shard_params``) |
| ``--copy-tokenizer / --no-copy-tokenizer`` | the base's tokenizer files copied, or not (``output.copy_tokenizer``) |
| ``--cuda``, ``--device D`` | ``--device cuda`` / ``D`` |
| ``--random-seed N`` | the config's ``seed`` |
| ``--num-threads / -j N`` | ``--threads N`` |
| ``--quiet`` | no progress bars |
| the others | accepted, with a note (:data:`IGNORED_FLAGS`) |
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import ConfigError, NeuromergeError

#: mergekit flags that change nothing here, with the reason shown in the note (bool flags also as ``--no-…``)
IGNORED_FLAGS: dict[str, str] = {
    "--allow-crimes": "neuromerge checks tensor names and shapes itself and refuses what it cannot merge",
    "--lazy-unpickle": "weights are always read lazily, one tensor at a time",
    "--low-cpu-memory": "memory is bounded by streaming row chunks (--chunk-mb) whatever the device",
    "--read-to-gpu": "tensors are read on the CPU and moved to --device chunk by chunk",
    "--multi-gpu": "one device per run",
    "--gpu-rich": "one device per run (use --cuda)",
    "--async-write": "shards are written by the merge's worker threads already",
    "--clone-tensors": "every output tensor is written from its own buffer",
    "--trust-remote-code": "no model code is ever executed: only weight files and config.json are read",
    "--write-model-card": "README.md and provenance.json are always written",
    "--safe-serialization": "the output is always safetensors",
    "--unsafe-truncate-embeddings": "embeddings are never truncated (vocabularies are compared instead)",
    "-v": "progress bars and warnings are always shown (use --quiet to hide the bars)",
    "--verbose": "progress bars and warnings are always shown (use --quiet to hide the bars)",
}
#: ignored flags that take a value
IGNORED_VALUE_FLAGS: dict[str, str] = {
    "--transformers-cache": "models are read from their paths or the local HF cache (HF_HOME)",
    "--lora-merge-cache": "LoRA adapters are applied one module at a time, nothing is cached",
    "--lora-merge-dtype": "LoRA products are computed in float32",
    "--write-threads": "shards are written by the merge's worker threads (--num-threads)",
}


def parse_kmb(value: str) -> int:
    """mergekit's size syntax: ``1000``, ``5k``, ``500M``, ``5B`` (powers of 1000)."""
    text = value.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}
    try:
        number = int(text[:-1]) * scale[text[-1].lower()] if text[-1:].lower() in scale else int(text)
    except ValueError:
        raise ConfigError(f"--out-shard-size {value!r}: expected an integer with an optional k/M/B suffix") from None
    if number < 1:
        raise ConfigError(f"--out-shard-size {value!r}: must be at least 1")
    return number


def ignored_flag_notes(args: list[str]) -> list[str]:
    """One note per ignored mergekit flag in ``args`` (what typer left over); an unknown argument is an error."""
    notes, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, _, inline = arg.partition("=")
        positive = "--" + flag[5:] if flag.startswith("--no-") else flag
        if flag in IGNORED_VALUE_FLAGS:
            if not inline:
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag} needs a value")
                i += 1
            notes.append(f"{flag} is accepted and ignored: {IGNORED_VALUE_FLAGS[flag]}")
        elif positive in IGNORED_FLAGS and not inline:
            notes.append(f"{flag} is accepted and ignored: {IGNORED_FLAGS[positive]}")
        elif flag.startswith("-v") and set(flag[1:]) == {"v"}:
            notes.append(f"{flag} is accepted and ignored: {IGNORED_FLAGS['-v']}")
        else:
            known = ", ".join(sorted([*IGNORED_FLAGS, *IGNORED_VALUE_FLAGS]))
            raise ConfigError(f"unknown option {arg!r} (mergekit-yaml options accepted here: --out-shard-size, "
                              f"--copy-tokenizer, --cuda, --device, --random-seed, --num-threads, --quiet, {known})")
        i += 1
    return notes


def mergekit_yaml(
    ctx: typer.Context,
    config_file: Annotated[Path, typer.Argument(help="YAML merge config (mergekit's shape)")],
    out_path: Annotated[Path, typer.Argument(help="output folder")],
    out_shard_size: Annotated[str | None, typer.Option(
        "--out-shard-size", help="parameters per output shard (5B, 500M, …; mergekit's unit)")] = None,
    copy_tokenizer: Annotated[bool, typer.Option(
        "--copy-tokenizer/--no-copy-tokenizer", help="copy the base's tokenizer files to the output")] = True,
    cuda: Annotated[bool, typer.Option("--cuda/--no-cuda", help="compute on the GPU (= --device cuda)")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="seed of the random methods")] = None,
    num_threads: Annotated[int | None, typer.Option("--num-threads", "-j", help="worker threads", min=1)] = None,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", help="no progress bars")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder (never an input)")]
    = False,
) -> None:
    """mergekit-yaml compatible: merge CONFIG_FILE into OUT_PATH (mergekit's flags accepted; see
    `neuromerge mergekit-yaml --help` and docs/peers.md)."""
    from .config import load_config
    from .engine.run import merge as run_merge
    from .io.writer import install_signal_cleanup

    try:
        notes = ignored_flag_notes(list(ctx.args))
        cfg = load_config(config_file)
        output = cfg.output.model_copy(update={
            "copy_tokenizer": copy_tokenizer,
            **({"shard_params": parse_kmb(out_shard_size)} if out_shard_size is not None else {}),
        })
        cfg = cfg.model_copy(update={"output": output, **({"seed": random_seed} if random_seed is not None else {})})
        install_signal_cleanup()
        result = run_merge(cfg, out_path, threads=num_threads, force=force,
                           device=device or ("cuda" if cuda else "cpu"), progress=False if quiet else None,
                           inputs=[config_file])
    except NeuromergeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for line in [*notes, *result.report["warnings"]]:
        typer.echo(f"warning: {line}" if line not in notes else f"note: {line}", err=True)
    rep = result.report
    typer.echo(f"merged {rep['summary']['merged_tensors']} tensors with {rep['summary']['method']} into {out_path} "
               f"in {rep['timings_s']['total']:.1f} s")


#: the command's settings: mergekit's ignored flags reach :func:`ignored_flag_notes` through ``ctx.args``
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def main() -> None:
    """The ``neuromerge-yaml`` console script: ``neuromerge mergekit-yaml`` as its own command."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings=CONTEXT_SETTINGS)(mergekit_yaml)
    app()
