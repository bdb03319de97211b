"""mdx-export when writing fails (issue 17): a full disk or a read-only file system at the first
write of an export (the temporary file beside the output), a middle one (the model's bytes) and
the last (the rename onto the output), and a real 300 KB tmpfs.

Every case: one line `mdx-export: error: cannot write OUT: REASON`, exit code 2, no traceback,
no temporary file left, and a previous file at the output path kept as it was. The torch export
itself is made once per module (the faults come after it), so each case costs a validation only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from mdx.export import onnx_export
from mdx.export.cli import main
from mdx.runtime import fileio
from mdx.runtime.fileio import WriteError
from mdx.train.checkpoint import load_checkpoint
from runtime_helpers import fail_temporary_file
from test_export import leftovers, make_run

FAULTS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}
PREVIOUS = b"previous model"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def exported(run) -> bytes:
    """The torch export of the tiny run, made once (serialized, so each case gets a fresh copy)."""
    proto, _, _ = onnx_export.torch_to_onnx(load_checkpoint(run).model, onnx_export.DEFAULT_OPSET, lambda _m: None)
    return proto.SerializeToString()


@pytest.fixture
def fast_export(exported, monkeypatch):
    """torch_to_onnx replaced by the module's export (the part that comes before any write)."""
    monkeypatch.setattr(onnx_export, "torch_to_onnx",
                        lambda model, opset, log: (onnx.load_from_string(exported), "dynamo", 0.0))


def fault(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def inject(monkeypatch, where: str, code: int, out: Path) -> None:
    """Make the first, a middle or the last write of the export to `out` raise OSError(code)."""
    if where == "first":  # the temporary file beside the output cannot be created
        fail_temporary_file(monkeypatch, out.name, code)
    elif where == "middle":  # the model's bytes
        def save(proto, f, *args, **kwargs):
            raise fault(code)

        monkeypatch.setattr(onnx_export.onnx, "save", save)
    else:  # the rename onto the output, after validation
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst) == out:
                raise fault(code)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(fileio.os, "replace", replace)


@pytest.mark.parametrize("code", list(FAULTS), ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_write_fault_is_one_line_and_leaves_nothing(where, code, run, fast_export, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(PREVIOUS)  # a previous model stays when the new one cannot be written
    inject(monkeypatch, where, code, out)
    res = CliRunner().invoke(main, [str(run), "-o", str(out), "--no-simplify", "-q"])
    assert res.exit_code == 2, (res.output, repr(res.exception))
    assert res.stderr == f"mdx-export: error: cannot write {out}: {FAULTS[code]}\n", res.stderr
    assert "Traceback" not in res.output
    assert out.read_bytes() == PREVIOUS and leftovers(tmp_path) == ["m.onnx"]


def test_write_fault_through_the_api(run, fast_export, tmp_path, monkeypatch):
    """export_checkpoint raises WriteError (a ValueError naming the path) and writes nothing."""
    out = tmp_path / "new" / "m.onnx"
    inject(monkeypatch, "middle", errno.ENOSPC, out)
    with pytest.raises(WriteError) as e:
        onnx_export.export_checkpoint(run, out, simplify=False, verbose=False)
    assert e.value.path == out and e.value.reason == FAULTS[errno.ENOSPC]
    assert leftovers(out.parent) == []


def test_a_nearly_full_disk(small_tmpfs, run, fast_export):
    """A real 300 KB tmpfs: the tiny model (about 0.4 MB) does not fit; nothing is left; with
    space freed the same command writes it."""
    folder, resize = small_tmpfs
    out = folder / "m.onnx"
    args = [str(run), "-o", str(out), "--no-simplify", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.stderr == f"mdx-export: error: cannot write {out}: No space left on device\n"
    assert list(folder.iterdir()) == []
    resize("4m")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert leftovers(folder) == ["m.onnx"]
