"""Nothing lost, nothing silently wrong (issue #16): an output never replaces an input, a write failure is one line
with nothing left behind, and what a killed writer left is cleaned (or restored) by the next writer."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.errors import OutputConflictError, OutputWriteError
from neuromerge.io import writer as writer_module
from neuromerge.io.output_guard import check_output, check_writable
from neuromerge.io.writer import LOCK_FILE, AtomicOutput, clean_stale_outputs
from tests.helpers import write_config

runner = CliRunner()


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks followed) → its sha256: what must survive a refused run."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _temp_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".neuromerge-" in p.name]


def _error_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    assert "Traceback" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture
def family(make_family, tmp_path: Path):
    base, experts = make_family("llama", n_experts=2, root=tmp_path / "models")
    cfg = write_config(tmp_path / "models" / "cfg.yaml", "task_arithmetic", base, experts)
    return base, experts, cfg


# ------------------------------------------------------------------------------------ item 1: --force and inputs


@pytest.mark.parametrize("which", ["base", "expert", "parent", "config_folder"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_force_never_replaces_an_input(family, tmp_path: Path, which: str, dry_run: bool) -> None:
    base, experts, cfg = family
    config_folder = tmp_path / "configs"
    config_folder.mkdir()
    cfg = Path(shutil.copy(cfg, config_folder / "cfg.yaml"))
    out = {"base": base, "expert": experts[1], "parent": tmp_path / "models", "config_folder": config_folder}[which]
    named = {"base": base, "expert": experts[1], "parent": base, "config_folder": cfg}[which]
    before = _digest(tmp_path)
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force", "--no-progress",
                              *(["--dry-run"] if dry_run else [])])
    msg = _error_line(res, str(named), "choose another output folder")
    assert (" is the input " if which in ("base", "expert") else " contains the input ") in msg
    assert _digest(tmp_path) == before
    assert not _temp_leftovers(out.parent)


def test_python_api_refuses_an_input_as_output(family) -> None:
    base, _experts, cfg = family
    before = _digest(base)
    with pytest.raises(OutputConflictError, match="is the input"):
        neuromerge.merge(cfg, base, force=True, progress=False)
    with pytest.raises(OutputConflictError, match="contains the input"):
        neuromerge.merge(str(cfg), cfg.parent, force=True, progress=False)
    assert _digest(base) == before


def test_symlinked_output_and_linked_blobs_are_refused(family, tmp_path: Path) -> None:
    """A model folder whose files are links elsewhere (the HF cache layout): the folder holding the link targets is
    an input too; an output that is a symlink to an input is the input."""
    base, experts, _ = family
    blobs = tmp_path / "store" / "blobs"
    blobs.mkdir(parents=True)
    linked = tmp_path / "linked-base"
    linked.mkdir()
    for f in base.iterdir():
        target = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, target)
        (linked / f.name).symlink_to(os.path.relpath(target, linked))
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", linked, experts)
    before = _digest(blobs)
    for out in (blobs, tmp_path / "store"):
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force", "--no-progress"])
        _error_line(res, str(linked), "which the input links to")
    alias = tmp_path / "alias"
    alias.symlink_to(experts[0])
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(alias), "--force", "--no-progress"])
    _error_line(res, f"is the input {experts[0]}")
    assert _digest(blobs) == before and alias.is_symlink()


def test_hf_cache_blobs_are_refused(family, tmp_path: Path, monkeypatch) -> None:
    base, experts, _ = family
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "org/tiny",
                                   "models": [{"model": str(e)} for e in experts]}))
    before = _digest(repo / "blobs")
    for out in (repo / "blobs", repo):
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force", "--no-progress"])
        _error_line(res, "choose another output folder")
    assert _digest(repo / "blobs") == before
    assert (snap / "config.json").read_text()


def test_output_inside_an_input_folder_only_warns(family) -> None:
    base, _experts, cfg = family
    out = base / "merged"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"warning: the output {out} lies inside the input folder {base}" in res.output
    assert (out / "model.safetensors").is_file()


def test_check_output_unit(tmp_path: Path) -> None:
    model = tmp_path / "a" / "model"
    model.mkdir(parents=True)
    (model / "w.safetensors").write_bytes(b"x")
    with pytest.raises(OutputConflictError, match=r"contains the input .*model; choose another output folder"):
        check_output(tmp_path / "a", [model])
    with pytest.raises(OutputConflictError, match="is the input"):
        check_output(tmp_path / "a" / "x" / "..", [tmp_path / "a"])
    assert check_output(tmp_path / "b", [model, None, tmp_path / "missing", "org/absent-model"]) == []
    assert check_output(model / "out", [model]) == [f"the output {model / 'out'} lies inside the input folder {model}"]


def test_routed_saves_refuse_their_base(tmp_path: Path) -> None:
    """``save_routed`` / ``save_wemoe`` / MERGE's save pass their base to :class:`AtomicOutput`."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputConflictError, match="is the input"), AtomicOutput(base, force=True, inputs=[base]):
        pass
    assert (base / "model.safetensors").read_bytes() == b"weights"


