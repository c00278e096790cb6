"""docs/engine.md "Refused inputs" is checked: every row of the table runs its registered case.

For every row: the command exits with the row's code (2), prints exactly one ``error:`` line (one per problem for
a case registered with ``errors=N``) that holds every backquoted substring of the row's message column, and writes
nothing (the case's folder — the working directory of the command — is hashed before and after). ``merge`` rows
whose ``--dry-run`` column says *refuses* are run again with ``--dry-run``, which must refuse them the same way
(issue #16, item 11); *run only* marks faults that only exist while the merge computes or writes.

Adding a row: one line in the table, and one function here decorated with ``@case("the-row-key")`` that builds
the bad input in the folder it is given and returns the CLI arguments. Every row needs a case and every case a
row.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neuromerge.cli import app
from tests.helpers import perturb, tiny_model

DOC = Path(__file__).parents[2] / "docs" / "engine.md"
SECTION = "## Refused inputs"
COLUMNS = ("key", "input / fault", "command", "message contains", "exit", "--dry-run")
runner = CliRunner()


# ----------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    key: str
    command: str
    messages: tuple[str, ...]
    exit_code: int
    dry_run: str  # "refuses", "run only" or "-" (not a merge row)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _ticked(cell: str) -> list[str]:
    """The backquoted parts of a cell (````x```` and ```x```), with ``\\|`` unescaped."""
    return [m.group(2).strip().replace("\\|", "|") for m in re.finditer(r"(``?)(.+?)\1", cell)]


def parse_table(text: str) -> list[Row]:
    """The rows of the table under ``SECTION`` in ``text``."""
    start = text.index(SECTION)
    lines = text[start:].splitlines()[1:]
    table = []
    for line in lines:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
    header = tuple(c.strip("`").lower() for c in _cells(table[0]))
    assert header == COLUMNS, f"{DOC.name}: the refusal table's columns are {header}, expected {COLUMNS}"
    rows = []
    for line in table[2:]:
        cells = _cells(line)
        assert len(cells) == len(COLUMNS), f"malformed row: {line}"
        key = _ticked(cells[0])[0]
        command = _ticked(cells[2])[0] if _ticked(cells[2]) else cells[2]
        messages = tuple(_ticked(cells[3]))
        assert messages, f"row {key}: no backquoted message substring"
        rows.append(Row(key, command.split()[0], messages, int(cells[4]), cells[5].strip("*_ ").lower()))
    return rows


ROWS = parse_table(DOC.read_text(encoding="utf-8"))
BY_KEY = {r.key: r for r in ROWS}


# ----------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    build: Callable[[Path], list[str]]
    errors: int = 1


CASES: dict[str, Case] = {}


def case(key: str, errors: int = 1) -> Callable[[Callable[[Path], list[str]]], Callable[[Path], list[str]]]:
    """Register ``fn(folder) -> CLI args`` as the case of the table row ``key``."""

    def register(fn: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        assert key not in CASES, f"two cases for {key}"
        CASES[key] = Case(fn, errors)
        return fn

    return register


_TEMPLATE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _template(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A tiny Llama base and two experts, made once; each case copies them (:func:`family`)."""
    root = tmp_path_factory.mktemp("refusal-family")
    tiny_model("llama").save_pretrained(root / "base")
    for i in range(2):
        m = tiny_model("llama")
        perturb(m, seed=100 + i)
        m.save_pretrained(root / f"expert{i}")
    _TEMPLATE["root"] = root


def family(d: Path) -> tuple[Path, list[Path]]:
    """A fresh copy of the tiny family under ``d``: (base, [expert0, expert1])."""
    root = _TEMPLATE["root"]
    for name in ("base", "expert0", "expert1"):
        if not (d / name).exists():
            shutil.copytree(root / name, d / name)
    return d / "base", [d / "expert0", d / "expert1"]


