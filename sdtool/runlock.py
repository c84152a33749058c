"""One writer per run folder: the lock file `RUN/.lock`, and the leftovers a crash may leave.

    RUN/.lock    {"pid": 4242, "host": "node7", "started": "2025-01-31T12:00:00+00:00"}

`open_folder` checks the folder can be written (sdtool.outputs.check_dir), then creates the lock by hard-linking
a fully written private file into place (O_CREAT|O_EXCL where links are not supported), so of two runs
started on one folder exactly one gets it, and nobody sees a lock without its holder; the process that writes the run
holds it (rank 0 under torchrun) and `RunLock.release` removes it when the run ends, also on an error or
Ctrl-C. A lock outlives only a process that was killed (kill -9, power loss): it is stale when its host is
this host and its pid no longer runs (`os.kill(pid, 0)`); then it is taken over with one warning line. A
lock from another host is never judged stale (its pid means nothing here): it is refused, naming the holder.

Only the lock holder removes stale temporary files (`.NAME.XXXXXXXX.tmp` of sdtool.fileio.atomic_write_bytes,
`.sdtool-probe-*` of sdtool.outputs): another writer's could be in flight.

Only the standard library is imported here: the CLI reads `RESUME_HINT` without loading torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdtool.errors import SdtoolError
from sdtool.outputs import check_dir

LOCK_FILE = ".lock"
# The attribute `engine.fit` sets on a KeyboardInterrupt when the run can be continued: the command that does it.
RESUME_HINT = "sdtool_resume_command"
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp's 8 random characters


def warn(msg: str) -> None:
    """One line on stderr, also under --json (stdout stays the document)."""
    sys.stderr.write(f"warning: {msg}\n")
    sys.stderr.flush()


@dataclass
class RunLock:
    """A held lock; `release` removes it, and the folders `acquire` created if the run left them empty."""

    path: Path
    text: str  # what this process wrote: release removes the file only while it still holds that
    created: list[Path] = field(default_factory=list)  # deepest first

    def release(self) -> None:
        try:
            if self.text and self.path.read_text() == self.text:
                self.path.unlink()
        except OSError:
            pass  # already gone, or the folder became unreadable: nothing left to do
        for folder in self.created:  # a run that failed before writing anything leaves no empty folder
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: it holds the run's files


def note_resume(interrupt: KeyboardInterrupt, state_file: Path, command: str) -> None:
    """Record on a Ctrl-C how to continue the run, once it has a resume state (the CLI's message names it)."""
    if state_file.is_file():
        resume = "distill" if command == "distill" else "train"
        setattr(interrupt, RESUME_HINT, f"sdtool {resume} --resume {state_file.parent}")


def open_folder(run_dir: Path, option: str, run_files: Iterable[str]) -> RunLock:
    """Check `run_dir` can be written, lock it, and remove the temporary files a crash left of `run_files`."""
    check_dir(run_dir, option)
    lock = acquire(run_dir, option)
    remove_stale_temps(run_dir, run_files)
    return lock


def acquire(run_dir: Path, option: str = "--out") -> RunLock:
    """Create `run_dir`/.lock for this process, taking over a stale one; one line naming the holder otherwise."""
    created = _missing_folders(run_dir)
    path = run_dir / LOCK_FILE
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if _create(path, text):
                return RunLock(path, text, created)
            _take_over_stale(path, run_dir)
    except OSError as e:
        RunLock(path, "", created).release()
        raise SdtoolError(
            f"{option} {run_dir}: cannot create its lock file ({e.strerror or e}); choose another folder"
        ) from None
    # Another run took the stale lock between our removing it and creating ours.
    raise SdtoolError(f"{run_dir} was just locked by another sdtool run ({_describe(path)}); use another folder")


def remove_stale_temps(run_dir: Path, run_files: Iterable[str]) -> int:
    """Remove the temporary files a killed writer left in `run_dir` (the caller holds its lock); how many."""
    names, removed = set(run_files), 0
    for p in run_dir.iterdir():
        m = _TEMP.match(p.name)
        # A lock's private copy (`.lock.PID.new`) or a stale lock moved aside (`.lock.stale.PID`), left by a kill.
        lock_leftover = p.name.startswith(LOCK_FILE + ".") and (p.name.endswith(".new") or ".stale." in p.name)
        if (m is not None and m["name"] in names) or p.name.startswith(".sdtool-probe-") or lock_leftover:
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass  # left for the next start; it is never read
    return removed


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _missing_folders(run_dir: Path) -> list[Path]:
    """The folders of `run_dir` that do not exist yet, deepest first."""
    out, p = [], run_dir.absolute()
    while not p.exists() and p.parent != p:
        out.append(p)
        p = p.parent
    return out


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists. The text is written to a private file first and then
    hard-linked into place, so no other start ever sees a lock without its holder (link fails if the name
    exists); where hard links are not supported, an exclusive create is the fallback."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system (e.g. FAT, some network shares)
        return _create_exclusive(path, text)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _read(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when it cannot be read as one."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and info["pid"] > 0
    return info if ok and isinstance(info.get("host"), str) else None


def _describe(path: Path) -> str:
    info = _read(path)
    return "unknown holder" if info is None else f"pid {info['pid']} on {info['host']}, started {info.get('started')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it runs, as another user
        return True
    return True


def _take_over_stale(path: Path, run_dir: Path) -> None:
    """Remove the lock at `path` if its holder is dead on this host; else refuse, naming the holder."""
    text = path.read_text() if path.exists() else ""
    info = _read(path)
    if info is None:
        if not path.exists():
            return  # released meanwhile
        raise SdtoolError(
            f"{path} is not a readable sdtool lock; if no sdtool run writes {run_dir}, delete {path} and start again"
        )
    holder = f"pid {info['pid']} on {info['host']}, started {info.get('started')}"
    if info["host"] != socket.gethostname():
        raise SdtoolError(
            f"{run_dir} is locked by an sdtool run on another host ({holder}); this host cannot tell whether it "
            f"still runs: wait for it or stop it, or if it has ended delete {path}"
        )
    # Our own pid cannot hold another run's lock: the lock is left from an earlier process that had this pid
    # (a restarted container often gets the same one).
    if info["pid"] != os.getpid() and _alive(info["pid"]):
        raise SdtoolError(
            f"{run_dir} is in use by another sdtool run ({holder}); wait for it to end or stop it, "
            "or write to another --out folder"
        )
    # Rename, not unlink: of two starts that judged the same lock stale only one moves it away, so neither can
    # remove a fresh lock the other has just created.
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another start took it over first; the caller tries again
    if aside.read_text() != text:  # a fresh lock replaced the stale one before our rename: put it back
        os.rename(aside, path)
        return
    aside.unlink(missing_ok=True)
    warn(f"removed the stale lock of {run_dir} (pid {info['pid']} on {info['host']} has ended)")
