"""Atomic writes: a file or directory appears complete under its final name or not at
all. A failure while writing or renaming (disk full, killed process, a failed rename)
leaves the previous version in place and no partial file or temporary directory behind;
OS errors are re-raised as ``SaveError`` naming the path. A directory holding anything but
a previous save is not replaced unless asked, and the current directory never."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
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


def _refuse_cwd(path: Path) -> None:
    """The current directory or a parent of it is never replaced: the process (and the
    shell that started it) stands in it."""
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise SaveError(errno.EISDIR,
                        f"could not write {str(path)!r}: it is the current directory or a "
                        "parent of it, which a save never replaces; name a new or "
                        "dedicated directory")


def check_target(path: Path, replaceable: Callable[[Path], bool] = lambda p: False,
                 overwrite: bool = False) -> None:
    """Raise ``SaveError`` if ``atomic_dir`` would refuse to replace ``path``."""
    _refuse_cwd(path)
    try:
        if not path.exists():
            return
        if not path.is_dir():
            raise SaveError(errno.ENOTDIR,
                            f"could not write {path}: it exists and is not a directory")
        if overwrite or not any(path.iterdir()) or replaceable(path):
            return
    except SaveError:
        raise
    except OSError as e:
        raise _fail(path, e) from e
    raise SaveError(errno.ENOTEMPTY,
                    f"could not write {path}: the directory holds files that are not a "
                    "previous save; choose another directory, or pass overwrite=True to "
                    "replace it and everything in it")


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` (both existing) in one step with Linux's
    ``renameat2(RENAME_EXCHANGE)``; False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``. An existing ``path`` is exchanged with ``new`` in
    one step where the OS can (``new`` then holds the previous version, removed by the
    caller); elsewhere it is moved into a holder beside it, and moved back if the second
    rename fails. The holder is removed unless putting the previous version back failed."""
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    keep = False
    try:
        os.replace(path, holder / "previous")
        try:
            os.replace(new, path)
        except OSError:
            try:
                os.replace(holder / "previous", path)
            except OSError as e:
                keep = True
                raise SaveError(e.errno, f"could not write {path}, nor put the previous "
                                         f"version back: it is in {holder / 'previous'}"
                                ) from e
            raise
    finally:
        if not keep:
            shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaceable: Callable[[Path], bool] = lambda p: False,
               overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it takes the place
    of ``path``. An existing ``path`` is replaced only when it is empty, when
    ``replaceable(path)`` says so (a previous save), or with ``overwrite=True``; the
    current directory and its parents never. On any failure ``path`` is left as it was
    and no temporary directory remains."""
    path = Path(path)
    check_target(path, replaceable, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _fail(path, e) from e
    try:
        yield tmp
        _publish(tmp, is_dir=True)
        check_target(path, replaceable, overwrite)  # again: files may have come meanwhile
        _swap_in(tmp, path)
    except SaveError:
        raise
    except OSError as e:
        raise _fail(path, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