def config(d: Path, *, name: str = "merge.yaml", **fields: object) -> Path:
    """A merge config of the family (TIES by default) with ``fields`` set (None removes a key)."""
    base, experts = family(d)
    cfg: dict[str, object] = {"merge_method": "ties", "base_model": str(base),
                              "models": [{"model": str(e)} for e in experts]}
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path = d / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def merge(d: Path, cfg: Path, *extra: str) -> list[str]:
    return ["merge", str(cfg), "-o", str(d / "out"), "--no-progress", *extra]


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def with_models(d: Path, *models: Path | str, **fields: object) -> Path:
    return config(d, models=[{"model": str(m)} for m in models], **fields)


# --- merge: the config
@case("config-missing")
def _(d: Path) -> list[str]:
    return merge(d, d / "nope.yaml")


@case("invalid-yaml")
def _(d: Path) -> list[str]:
    (d / "bad.yaml").write_text("merge_method: [unclosed\n")
    return merge(d, d / "bad.yaml")


@case("config-not-mapping")
def _(d: Path) -> list[str]:
    (d / "list.yaml").write_text("- ties\n")
    return merge(d, d / "list.yaml")


@case("no-models")
def _(d: Path) -> list[str]:
    return merge(d, config(d, models=[]))


@case("unknown-key")
def _(d: Path) -> list[str]:
    return merge(d, config(d, dtpye="float32"))


@case("model-entry-unknown-key")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    return merge(d, config(d, models=[{"model": str(experts[0]), "weight": 0.5}, {"model": str(experts[1])}]))


def sliced(d: Path, *ranges: list[tuple[int, int, int]], **fields: object) -> Path:
    """A ``slices`` config of the family: each argument is a slice, a list of (model, start, end) with model 0 = the
    base, 1 and 2 = the experts."""
    base, experts = family(d)
    paths = [base, *experts]
    slices = [{"sources": [{"model": str(paths[m]), "layer_range": [a, b]} for m, a, b in sl]} for sl in ranges]
    return config(d, **{"models": None, "base_model": None, "merge_method": "passthrough", "slices": slices,
                        **fields})


@case("models-and-slices")
def _(d: Path) -> list[str]:
    base, _ = family(d)
    return merge(d, config(d, slices=[{"sources": [{"model": str(base), "layer_range": [0, 2]}]}]))


@case("slice-out-of-bounds")
def _(d: Path) -> list[str]:
    return merge(d, sliced(d, [(0, 0, 2)], [(1, 1, 5)]))


@case("slice-lengths-differ")
def _(d: Path) -> list[str]:
    return merge(d, sliced(d, [(1, 0, 2), (2, 1, 2)], merge_method="linear"))


@case("slice-bad-range")
def _(d: Path) -> list[str]:
    return merge(d, sliced(d, [(1, 1, 1)]))


@case("slice-model-missing")
def _(d: Path) -> list[str]:
    cfg = sliced(d, [(1, 0, 2)])
    cfg.write_text(cfg.read_text().replace(str(d / "expert0"), str(d / "nowhere")))
    return merge(d, cfg)


@case("slice-base-not-a-source")
def _(d: Path) -> list[str]:
    base, _ = family(d)
    return merge(d, sliced(d, [(1, 0, 2), (2, 0, 2)], merge_method="ties", base_model=str(base)))


@case("slice-model-count")
def _(d: Path) -> list[str]:
    return merge(d, sliced(d, [(1, 0, 2), (2, 0, 2)]))


@case("slices-lora-output")
def _(d: Path) -> list[str]:
    return merge(d, sliced(d, [(1, 0, 2)], output={"format": "lora", "rank": 4}))


@case("tokenizer-source-and-block")
def _(d: Path) -> list[str]:
    return merge(d, config(d, tokenizer_source="union", tokenizer={"source": "base"}))


@case("unknown-chat-template")
def _(d: Path) -> list[str]:
    return merge(d, config(d, chat_template="nosuch"))


