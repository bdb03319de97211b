"""mdx-train when writing fails (issue 17): a full disk or a read-only file system at the first,
a middle and the last write of a checkpoint, the other writers of a run, and a real 300 KB tmpfs.

Every case must end in one line `mdx-train: error: cannot write PATH: REASON`, exit code 2, no
traceback, no temporary folder or partial file left in the run folder; the last good checkpoint
stays loadable, and `--resume` continues from it once the fault is gone.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from click.testing import Result

from mdx.runtime import fileio
from mdx.train import checkpoint as ckpt
from mdx.train import trainer
from runtime_helpers import fail_temporary_file
from test_train import checkpoint_step, invoke, train_args, write_npz

STEPS, EVERY = 6, 3  # checkpoints at steps 3 and 6; the faults hit the one at step 6
FAULTS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def fault(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def assert_write_error(result: Result, path: Path, code: int) -> None:
    """Exit 2, exactly one stderr line naming the path and the reason, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, repr(result.exception))
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    assert last == f"mdx-train: error: cannot write {path}: {FAULTS[code]}", result.stderr
    assert sum("error" in ln for ln in lines) == 1 and "Traceback" not in result.output


def assert_no_leftovers(run: Path) -> None:
    """Only the run's own files: no hidden temporary file or folder anywhere under it."""
    hidden = [str(p.relative_to(run)) for p in run.rglob(".*")]
    assert not hidden, hidden
    if (run / ckpt.CKPT_DIR).exists():
        names = sorted(p.name for p in (run / ckpt.CKPT_DIR).iterdir())
        assert names == sorted([*ckpt.WEIGHTS.values(), ckpt.OPTIMIZER_FILE, ckpt.PROGRESS_FILE]), names


def assert_resumes(data: Path, run: Path, at: int) -> None:
    """The checkpoint left behind loads, and --resume finishes the run from it."""
    assert checkpoint_step(run) == at and ckpt.load_checkpoint(run).step == at
    result = invoke(train_args(data, run, max_steps=STEPS, checkpoint_every=EVERY, resume=True))
    assert result.exit_code == 0, result.stderr
    assert f"resuming {run} at step {at}" in result.stderr and checkpoint_step(run) == STEPS
    steps = [json.loads(line)["step"] for line in (run / trainer.METRICS_FILE).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no line logged twice


def fail_nth_tensor_write(monkeypatch: pytest.MonkeyPatch, n: int, code: int) -> None:
    """safetensors' save_file (model, ema, optimizer: 3 writes a checkpoint) raises at call n."""
    real, calls = ckpt.save_file, []

    def save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == n:
            raise fault(code)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def fail_publishing(monkeypatch: pytest.MonkeyPatch, code: int, after: int = 1) -> None:
    """The last write of a checkpoint, the rename of the finished folder onto checkpoint/, fails
    (once, on the checkpoint after `after` good ones; putting the old folder back works)."""
    real, published = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == ckpt.CKPT_DIR and ".old-" not in Path(src).name:
            published.append(src)
            if len(published) == after + 1:
                raise fault(code)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", replace)


@pytest.mark.parametrize("code", list(FAULTS), ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_fault_in_a_checkpoint_keeps_the_last_one(where: str, code: int, tmp_path: Path, data_npz: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    if where == "first":  # model.safetensors of the second checkpoint
        fail_nth_tensor_write(monkeypatch, 4, code)
        path = run / ckpt.CKPT_DIR / ckpt.WEIGHTS["raw"]
    elif where == "middle":  # optimizer.safetensors
        fail_nth_tensor_write(monkeypatch, 6, code)
        path = run / ckpt.CKPT_DIR / ckpt.OPTIMIZER_FILE
    else:  # the finished folder renamed onto checkpoint/
        fail_publishing(monkeypatch, code)
        path = run / ckpt.CKPT_DIR
    result = invoke(train_args(data_npz, run, max_steps=STEPS, checkpoint_every=EVERY))
    monkeypatch.undo()  # the fault is gone
    assert_write_error(result, path, code)
    assert_no_leftovers(run)
    assert_resumes(data_npz, run, at=EVERY)


@pytest.mark.parametrize("code", list(FAULTS), ids=["ENOSPC", "EROFS"])
def test_fault_in_the_first_checkpoint_leaves_none(code: int, tmp_path: Path, data_npz: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    fail_nth_tensor_write(monkeypatch, 2, code)  # ema.safetensors of the first checkpoint
    result = invoke(train_args(data_npz, run, max_steps=STEPS, checkpoint_every=EVERY))
    monkeypatch.undo()
    assert_write_error(result, run / ckpt.CKPT_DIR / ckpt.WEIGHTS["ema"], code)
    assert_no_leftovers(run)
    assert ckpt.find_checkpoint_dir(run) is None and not (run / ckpt.CKPT_DIR).exists()
    result = invoke(train_args(data_npz, run, max_steps=STEPS, checkpoint_every=EVERY))  # a fresh start works
    assert result.exit_code == 0, result.stderr
    assert checkpoint_step(run) == STEPS


def _fail_open_for(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Writing (opening for write or append) the file called `name` raises; everything else works."""
    real = open

    def guarded(file, mode="r", *args, **kwargs):
        if Path(str(file)).name == name and any(c in mode for c in "wax"):
            raise fault(code)
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)


@pytest.mark.parametrize("target", ["config.json", "metrics.jsonl", "final.png", "telemetry.csv"])
def test_other_writers_fail_in_one_line(target: str, tmp_path: Path, data_npz: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run description (the run's first write), metrics, the sample grid and the telemetry
    CSV (its last) fail as the checkpoints do."""
    run = tmp_path / "run"
    if target == "metrics.jsonl":
        _fail_open_for(monkeypatch, target, errno.ENOSPC)
    else:
        fail_temporary_file(monkeypatch, target, errno.ENOSPC)
    path = run / (f"{trainer.SAMPLES_DIR}/{target}" if target == "final.png" else target)
    result = invoke(train_args(data_npz, run, max_steps=STEPS, checkpoint_every=EVERY, telemetry=True))
    monkeypatch.undo()
    assert_write_error(result, path, errno.ENOSPC)
    assert_no_leftovers(run)
    assert not path.exists() or target == "metrics.jsonl"


def test_a_nearly_full_disk(small_tmpfs, data_npz: Path) -> None:
    """A real 300 KB tmpfs: the first checkpoint (about 390 KB) does not fit; with room for one
    checkpoint but not for the second beside it, the first stays; with space freed, --resume."""
    folder, resize = small_tmpfs
    run = folder / "run"
    args = train_args(data_npz, run, max_steps=STEPS, checkpoint_every=EVERY)
    result = invoke(args)
    assert_write_error(result, run / ckpt.CKPT_DIR / ckpt.OPTIMIZER_FILE, errno.ENOSPC)
    assert_no_leftovers(run)
    assert ckpt.find_checkpoint_dir(run) is None

    resize("600k")
    result = invoke(args)
    assert result.exit_code == 2 and "No space left on device" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.output
    assert_no_leftovers(run)
    resize("8m")
    assert_resumes(data_npz, run, at=EVERY)
