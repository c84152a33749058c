"""Output paths checked once, before any work: a command that would fail to write its result fails first.

Every command that writes calls one of these at its start, before it reads data or builds a model:

    check_file(out, "--out")              a file path: not a folder, its folder creatable and writable
    check_dir(out, "--out", empty=True)   a folder: not a file, creatable and writable (and empty, if asked)

Each probes what it can without leaving anything behind (a probe file is created and removed in the
folder, so read-only file systems, permissions and full disks show up as the OS reports them) and ends
in one line naming the path and the fix. `need_bytes` adds a free-space check where the size of the
first write can be estimated (statvfs; skipped where the platform has none).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from sdtool.errors import SdtoolError

_WHY = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def _reason(e: OSError) -> str:
    return _WHY.get(e.errno or 0, e.strerror or str(e))


def _existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists (a file on the way is refused by the caller)."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and remove a file in `folder`, the way a checkpoint write would."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sdtool-probe-", dir=folder)
    except OSError as e:
        raise SdtoolError(f"{option} {path}: cannot write in {folder} ({_reason(e)}); choose another folder") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def _free_space(folder: Path, need_bytes: int, option: str, path: Path) -> None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or an exotic mount: the write itself will tell
        return
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise SdtoolError(
            f"{option} {path}: {free / 1e6:.1f} MB free in {folder}, the first write needs about "
            f"{need_bytes / 1e6:.1f} MB; free space or choose another folder"
        )


def _writable_folder(folder: Path, option: str, path: Path, need_bytes: int) -> None:
    """`folder` (possibly not there yet) can be created and written in."""
    base = _existing_parent(folder)
    if not base.is_dir():
        raise SdtoolError(f"{option} {path}: {base} is a file, not a folder; choose another path")
    _probe(base, option, path)
    if need_bytes:
        _free_space(base, need_bytes, option, path)


def check_file(path: str | Path, option: str = "--out", need_bytes: int = 0) -> Path:
    """`path` can be written as a file: it is not a folder, and its folder can be created and written in."""
    p = Path(path)
    if p.is_dir():
        raise SdtoolError(f"{option} {p} is a folder; give a file path")
    _writable_folder(p.parent, option, p, need_bytes)
    return p


def check_dir(path: str | Path, option: str = "--out", empty: bool = False, need_bytes: int = 0) -> Path:
    """`path` can be used as an output folder: not a file, creatable and writable (and empty if asked)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SdtoolError(f"{option} {p} is a file, not a folder; choose a folder path")
    if empty and p.is_dir() and any(p.iterdir()):
        raise SdtoolError(f"{option} {p} is not empty; choose a new folder")
    _writable_folder(p, option, p, need_bytes)
    return p