@case("tokenizer-lora-output")
def _(d: Path) -> list[str]:
    return merge(d, config(d, tokenizer_source="union", output={"format": "lora", "rank": 4}))


@case("tokenizer-without-files")
def _(d: Path) -> list[str]:
    return merge(d, config(d, tokenizer_source="union"))


@case("token-without-source")
def _(d: Path) -> list[str]:
    from tests.vocab_models import make_vocab_family

    fam = make_vocab_family(d / "vocab")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
           "models": [{"model": str(fam["expert0"])}, {"model": str(fam["expert1"])}],
           "tokenizer": {"source": "union", "tokens": {"x1": {"force": False}}}}
    (d / "merge.yaml").write_text(yaml.safe_dump(cfg))
    return merge(d, d / "merge.yaml")


@case("bad-dtype")
def _(d: Path) -> list[str]:
    return merge(d, config(d, dtype="float8"))


@case("bad-exclude-regex")
def _(d: Path) -> list[str]:
    return merge(d, config(d, exclude=["(unclosed"]))


@case("bad-filter-regex")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"density": [{"filter": "[a-", "value": 0.5}]}))


@case("bad-shard-size")
def _(d: Path) -> list[str]:
    return merge(d, config(d, shard_size="big"))


@case("bad-vocab-mode")
def _(d: Path) -> list[str]:
    return merge(d, config(d, vocab="union"))


# --- merge: the method and its parameters
@case("unknown-method")
def _(d: Path) -> list[str]:
    return merge(d, config(d, merge_method="tiess"))


@case("data-aware-method")
def _(d: Path) -> list[str]:
    return merge(d, config(d, merge_method="fisher"))


@case("wrong-model-count")
def _(d: Path) -> list[str]:
    base, experts = family(d)
    return merge(d, with_models(d, *experts, base, merge_method="slerp", base_model=None))


@case("needs-base")
def _(d: Path) -> list[str]:
    return merge(d, config(d, base_model=None))


@case("too-few-besides-base")
def _(d: Path) -> list[str]:
    base, experts = family(d)
    return merge(d, with_models(d, base, experts[0], merge_method="model_stock"))


@case("unknown-parameter")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"densty": 0.2}))


@case("global-parameter-per-model")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    models = [{"model": str(experts[0]), "parameters": {"lambda": 0.5}}, {"model": str(experts[1])}]
    return merge(d, config(d, models=models))


@case("alias-and-name")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"lambda": 0.5, "lam": 0.7}))


@case("out-of-range-parameter")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"density": 1.5}))


@case("out-of-range-gradient")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"density": [0.5, -0.1]}))


@case("out-of-range-filter-value")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"density": [{"filter": "mlp", "value": 2.0}, {"value": 0.2}]}))


@case("out-of-range-model-parameter")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    return merge(d, config(d, models=[{"model": str(experts[0]), "parameters": {"density": 0}},
                                      {"model": str(experts[1])}]))


@case("wrong-parameter-type")
def _(d: Path) -> list[str]:
    return merge(d, config(d, parameters={"scope": "everywhere"}))


@case("linear-weights-sum-to-zero")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    return merge(d, config(d, merge_method="linear", models=[
        {"model": str(experts[0]), "parameters": {"weight": 1.0}},
        {"model": str(experts[1]), "parameters": {"weight": -1.0}}]))


@case("method-output-nonfinite")
def _(d: Path) -> list[str]:
    # each factor is finite in float32, their product is not
    return merge(d, config(d, merge_method="task_arithmetic", parameters={"lambda": 1e30, "weight": 1e30}))


# --- merge: the input files
@case("model-missing")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    return merge(d, with_models(d, experts[0], d / "nope"))


@case("not-a-weights-file")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "notes.txt").write_text("hello")
    return merge(d, with_models(d, experts[0], d / "notes.txt"))


@case("folder-without-weights")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "empty").mkdir()
    return merge(d, with_models(d, experts[0], d / "empty"))


