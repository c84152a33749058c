"""Output paths checked once, before any work: a command that would fail to write its result fails first.

Every command that writes calls one of these at its start, before it reads data or builds a model:

    check_file(out, "--out")              a file path: not a folder, its folder creatable and writable
    check_dir(out, "--out", empty=True)   a folder: not a file, creatable and writable (and empty, if asked)

Each probes what it can without leaving anything behind (a probe file is created and removed in the
folder, so read-only file systems, permissions and full disks show up as the OS reports them) and ends
in one line naming the path and the fix. `need_bytes` adds a free-space check where the size of the
first write can be estimated (statvfs; skipped where the platform has none).

How much each command asks for (`need_bytes`): the size of the source checkpoint for a file derived from
it (prune, export in any format, eval --fit-thresholds, an early-exit bundle: each holds the same
tensors or fewer, so the estimate errs on the safe side), `SWEEP_BYTES` for a sweep folder, and nothing
where the size is not known before the run (a pipeline's folder: its model is built from the data).

A write that still fails later (the disk fills up meanwhile) goes through `write_error`: one line naming
the path and the OS reason. `Staged` writes several files under temporary names and renames them into
place only once the command's main output is written, so a failure leaves neither.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sdtool.errors import SdtoolError
from sdtool.fileio import new_file_mode

_WHY = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


SWEEP_BYTES = 1 << 20  # sweep.json, .csv and .png: a few hundred kB at most

T = TypeVar("T")


def _reason(e: OSError) -> str:
    return _WHY.get(e.errno or 0, e.strerror or str(e))


def reason(e: OSError) -> str:
    """The OS error in words a user acts on ("the file system is read-only", "no space left on the device")."""
    return _reason(e)


def os_error(e: BaseException) -> OSError | None:
    """The failed write behind `e`, if any: exporters wrap it in their own exception types. Only the
    errors a user fixes by freeing space or choosing another folder count (`_WHY`), so an unrelated
    OSError handled inside the exporter does not turn its own failure into a write error."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in _WHY:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def write_error(path: str | Path, e: OSError) -> SdtoolError:
    """The one line for a write that failed after the checks passed (typically the disk filled up meanwhile)."""
    return SdtoolError(f"cannot write {path} ({_reason(e)}); nothing was written. Free space or choose another path")


def source_size(path: str | Path) -> int:
    """`need_bytes` for a file derived from checkpoint `path`: its size (0 when unreadable: loading it says why)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


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


class Staged:
    """Files written under temporary names beside their final ones, renamed into place by `commit`.

    A command with two outputs (a checkpoint or bundle and a sweep) stages the second, writes the first,
    then commits; if either write fails, `abort` removes the temporary files and any folder created
    for them, so nothing is left behind.
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._made: list[Path] = []

    def folder(self, path: str | Path) -> Path:
        """Create `path` (and missing parents), remembering what was created for `abort`."""
        p = Path(path)
        missing = []
        q = p
        while not q.exists() and q.parent != q:
            missing.append(q)
            q = q.parent
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(p, e) from None
        self._made += missing
        return p

    def path(self, final: Path) -> Path:
        """A new temporary file beside `final` to write instead of it."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        except OSError as e:
            raise write_error(final, e) from None
        os.close(fd)
        self._files.append((Path(tmp), final))
        os.chmod(tmp, new_file_mode())  # mkstemp makes it private; these are ordinary files
        return Path(tmp)

    def commit(self, after_main: bool = False) -> None:
        """Rename the staged files into place; `after_main`: the main output is already written (a failure
        here then says so, and which staged files did reach their place)."""
        try:
            for tmp, _ in self._files:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            for tmp, final in self._files:
                os.replace(tmp, final)
        except OSError as e:
            placed = [str(final) for tmp, final in self._files if not tmp.exists() and final.exists()]
            where = self._files[0][1].parent
            self.abort()
            kept = (["the main output"] if after_main else []) + placed
            raise SdtoolError(
                f"cannot write {where} ({_reason(e)}); "
                + (f"written: {', '.join(kept)}, the rest was not" if kept else "nothing was written")
                + ". Free space or choose another path"
            ) from None
        self._files, self._made = [], []

    def abort(self) -> None:
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        for d in self._made:  # deepest first, as created
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                d.rmdir()
        self._files, self._made = [], []


def staged_write(stage: Callable[[Staged], object], write: Callable[[], T]) -> T:
    """Stage the side outputs (`stage` writes them into a `Staged`), run the main `write`, then rename the
    side outputs into place: a failure in either leaves none of them."""
    st = Staged()
    try:
        stage(st)
        result = write()
        st.commit(after_main=True)
    except BaseException as e:
        st.abort()
        if isinstance(e, OSError):
            raise write_error(e.filename or "the output", e) from None
        raise
    return result


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A new folder beside `out` (same file system) to write a whole output folder into; the block fills it
    and renames it into place. Its files are flushed to disk when the block ends; if the block fails the
    folder is removed and an OSError becomes one line naming `out`, so nothing half-written is left."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an output folder is an ordinary one
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from None
        raise


def fsync_files(folder: Path) -> None:
    """Flush every file of `folder` to disk, before the folder is renamed into place."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
