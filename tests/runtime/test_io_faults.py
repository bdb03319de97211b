"""I/O faults in mdx-sample and mdx-eval: a disk that fills up or turns read-only mid-run ends in
one line naming the path and the reason, exit code 2, no traceback, and no file of the run left
behind (no partial output, no temporary).

Faults are injected into the Python file objects the writers use (PIL, numpy's zip writer, the
JSON writer): every file opened for writing below the test folder is wrapped, and the k-th
write of the whole run raises OSError(errno). A clean run counts the writes first, so "first",
"middle" and "last" are positions in the real sequence; "rename" fails the final os.replace.
A real size-limited tmpfs (root only) checks the same without any patching.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.runtime import cli, evaluate, fileio

ERRNOS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS}
POSITIONS = ("first", "middle", "last", "rename")
SAMPLE_ARGS = ["--threads", "1", "--steps", "3", "-n", "4", "--out", "s.png", "--gif", "d.gif"]


class Faults:
    """Counts the writes to files opened for writing below `root`; the `fail_at`-th raises."""

    def __init__(self, root: Path, fail_at: int | None = None, code: int = errno.ENOSPC) -> None:
        self.root, self.fail_at, self.code = root.resolve(), fail_at, code
        self.writes = 0
        self.failed_in: Path | None = None  # the file whose write raised

    def tick(self, path: Path) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            self.failed_in = path
            raise OSError(self.code, os.strerror(self.code))


class FaultyFile:
    """A file object whose write() goes through Faults.tick; fileno() is refused so that PIL's
    encoders write through write() too instead of straight to the descriptor."""

    def __init__(self, f, path: Path, faults: Faults) -> None:
        self._f, self._path, self._faults = f, path, faults

    def write(self, data):
        self._faults.tick(self._path)
        return self._f.write(data)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def inject(monkeypatch):
    """inject(faults) wraps builtins.open / io.open for the rest of the test."""
    real_open = builtins.open

    def install(faults: Faults) -> Faults:
        def faulty_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                path = Path(file).resolve()
                if path.is_relative_to(faults.root):
                    return FaultyFile(f, path, faults)
            return f

        monkeypatch.setattr(builtins, "open", faulty_open)
        monkeypatch.setattr(io, "open", faulty_open)
        return faults

    return install


def fail_rename_of(monkeypatch, names: set[str], code: int) -> None:
    """os.replace onto a file called one of `names` raises OSError(code)."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name in names:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", replace)