def _route_config(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    paths = {name: tmp_path / "in" / name for name in ("base", "adapter", "data")}
    for p in paths.values():
        p.mkdir(parents=True)
        (p / "file.bin").write_bytes(b"user data")
    tasks = paths["data"] / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"name": "t", "suite": "text", "file": "t.jsonl"}]}))
    (paths["data"] / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    cfg = tmp_path / "route.yaml"
    cfg.write_text(yaml.safe_dump({"method": "twin", "base": str(paths["base"]), "tasks": str(tasks),
                                   "experts": {"t": str(paths["adapter"])}}))
    return cfg, {**paths, "tasks": tasks, "config": cfg}


@pytest.mark.parametrize("which", ["base", "adapter", "data", "config"])
def test_route_build_refuses_an_input(tmp_path: Path, which: str) -> None:
    cfg, paths = _route_config(tmp_path)
    out = tmp_path if which == "config" else paths[which]
    before = _digest(tmp_path / "in")
    res = runner.invoke(app, ["route", "build", str(cfg), "-o", str(out), "--force"])
    _error_line(res, "choose another output folder")
    assert _digest(tmp_path / "in") == before


def test_search_inspect_bench_refuse_an_input(family, tmp_path: Path) -> None:
    base, _experts, cfg = family
    search_cfg = tmp_path / "search.yaml"
    search_cfg.write_text(yaml.safe_dump({"suite": "text", "quick": True}))
    _error_line(runner.invoke(app, ["search", str(search_cfg), "-o", str(search_cfg)]), "is the input")
    _error_line(runner.invoke(app, ["search", str(search_cfg), "-o", str(tmp_path)]), "contains the input")
    # a search only adds files: with --resume a config kept in its own folder is allowed (nothing to resume here)
    _error_line(runner.invoke(app, ["search", str(search_cfg), "-o", str(tmp_path), "--resume"]), "nothing to resume")
    res = runner.invoke(app, ["inspect", str(cfg), "-o", str(base), "--no-progress"])
    _error_line(res, f"is the input {base}")
    assert not (base / "inspect.json").exists()
    res = runner.invoke(app, ["bench", "text", "--quick", "-o", str(base.parent), "--model", str(base)])
    _error_line(res, f"contains the input {base}")


# ------------------------------------------------------------------------------------ item 12: write failures


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
def test_unwritable_output_is_one_line(family, tmp_path: Path, where: str) -> None:
    _base, _experts, cfg = family
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "parent_is_a_file" else Path(f"/proc/neuromerge-test-{os.getpid()}/out")
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    msg = _error_line(res, f"cannot write {out}")
    if where == "parent_is_a_file":
        assert msg.endswith(f"{blocker} is not a folder")
    assert blocker.read_text() == "not a folder"


def _enospc_pwrite(real):
    def pwrite(fd: int, data, offset: int) -> int:
        if offset > 0:  # the shard headers (offset 0) go through; the first tensor bytes hit a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    return pwrite


@pytest.mark.parametrize("force", [False, True])
def test_disk_full_while_writing_a_shard(family, tmp_path: Path, monkeypatch, force: bool) -> None:
    _base, _experts, cfg = family
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "previous.txt").write_text("previous merge")
    monkeypatch.setattr(writer_module.os, "pwrite", _enospc_pwrite(os.pwrite))
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", "--threads", "1",
                              *(["--force"] if force else [])])
    _error_line(res, f"cannot write {out.absolute()}: No space left on device")
    assert not _temp_leftovers(tmp_path)
    if force:
        assert [p.name for p in out.iterdir()] == ["previous.txt"]
    else:
        assert not out.exists()


def test_disk_full_while_writing_the_reports(family, tmp_path: Path, monkeypatch) -> None:
    _base, _experts, cfg = family
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("neuromerge.engine.run.write_reports", full)
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    _error_line(res, "cannot write", "No space left on device")
    assert not out.exists() and not _temp_leftovers(tmp_path)


