"""Atomic writes: a file or directory appears complete under its final name or not at
all. A failure while writing (disk full, killed process) leaves the previous version in
place and no partial file behind; OS errors are re-raised naming the path."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from clq_compile.errors import SaveError


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask sets it
    for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: Path, is_dir: bool) -> None:
    """Give the temporary file/dir (created private, 0600/0700) the permissions a plain
    ``open``/``mkdir`` would have, and the same to files written inside it."""
    mask = _umask()
    tmp.chmod((0o777 if is_dir else 0o666) & ~mask)
    if is_dir:
        for f in tmp.iterdir():
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def _fail(path: Path, e: OSError) -> SaveError:
    err = SaveError(e.errno, f"could not write {path}: {e.strerror or e}")
    err.filename = str(path)
    return err


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _fail(path, e) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish(tmp_path, is_dir=False)
        os.replace(tmp_path, path)
    except OSError as e:
        raise _fail(path, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces
    ``path`` (an existing directory is moved aside first and removed after)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveError(20, f"could not write {path}: it exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _fail(path, e) from e
    try:
        yield tmp
        _publish(tmp, is_dir=True)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "dir")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _fail(path, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
