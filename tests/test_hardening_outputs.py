"""Output paths that cannot be written: every command refuses them in one line and writes nothing.

Each case runs the real CLI in-process and expects exit status 1, a last output line `error: ...` that
names the path, no traceback, and no new or changed file anywhere under the test's folder. The tests run
as root here, where permission bits do not stop a write, so read-only file systems, permission errors
and full disks are simulated by making the OS calls fail (`tempfile.mkstemp`/`mkdtemp`, `os.statvfs`,
`os.replace`) for paths under the test's folder only.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sdtool.checkpoint
import sdtool.engine
from sdtool.cli import app

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "tests" / "data" / "ckpt" / "thresholds.safetensors"  # fitted thresholds, fake 16x16 data
FIT = ["--early-exit", "--fit-thresholds", "--device", "cpu", "--latency-images", "0"]

runner = CliRunner()


def _under(p, root: Path) -> bool:
    return p is not None and Path(p).resolve().is_relative_to(root.resolve())


def _dir_arg(args, kwargs):
    """The `dir` of tempfile.mkstemp/mkdtemp, given by name or (TemporaryDirectory) by position."""
    return kwargs.get("dir", args[2] if len(args) > 2 else None)


def _fail_mkstemp(mp, root: Path, code: int) -> None:
    """Creating a file in a folder under `root` fails with `code` (EROFS, EACCES): the output checks' probe."""
    real = tempfile.mkstemp

    def fake(*args, **kwargs):
        if _under(_dir_arg(args, kwargs), root):
            raise OSError(code, os.strerror(code), str(_dir_arg(args, kwargs)))
        return real(*args, **kwargs)

    mp.setattr(tempfile, "mkstemp", fake)


def _fail_mkdtemp(mp, root: Path, code: int) -> None:
    real = tempfile.mkdtemp

    def fake(*args, **kwargs):
        if _under(_dir_arg(args, kwargs), root):
            raise OSError(code, os.strerror(code), str(_dir_arg(args, kwargs)))
        return real(*args, **kwargs)

    mp.setattr(tempfile, "mkdtemp", fake)


def _full_disk(mp, root: Path) -> None:
    """statvfs reports no free space under `root`: refused by the free-space check before any work."""
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 0, 4096

    mp.setattr(os, "statvfs", lambda p: Full() if _under(p, root) else real(p))


