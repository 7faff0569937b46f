"""Files and folders written whole or not at all.

1. Check the destination first: not ``""``, its folder exists, and for a folder, it is not the
   current folder, home, ``/`` or a parent of the current folder, and it is new, empty, or
   something the caller says it made (``may_replace``).
2. Write into a temporary sibling (``.NAME.tmp-XXXXXXXX``, same folder, same file system).
3. Rename it into place: ``os.replace`` for a file; for a folder, the old one is moved aside
   (``.NAME.old-XXXXXXXX``) and removed only once the new one is in place.

A reader therefore sees the old version or the new one, never half of either. A failed write
(full disk, read-only or missing folder) removes the temporary, leaves the old version as it
was and raises :class:`OutputError` naming the path and the reason. Not guaranteed: a crash
between the two renames of a folder leaves the old one under its ``.old`` name.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def cache_dir() -> Path:
    """Where tvm-tinytrain caches what it builds (the search's runs, the host kernels):
    ``$TINYTRAIN_CACHE``, else ``$XDG_CACHE_HOME/tvm-tinytrain``, else ``~/.cache/tvm-tinytrain``."""
    if os.environ.get("TINYTRAIN_CACHE"):
        return Path(os.environ["TINYTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tvm-tinytrain"


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"


def _protected(path: Path) -> bool:
    """The current folder, home, ``/`` and every parent of the current folder."""
    if str(path) in (".", ".."):
        return True
    here, target = Path.cwd().resolve(), path.resolve()
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    return target == here or target in here.parents or target == home


def check_file(path: str | Path) -> Path:
    """Raise :class:`OutputError` unless a file can be put at ``path`` (its folder exists)."""
    if str(path) == "":
        raise OutputError("the output path is empty: name a file")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; name a file")
    if not path.parent.is_dir():
        why = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputError(f"cannot write {path}: {path.parent} {why}")
    return path


def check_folder(path: str | Path, may_replace: Callable[[Path], bool], what: str) -> Path:
    """Raise :class:`OutputError` unless ``path`` may become a folder: its parent exists, it is
    not a protected folder, and it is new, empty, or ``may_replace(path)`` (it is a ``what``)."""
    if str(path) == "":
        raise OutputError("the output path is empty: name a folder")
    path = Path(path)
    if _protected(path):
        raise OutputError(f"refusing to replace {path} with a {what}: it is the current folder, home, / "
                          f"or a parent of the current folder; name a new folder")
    if not path.parent.is_dir():
        why = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputError(f"cannot write {path}: {path.parent} {why}")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"cannot write {path}: it exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not may_replace(path):
        raise OutputError(f"{path} is not empty and is not a {what}: refusing to replace it; "
                          f"name a new or empty folder")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``."""
    path = check_file(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_folder(path: str | Path, may_replace: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` to fill; on success it takes ``path``'s place.

    An existing ``path`` must be empty or ``may_replace(path)`` (see :func:`check_folder`)."""
    path = check_folder(path, may_replace, what)
    tmp = _sibling(path, "tmp")
    try:
        os.mkdir(tmp)
        yield tmp
        _put_in_place(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an old non-empty ``path`` is moved aside, then removed."""
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # POSIX rename replaces an empty folder
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