def fault_position(position: str, total: int) -> int | None:
    return {"first": 1, "middle": max(1, total // 2), "last": total, "rename": None}[position]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line_failure(result, prog: str, targets: set[str], reason: str) -> str:
    """Exit 2, no traceback, and the last stderr line `prog: error: cannot write T: reason`."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    prefix = f"{prog}: error: cannot write "
    assert last.startswith(prefix) and last.endswith(f": {reason}"), last
    named = last[len(prefix):-len(f": {reason}")]
    assert Path(named).name in targets, last
    return Path(named).name


# --- mdx-sample --gif -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path():
    return h.cached_tiny()[1]


@pytest.fixture(scope="module")
def sample_writes(model_path, tmp_path_factory):
    """The number of file writes of a clean sample run (a PNG grid and a GIF)."""
    work = tmp_path_factory.mktemp("count")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(work)
        faults = Faults(work)
        real_open = builtins.open

        def counting_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                return FaultyFile(f, Path(file).resolve(), faults)
            return f

        mp.setattr(builtins, "open", counting_open)
        mp.setattr(io, "open", counting_open)
        result = CliRunner().invoke(cli.main, ["--model", str(model_path), *SAMPLE_ARGS], catch_exceptions=False)
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["d.gif", "s.png"]
    assert faults.writes >= 3, faults.writes  # several writes, so first, middle and last differ
    return faults.writes


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("code", ERRNOS, ids=list(ERRNOS))
def test_sample_with_gif_fails_in_one_line_and_leaves_nothing(code, position, model_path, sample_writes, tmp_path,
                                                              monkeypatch, inject):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MDX_MODEL", raising=False)
    faults = inject(Faults(tmp_path, fault_position(position, sample_writes), ERRNOS[code]))
    if position == "rename":
        fail_rename_of(monkeypatch, {"d.gif"}, ERRNOS[code])
    result = CliRunner().invoke(cli.main, ["--model", str(model_path), *SAMPLE_ARGS], catch_exceptions=False)
    named = assert_one_line_failure(result, "mdx-sample", {"s.png", "d.gif"}, os.strerror(ERRNOS[code]))
    if faults.failed_in is not None:  # the error names the output whose write failed
        assert faults.failed_in.name.startswith(f".{named}.")
    assert files_under(tmp_path) == []  # no partial file, no temporary, and no s.png of a failed run


def test_a_failed_run_keeps_an_existing_output(model_path, tmp_path, monkeypatch, inject):
    """An output that existed before the run is left as it was when a later write fails."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.png").write_bytes(b"the previous grid")
    inject(Faults(tmp_path, 1, errno.ENOSPC))
    result = CliRunner().invoke(cli.main, ["--model", str(model_path), *SAMPLE_ARGS], catch_exceptions=False)
    assert_one_line_failure(result, "mdx-sample", {"s.png"}, os.strerror(errno.ENOSPC))
    assert files_under(tmp_path) == ["s.png"] and (tmp_path / "s.png").read_bytes() == b"the previous grid"


# --- mdx-eval --json --------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples_npz(tmp_path_factory):
    """A samples file of the shipped classifier's shape: 18 random 16x16 RGB images, 2 per class."""
    if not evaluate.DEFAULT_CLASSIFIER.is_file() or not evaluate.DEFAULT_REAL.is_file():
        pytest.skip("needs the shipped classifier and train/data/emoji16.npz")
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("eval") / "samples.npz"
    np.savez(path, images=rng.integers(0, 256, (18, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(18, dtype=np.int64) % 9)
    return path


def run_eval(samples: Path, json_out: str):
    return CliRunner().invoke(evaluate.main, [str(samples), "--threads", "1", "--json", json_out],
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def eval_writes(samples_npz, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval-count")
    mp = pytest.MonkeyPatch()
    try:
        faults = Faults(work)
        real_open = builtins.open

        def counting_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                    and Path(file).resolve().is_relative_to(faults.root):
                return FaultyFile(f, Path(file).resolve(), faults)
            return f

        mp.setattr(builtins, "open", counting_open)
        mp.setattr(io, "open", counting_open)
        result = run_eval(samples_npz, str(work / "r.json"))
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    assert faults.writes >= 1
    return faults.writes


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("code", ERRNOS, ids=list(ERRNOS))
def test_eval_json_fails_in_one_line_and_leaves_nothing(code, position, samples_npz, eval_writes, tmp_path,
                                                        monkeypatch, inject):
    inject(Faults(tmp_path, fault_position(position, eval_writes), ERRNOS[code]))
    if position == "rename":
        fail_rename_of(monkeypatch, {"r.json"}, ERRNOS[code])
    result = run_eval(samples_npz, str(tmp_path / "r.json"))
    assert "FD" in result.stdout  # the report was printed before the JSON failed
    assert_one_line_failure(result, "mdx-eval", {"r.json"}, os.strerror(ERRNOS[code]))
    assert files_under(tmp_path) == []


# --- a real, size-limited file system ---------------------------------------------------


def test_sample_onto_a_full_tmpfs(small_tmpfs, model_path, monkeypatch):
    """A 300 KB tmpfs: the GIF of 16 images at scale 8 does not fit. One line, nothing left."""
    folder, _ = small_tmpfs
    monkeypatch.chdir(folder)
    args = ["--model", str(model_path), "--threads", "1", "--steps", "8", "-n", "16", "--scale", "8",
            "--out", "s.png", "--gif", "d.gif"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert_one_line_failure(result, "mdx-sample", {"s.png", "d.gif"}, os.strerror(errno.ENOSPC))
    assert files_under(folder) == []


def test_eval_json_onto_a_full_tmpfs(small_tmpfs, samples_npz):
    folder, _ = small_tmpfs
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the file system to the last block
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    result = run_eval(samples_npz, str(folder / "r.json"))
    assert_one_line_failure(result, "mdx-eval", {"r.json"}, os.strerror(errno.ENOSPC))
    assert files_under(folder) == ["filler"]