def _fills_up(mp, root: Path) -> None:
    """The checks pass; the final rename of a written file under `root` fails with ENOSPC (disk full)."""
    real = os.replace

    def fake(src, dst, *args, **kwargs):
        if _under(dst, root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    mp.setattr(os, "replace", fake)


def _no_work(mp) -> None:
    """A refusal must come before the checkpoint is read or training starts."""

    def boom(*a, **k):
        raise RuntimeError("work started before the output was checked")

    mp.setattr(sdtool.checkpoint, "load_checkpoint", boom)
    mp.setattr(sdtool.engine, "fit", boom)


def _a_file(t: Path) -> Path:
    (t / "afile").write_text("x")
    return t / "afile"


def _a_folder(t: Path) -> Path:
    (t / "adir").mkdir()
    (t / "adir" / "keep.txt").write_text("x")
    return t / "adir"


# (id, args from the tmp folder and the copied checkpoint, the simulated failure, whether the refusal must
# come before any work). The error names --out's path, or --sweep-out's for ids `<command>-sweep-...`.
CASES = [
    ("prune-out-is-folder", lambda t, c: ["prune", c, "--ratio", "0.5", "--out", _a_folder(t)], None, True),
    (
        "prune-below-file",
        lambda t, c: ["prune", c, "--ratio", "0.5", "--out", _a_file(t) / "p.safetensors"],
        None,
        True,
    ),
    (
        "prune-read-only",
        lambda t, c: ["prune", c, "--ratio", "0.5", "--out", t / "new" / "p.safetensors"],
        "erofs",
        True,
    ),
    ("export-st-eacces", lambda t, c: ["export", c, "--out", t / "e.safetensors"], "eacces", True),
    ("export-st-full", lambda t, c: ["export", c, "--exit", "2", "--out", t / "e.safetensors"], "full", True),
    ("export-st-fills-up", lambda t, c: ["export", c, "--out", t / "e.safetensors"], "fills", False),
    ("export-onnx-out-is-folder", lambda t, c: ["export", c, "--format", "onnx", "--out", _a_folder(t)], None, True),
    (
        "export-onnx-read-only",
        lambda t, c: ["export", c, "--format", "onnx", "--out", t / "o" / "e.onnx"],
        "erofs",
        True,
    ),
    (
        "export-onnx-tmp-read-only",
        lambda t, c: ["export", c, "--format", "onnx", "--out", t / "e.onnx"],
        "mkdtemp",
        False,
    ),
    ("bundle-out-is-file", lambda t, c: ["export", c, "--early-exit", "--out", _a_file(t)], None, True),
    ("bundle-below-file", lambda t, c: ["export", c, "--early-exit", "--out", _a_file(t) / "b"], None, True),
    ("bundle-read-only", lambda t, c: ["export", c, "--early-exit", "--out", t / "b"], "erofs", True),
    ("bundle-full", lambda t, c: ["export", c, "--early-exit", "--out", t / "b"], "full", True),
    (
        "bundle-sweep-below-file",
        lambda t, c: [
            "export",
            c,
            "--early-exit",
            "--fit-thresholds",
            "--sweep-out",
            _a_file(t) / "s",
            "--out",
            t / "b",
        ],
        None,
        True,
    ),
    ("bundle-fills-up", lambda t, c: ["export", c, "--early-exit", "--out", t / "b"], "fills", False),
    (
        "eval-out-below-file-sweep-ok",
        lambda t, c: ["eval", c, *FIT, "--sweep-out", t / "sw", "--out", _a_file(t) / "ee.safetensors"],
        None,
        True,
    ),
    (
        "eval-sweep-is-file",
        lambda t, c: ["eval", c, *FIT, "--sweep-out", _a_file(t), "--out", t / "ee.safetensors"],
        None,
        True,
    ),
    ("eval-out-eacces", lambda t, c: ["eval", c, *FIT, "--out", t / "x" / "ee.safetensors"], "eacces", True),
    ("eval-sweep-full", lambda t, c: ["eval", c, *FIT, "--sweep-out", t / "sw"], "full", True),
    (
        "eval-out-fills-up-no-sweep",
        lambda t, c: ["eval", c, *FIT, "--sweep-out", t / "sw", "--out", t / "ee.safetensors"],
        "fills",
        False,
    ),
    (
        "pipeline-out-is-file",
        lambda t, c: ["pipeline", ROOT / "recipes" / "pipeline_quickstart.yaml", "--out", _a_file(t)],
        None,
        True,
    ),
    (
        "pipeline-read-only",
        lambda t, c: ["pipeline", ROOT / "recipes" / "pipeline_quickstart.yaml", "--out", t / "pl"],
        "erofs",
        True,
    ),
]


def _tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root` with what would show a change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


@pytest.mark.parametrize(("case", "make", "fault", "early"), CASES, ids=[c[0] for c in CASES])
def test_unwritable_output_is_refused_and_nothing_is_written(case, make, fault, early, tmp_path, monkeypatch):
    option = "--sweep-out" if case.split("-")[1] == "sweep" else "--out"  # the one the error must name
    ckpt = tmp_path / "m.safetensors"
    shutil.copyfile(CKPT, ckpt)
    args = [str(a) for a in make(tmp_path, ckpt)]
    named = args[args.index(option) + 1]
    before = _tree(tmp_path)
    if fault in ("erofs", "eacces"):
        _fail_mkstemp(monkeypatch, tmp_path, errno.EROFS if fault == "erofs" else errno.EACCES)
    elif fault == "mkdtemp":
        _fail_mkdtemp(monkeypatch, tmp_path, errno.EROFS)
    elif fault == "full":
        _full_disk(monkeypatch, tmp_path)
    elif fault == "fills":
        _fills_up(monkeypatch, tmp_path)
    if early:
        _no_work(monkeypatch)

    r = runner.invoke(app, args)

    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last, last
    reason = {
        "erofs": "read-only",
        "eacces": "permission denied",
        "full": "mb free",
        "fills": "no space left",
        "mkdtemp": "read-only",
    }
    assert reason.get(fault, "") in last.lower(), last  # fileio spells the OS reason its own way
    assert _tree(tmp_path) == before


def test_a_write_error_wrapped_by_an_exporter_is_found_and_others_are_not():
    from sdtool.outputs import os_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/model.onnx")
        except OSError as e:
            raise RuntimeError("exporter failed") from e
    except RuntimeError as wrapped:
        assert os_error(wrapped) is not None and os_error(wrapped).errno == errno.ENOSPC
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "no such file", "some/cache")  # handled inside the exporter
        except OSError:
            raise RuntimeError("unsupported operator") from None
    except RuntimeError as own:
        assert os_error(own) is None  # the exporter's own failure stays its own


def test_staged_files_leave_nothing_when_the_main_write_fails(tmp_path):
    from sdtool import SdtoolError
    from sdtool.outputs import staged_write

    def stage(st):
        st.path(st.folder(tmp_path / "a" / "b") / "f.txt").write_text("x")

    def main_write():
        raise SdtoolError("cannot write main")

    with pytest.raises(SdtoolError, match="cannot write main"):
        staged_write(stage, main_write)
    assert list(tmp_path.iterdir()) == []  # the staged file and the folders made for it are gone
    assert staged_write(stage, lambda: 7) == 7
    assert (tmp_path / "a" / "b" / "f.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "b" / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
