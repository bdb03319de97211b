"""Writing files so that a failure leaves nothing half-written, and says why in one line.

Every mdx writer goes through this module:

    with atomic_write("out/samples.png", suffix=".png") as tmp:   # a temporary file beside it
        image.save(tmp)                                          # renamed over the target on success
    with atomic_dir("runs/a/checkpoint") as tmp:                 # a temporary folder beside it
        write_files_into(tmp)                                    # swapped in whole on success
    append_line("runs/a/metrics.jsonl", json.dumps(row))

On any exception the temporary file or folder is removed and the target is left as it was;
an OSError (no space left, a read-only file system, the folder removed mid-run, permission
lost) becomes a `WriteError` whose message names the target and the reason, which every
command reports as one line (`prog: error: cannot write PATH: No space left on device`).
The rename is `os.replace`, atomic on POSIX within one file system, which is why the
temporary sits in the target's own folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputError(ValueError):
    """An output path that cannot be written, or of a kind that is not written; the message says why."""


class WriteError(OutputError):
    """A file or folder could not be written; the message names it and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot write {os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """The WriteError for an OSError met while writing `path`."""
    return WriteError(path, error.strerror or str(error) or type(error).__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; rename it onto `path` when the body succeeds.

    The file gets the mode a new file would get (0666 less the umask; mkstemp makes 0600).
    On any exception the temporary is removed; an OSError is raised as WriteError.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=_parent(target))
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise write_error(target, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _remove_tree(path: Path | None) -> None:
    if path is not None and (path.exists() or path.is_symlink()):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the body succeeds it replaces `path` whole.

    An existing `path` is moved aside first and removed once the new folder is in place, so at
    every moment either the old or the new folder is complete under `path`'s name, except for
    the instant between the two renames, when a crash leaves the old one as `.NAME.old-*`.
    On any exception nothing new is left behind and an existing `path` stays; an OSError is
    raised as WriteError.
    """
    target = Path(path)
    staging: Path | None = None
    old: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_parent(target)))
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=_parent(target)))
            os.replace(target, old)  # an empty folder is replaced by the old one
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the old folder back
                old = None
            raise
        staging = None
    except OSError as e:
        raise write_error(target, e) from None
    finally:
        _remove_tree(staging)
        _remove_tree(old)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) to a log such as metrics.jsonl; OSError -> WriteError.

    The line is written with one write call on a file opened for appending, so a reader never
    sees half of it from this process.
    """
    target = Path(path)
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise write_error(target, e) from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8); OSError -> WriteError."""
    target = Path(path)
    with atomic_write(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