def test_free_space_is_checked_before_writing(family, tmp_path: Path, monkeypatch) -> None:
    _base, _experts, cfg = family
    out = tmp_path / "deep" / "out"
    monkeypatch.setattr("neuromerge.io.output_guard.shutil.disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", *extra])
        _error_line(res, f"cannot write {out}: not enough free space", "1000 B free")
    assert not (tmp_path / "deep").exists()
    with pytest.raises(OutputWriteError, match="not enough free space"):
        check_writable(out, 1001)
    check_writable(out, 1000)


# ------------------------------------------------------------------------------------ item 16: orphaned folders


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _fake_tmp(parent: Path, name: str, pid: int) -> Path:
    tmp = parent / f".{name}.neuromerge-tmp-{pid}"
    tmp.mkdir()
    (tmp / LOCK_FILE).touch()
    (tmp / "model.safetensors").write_bytes(b"partial")
    return tmp


def test_writer_holds_a_lock_for_its_whole_life(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with AtomicOutput(out) as tmp:
        fd = os.open(tmp / LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert clean_stale_outputs(tmp_path).removed == []  # a live writer's folder stays
        (tmp / "a.txt").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the lock file does not reach the output


def test_orphans_of_killed_writers_are_cleaned(family, tmp_path: Path) -> None:
    """A merge into a folder removes the temporary folders whose lock is free, of any output name, keeps those whose
    lock is held (by this process through an fd, or by a child process), and restores a set-aside output whose final
    folder is missing."""
    _base, _experts, cfg = family
    parent = tmp_path / "outputs"
    parent.mkdir()
    dead = _dead_pid()
    orphan = _fake_tmp(parent, "other-model", dead)
    orphan_same = _fake_tmp(parent, "out", dead)
    held_here = _fake_tmp(parent, "held-fd", dead)
    held_child = _fake_tmp(parent, "held-child", dead)
    fd = os.open(held_here / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    child = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(held_child / LOCK_FILE)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        old = parent / f".previous.neuromerge-old-{dead}"  # killed between the two renames of a --force commit
        old.mkdir()
        (old / "model.safetensors").write_bytes(b"the user's previous model")
        done_old = parent / f".done.neuromerge-old-{dead}"  # killed after the swap, while removing the old one
        done_old.mkdir()
        (parent / "done").mkdir()
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(parent / "out"), "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "restored" in res.output and "previous" in res.output
        assert not orphan.exists() and not orphan_same.exists() and not done_old.exists()
        assert held_here.exists() and held_child.exists()
        assert (parent / "previous" / "model.safetensors").read_bytes() == b"the user's previous model"
        assert sorted(_temp_leftovers(parent)) == sorted([held_here.name, held_child.name])
    finally:
        os.close(fd)
        child.kill()
        child.wait()
    assert clean_stale_outputs(parent).removed == sorted([held_child, held_here])


def test_incomplete_swap_keeps_the_previous_output(tmp_path: Path) -> None:
    """The final folder exists but the dead writer's temporary folder too: the swap did not complete, so the final
    folder is someone else's and the set-aside one is kept, visibly."""
    dead = _dead_pid()
    (tmp_path / "m").mkdir()
    old = tmp_path / f".m.neuromerge-old-{dead}"
    old.mkdir()
    (old / "w").write_text("previous")
    _fake_tmp(tmp_path, "m", dead)
    done = clean_stale_outputs(tmp_path)
    kept = tmp_path / f"m.neuromerge-recovered-{dead}"
    assert done.restored == [kept] and (kept / "w").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", kept.name])


def test_kill_9_leftover_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    """A real writer killed with SIGKILL inside :class:`AtomicOutput`; the next writer of another name removes its
    temporary folder."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom neuromerge.io.writer import AtomicOutput\n"
            f"with AtomicOutput(Path({str(tmp_path / 'victim')!r})) as tmp:\n"
            "    (tmp / 'part').write_text('x')\n    print('ready', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(neuromerge.__file__).parents[1]), os.getcwd()])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        leftover = tmp_path / f".victim.neuromerge-tmp-{proc.pid}"
        assert leftover.is_dir()
        with AtomicOutput(tmp_path / "next"):  # the victim is alive: its folder stays
            assert leftover.is_dir()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and leftover.exists():
            with AtomicOutput(tmp_path / "next", force=True):
                pass
        assert not leftover.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["next"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_search_folder_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """`search -o FILE` names the file instead of a NotADirectoryError traceback; nothing is written."""
    from typer.testing import CliRunner

    from neuromerge.cli import app

    cfg = tmp_path / "search.yaml"
    cfg.write_text("suite: text\n")
    target = tmp_path / "not-a-folder"
    target.write_text("keep me")
    res = CliRunner().invoke(app, ["search", str(cfg), "-o", str(target), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a file" in lines[0], res.output
    assert target.read_text() == "keep me"