@case("hf-id-not-cached")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "hf-home").mkdir()
    return merge(d, with_models(d, experts[0], "no-such-org/no-such-model"))


@case("config-json-unparsable")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (experts[1] / "config.json").write_text("{not json")
    return merge(d, config(d))


@case("truncated-shard")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    f = experts[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return merge(d, config(d))


@case("corrupt-header")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (experts[0] / "model.safetensors").unlink()
    raw = b"{not json at all"
    (experts[0] / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return merge(d, config(d))


@case("unsupported-tensor-dtype")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (experts[0] / "model.safetensors").unlink()
    raw_safetensors(experts[0] / "model.safetensors",
                    {"lm_head.weight": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    return merge(d, config(d))


@case("missing-shard")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (experts[0] / "model.safetensors").rename(experts[0] / "model-00001-of-00002.safetensors")
    names = load_file(experts[0] / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (experts[0] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return merge(d, config(d))


@case("quantized-config")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    cfg = json.loads((experts[0] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (experts[0] / "config.json").write_text(json.dumps(cfg))
    return merge(d, config(d))


@case("quantized-tensor")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    edit_weights(experts[0], lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"].to(torch.int8)}))
    return merge(d, config(d))


@case("gguf")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    return merge(d, with_models(d, d / "m.gguf", experts[1]))


class _Evil:
    def __reduce__(self):  # pragma: no cover - never unpickled
        return (print, ("pwned",))


@case("pickled-code")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    bad = d / "binmodel"
    bad.mkdir()
    shutil.copy(experts[0] / "config.json", bad / "config.json")
    torch.save({"model.norm.weight": _Evil()}, bad / "pytorch_model.bin")
    return merge(d, with_models(d, bad, experts[1]))


@case("lora-without-base")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                                    "target_modules": ["q_proj"]}))
    return merge(d, with_models(d, d / "adapter", experts[1], merge_method="linear", base_model=None))


@case("unsupported-peft-type")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    return merge(d, with_models(d, d / "adapter", experts[1]))


# --- merge: the pool's compatibility
@case("missing-tensor")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    edit_weights(experts[1], lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    return merge(d, config(d))


@case("shape-mismatch")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    edit_weights(experts[0], lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 31)}))
    return merge(d, config(d))


@case("non-floating-tensor")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    # complex: an integer `.weight` would be refused as packed quantized weights (row quantized-tensor)
    edit_weights(experts[0], lambda sd: sd.update({"model.norm.weight": torch.ones(32, dtype=torch.complex64)}))
    return merge(d, config(d))


@case("vocab-mismatch")
def _(d: Path) -> list[str]:
    _base, experts = family(d)
    edit_weights(experts[0], lambda sd: sd.update(
        {"model.embed_tokens.weight": torch.zeros(100, 32), "lm_head.weight": torch.zeros(100, 32)}))
    return merge(d, config(d, merge_method="task_arithmetic"))


@case("nan-in-expert")
def _(d: Path) -> list[str]:
    _base, experts = family(d)

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")

    edit_weights(experts[1], edit)
    return merge(d, config(d, merge_method="task_arithmetic"))


@case("inf-in-base")
def _(d: Path) -> list[str]:
    base, _experts = family(d)

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.norm.weight"][0] = float("inf")

    edit_weights(base, edit)
    return merge(d, config(d, merge_method="linear"))


# --- merge: the command line and the output
@case("output-exists")
def _(d: Path) -> list[str]:
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("precious")
    return merge(d, config(d))


@case("bad-output-format")
def _(d: Path) -> list[str]:
    return merge(d, config(d), "--output-format", "gguf")


@case("bad-rank")
def _(d: Path) -> list[str]:
    return merge(d, config(d), "--rank", "sixteen")


@case("rank-below-one")
def _(d: Path) -> list[str]:
    return merge(d, config(d, output={"format": "lora", "rank": 0}))


@case("rank-concat-nonlinear")
def _(d: Path) -> list[str]:
    return merge(d, config(d), "--rank", "concat")


@case("lora-output-of-full-models")
def _(d: Path) -> list[str]:
    return merge(d, config(d), "--rank", "4")


@case("unknown-device")
def _(d: Path) -> list[str]:
    return merge(d, config(d), "--device", "tpu")


# --- other commands
@case("methods-unknown")
def _(d: Path) -> list[str]:
    return ["methods", "tiess"]


@case("route-unknown-builder")
def _(d: Path) -> list[str]:
    return ["route", "build", "no_such_router", "-o", str(d / "routed")]


@case("route-config-missing")
def _(d: Path) -> list[str]:
    return ["route", "build", str(d / "nope.yaml"), "-o", str(d / "routed")]


@case("route-config-not-mapping")
def _(d: Path) -> list[str]:
    (d / "r.yaml").write_text("- twin\n")
    return ["route", "build", str(d / "r.yaml"), "-o", str(d / "routed")]


@case("route-config-without-method")
def _(d: Path) -> list[str]:
    (d / "r.yaml").write_text("experts: []\n")
    return ["route", "build", str(d / "r.yaml"), "-o", str(d / "routed")]


@case("route-method-differs")
def _(d: Path) -> list[str]:
    (d / "r.yaml").write_text("method: emr\n")
    return ["route", "build", "twin", "--config", str(d / "r.yaml"), "-o", str(d / "routed")]


@case("route-config-twice")
def _(d: Path) -> list[str]:
    (d / "r.yaml").write_text("method: twin\n")
    return ["route", "build", str(d / "r.yaml"), "--config", str(d / "r.yaml"), "-o", str(d / "routed")]


@case("route-info-not-routed")
def _(d: Path) -> list[str]:
    (d / "folder").mkdir()
    return ["route", "info", str(d / "folder")]


@case("route-info-bad-manifest")
def _(d: Path) -> list[str]:
    (d / "folder").mkdir()
    (d / "folder" / "manifest.json").write_text("{broken")
    return ["route", "info", str(d / "folder")]


@case("inspect-nothing-to-inspect")
def _(d: Path) -> list[str]:
    return ["inspect", "-o", str(d / "insp"), "--no-progress"]


@case("inspect-bad-density")
def _(d: Path) -> list[str]:
    return ["inspect", str(config(d)), "--density", "2", "-o", str(d / "insp"), "--no-progress"]


@case("inspect-needs-base")
def _(d: Path) -> list[str]:
    return ["inspect", str(config(d, merge_method="linear", base_model=None)), "-o", str(d / "insp"),
            "--no-progress"]


@case("search-config-missing")
def _(d: Path) -> list[str]:
    return ["search", str(d / "nope.yaml"), "-o", str(d / "search")]


@case("search-config-not-mapping")
def _(d: Path) -> list[str]:
    (d / "s.yaml").write_text("- text\n")
    return ["search", str(d / "s.yaml"), "-o", str(d / "search")]


@case("search-config-unknown-key")
def _(d: Path) -> list[str]:
    (d / "s.yaml").write_text("suite: text\nbudgett: 3\n")
    return ["search", str(d / "s.yaml"), "-o", str(d / "search")]


@case("bench-unknown-suite")
def _(d: Path) -> list[str]:
    return ["bench", "nosuch", "-o", str(d / "bench"), "--no-progress"]


@case("bench-unknown-method")
def _(d: Path) -> list[str]:
    return ["bench", "text", "--methods", "tiess", "-o", str(d / "bench"), "--no-progress"]


@case("bench-empty-methods")
def _(d: Path) -> list[str]:
    return ["bench", "text", "--methods", ",", "-o", str(d / "bench"), "--no-progress"]


@case("bench-unknown-mode")
def _(d: Path) -> list[str]:
    return ["bench", "text", "--mode", "qlora", "-o", str(d / "bench"), "--no-progress"]


@case("bench-base-incomplete")
def _(d: Path) -> list[str]:
    return ["bench", "--base", str(d / "base"), "-o", str(d / "bench"), "--no-progress"]


@case("evaluate-missing-inputs", errors=2)
def _(d: Path) -> list[str]:
    return ["evaluate", str(d / "nope.yaml"), "--model", str(d / "merged"), "-o", str(d / "eval"), "--no-progress"]


@case("evaluate-bad-config", errors=2)
def _(d: Path) -> list[str]:
    (d / "base").mkdir()
    (d / "base" / "config.json").write_text("{}")
    (d / "base" / "tokenizer.json").write_text("{}")
    (d / "data.jsonl").write_text("".join(f'{{"text": "w{i}", "label": {i % 2}}}\n' for i in range(12)))
    (d / "tasks.yaml").write_text("tasks:\n  - {name: a, file: data.jsonl}\n")
    (d / "e.yaml").write_text("base: base\ntasks: tasks.yaml\nexperts: {a: missing-adapter}\nbudgett: 3\n")
    return ["evaluate", str(d / "e.yaml"), "-o", str(d / "eval"), "--no-progress"]


# ----------------------------------------------------------------------------------------------- the tests
def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _refuses(row: Row, cs: Case, args: list[str], d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(d)  # relative default outputs (inspect-…, bench-results/…) land in d, which is hashed
    monkeypatch.setenv("HF_HOME", str(d / "hf-home"))  # an empty HF cache: HF ids are never found
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    before = _snapshot(d)
    res = runner.invoke(app, args)
    what = f"{row.key}: `neuromerge {' '.join(args)}`"
    assert res.exit_code == row.exit_code, f"{what} exited {res.exit_code}: {res.output[-1500:]}\n{res.exception!r}"
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == cs.errors, f"{what}: expected {cs.errors} error line(s), got {res.output!r}"
    for needle in row.messages:
        assert any(needle in e for e in errors), f"{what}: {needle!r} not in {errors}"
    after = _snapshot(d)
    assert after == before, f"{what} wrote or changed {sorted(set(after.items()) ^ set(before.items()))[:5]}"


def test_every_row_has_a_case_and_every_case_a_row() -> None:
    keys = [r.key for r in ROWS]
    assert len(keys) == len(set(keys)), f"duplicate keys in the table: {[k for k in keys if keys.count(k) > 1]}"
    assert not set(keys) - set(CASES), f"rows without a case: {sorted(set(keys) - set(CASES))}"
    assert not set(CASES) - set(keys), f"cases without a row: {sorted(set(CASES) - set(keys))}"
    bad = [r.key for r in ROWS if r.dry_run not in ("refuses", "run only", "-", "—")]
    assert not bad, f"rows whose --dry-run column is not 'refuses', 'run only' or '-': {bad}"
    bad = [r.key for r in ROWS if r.command != "merge" and r.dry_run not in ("-", "—")]
    assert not bad, f"--dry-run applies to merge rows only: {bad}"


@pytest.mark.parametrize("key", [r.key for r in ROWS])
def test_refusal(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = BY_KEY[key]
    assert key in CASES, f"no case registered for the row {key!r}"
    cs = CASES[key]
    args = cs.build(tmp_path)
    assert args[0] == row.command, f"{key}: the case runs {args[0]!r}, the table says {row.command!r}"
    _refuses(row, cs, args, tmp_path, monkeypatch)


@pytest.mark.parametrize("key", [r.key for r in ROWS if r.command == "merge" and r.dry_run == "refuses"])
def test_dry_run_refuses_too(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = BY_KEY[key]
    assert key in CASES, f"no case registered for the row {key!r}"
    cs = CASES[key]
    _refuses(row, cs, [*cs.build(tmp_path), "--dry-run"], tmp_path, monkeypatch)
