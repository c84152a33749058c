"""Run folders of `sdtool train` / `sdtool distill` under hostile conditions. Every case ends in one of:

    refused      exit 1, the last line one `error: ...` line, no traceback
    tolerated    exit 0, the expected number of `warning: ...` lines (e.g. a torn metrics line dropped)
    interrupted  exit 130, the last line `interrupted...` (naming `--resume DIR` once a resume state exists)

and changes nothing in the tree beyond the files the case allows (a snapshot before and after). Classes:
an --out that cannot be written (4), non-finite weights or losses (5), two writers on one folder (6), torn
writes, stale temporary files, file modes and Ctrl-C (7).

The tests run as root, so read-only folders, permissions and full disks are simulated by monkeypatching
tempfile.mkstemp, os.open, os.replace and os.statvfs. Runs are in-process (CliRunner); only the lock holder,
the torn-write and the kill cases start real processes.
"""

import errno
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from sdtool import checkpoint, fileio, trainloop
from sdtool.cli import app
from sdtool.trainstate import read_scalars

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "data.name=fake",
    "data.fake_size=64",
    "data.input_size=16",
    "model.width=4",
    "train.epochs=2",
    "train.limit_batches=2",
    "data.val_size=16",
    "data.batch_size=16",  # 48 training images: 3 batches, 2 of them an epoch (steps 1-2, then 3-4)
    "train.threads=1",
]
SETS = [a for s in TINY for a in ("--set", s)]
RUN_FILES = {"recipe.yaml", "run.json", "metrics.jsonl", "last.safetensors", "best.safetensors"}
RUN_FILES |= {"train_state.safetensors"}


# ---------------------------------------------------------------------------------------------- helpers


def cli(*args: str):
    return CliRunner().invoke(app, [*args, "--json"])


def train(out: Path, *extra: str):
    return cli("train", RECIPE, "--out", str(out), *SETS, *extra)


def resume(run: Path):
    return cli("train", "--resume", str(run))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: (size, mtime, mode) of files, "dir" for folders."""
    out: dict[str, tuple] = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def check(res, outcome: str, root: Path, before: dict, allowed=(), warnings: int = 0, match: str = "") -> list[str]:
    """The outcome, the message and the tree's changes (each one allowed by a pattern); the output's lines."""
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert "Traceback" not in res.output and isinstance(res.exception, (SystemExit, type(None))), res.output
    if outcome == "refused":
        assert res.exit_code == 1, res.output
        assert lines[-1].startswith("error: ") and match in lines[-1], res.output
    elif outcome == "tolerated":
        assert res.exit_code == 0, res.output
        assert sum(x.startswith("warning: ") for x in lines) == warnings, res.output
        assert all(match in x for x in lines if x.startswith("warning: ")), res.output
    else:
        assert outcome == "interrupted" and res.exit_code == 130, res.output
        assert lines[-1].startswith("interrupted") and match in lines[-1], res.output
    after = snapshot(root)
    extra = {p for p in changed(before, after) if not any(fnmatch.fnmatch(p, pat) for pat in allowed)}
    assert not extra, f"unexpected changes: {sorted(extra)}"
    new = [p for p in changed(before, after) if p in after]
    assert not [p for p in after if p.endswith(".lock")] + [p for p in new if p.endswith(".tmp")], sorted(after)
    assert not [p for p in new if after[p][0] == 0], "a 0-byte file"
    return lines


def at_step(monkeypatch, step: int, action) -> None:
    """`action(run)` right after global training step `step` (1-based: epoch 2's last step is 4)."""
    real = trainloop._train_step

    def wrapped(run, x, y):
        out = real(run, x, y)
        if run.progress.step == step:
            action(run)
        return out

    monkeypatch.setattr(trainloop, "_train_step", wrapped)


def interrupt(run) -> None:
    raise KeyboardInterrupt


def nan_weight(run) -> None:
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))


def inf_buffer(run) -> None:
    bn = next(m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(float("inf"))


def finite_files(run: Path) -> bool:
    return all(
        all(bool(torch.isfinite(t).all()) for t in checkpoint.load_tensors(p).values() if t.is_floating_point())
        for p in run.glob("*.safetensors")
    )


def rows(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def last_epoch(run: Path) -> int | None:
    last = run / "last.safetensors"
    return checkpoint.read_meta(last)["metrics"]["epoch"] if last.exists() else None


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory) -> Path:
    """A run folder stopped by Ctrl-C in epoch 2: its resume state holds epoch 1."""
    run = tmp_path_factory.mktemp("cut") / "run"
    with pytest.MonkeyPatch.context() as m:
        at_step(m, 3, interrupt)
        res = train(run)
    assert res.exit_code == 130 and f"sdtool train --resume {run}" in res.output, res.output
    assert rows(run) == [1] and not (run / ".lock").exists()
    return run


@pytest.fixture
def run_copy(cut_run, tmp_path) -> Path:
    shutil.copytree(cut_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def teacher(cut_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    shutil.copy(cut_run / "last.safetensors", path)
    return path


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def fail_replace_of(name: str, code: int = errno.ENOSPC):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    return replace


def fail_lock_open(code: int = errno.EROFS):
    real = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code))
        return real(path, flags, *args, **kwargs)

    return open_


def fail_lock_link(code: int = errno.EROFS):
    """The lock is hard-linked into place where the file system allows (sdtool.runlock._create)."""
    real = os.link

    def link(src, dst, *args, **kwargs):
        if str(dst).endswith(".lock"):
            raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    return link


# ------------------------------------------------------- class 4: an --out that cannot be written (train/distill)


def _setup_file(tmp):
    (tmp / "out").write_text("a file")
    return tmp / "out"


def _setup_below_file(tmp):
    (tmp / "f").write_text("a file")
    return tmp / "f" / "run"


OUT_CASES = {
    # name: (command, where --out points, patches, message, changes allowed)
    "out_is_a_file": ("train", _setup_file, {}, "is a file, not a folder", ()),
    "out_below_a_file": ("train", _setup_below_file, {}, "is a file, not a folder", ()),
    "read_only": (
        "train",
        lambda t: t / "new" / "run",
        {(tempfile, "mkstemp"): fail_with(errno.EROFS)},
        "read-only",
        (),
    ),
    "permission_denied": ("train", lambda t: t / "run", {(tempfile, "mkstemp"): fail_with(errno.EACCES)}, "denied", ()),
    "disk_full_estimate": (
        "train",
        lambda t: t / "new" / "run",
        {(os, "statvfs"): lambda p: SimpleNamespace(f_bavail=1, f_frsize=4096)},
        "MB free",
        (),
    ),
    "disk_full_recipe_write": (
        "train",
        lambda t: t / "run",
        {(os, "replace"): fail_replace_of("recipe.yaml")},
        "recipe.yaml",
        (),
    ),
    "disk_full_last_write": (
        "train",
        lambda t: t / "run",
        {(os, "replace"): fail_replace_of("last.safetensors")},
        "last.safetensors",
        ("run", "run/recipe.yaml", "run/run.json", "run/best.safetensors"),
    ),
    "lock_on_read_only": (
        "train",
        lambda t: t / "run",
        {(os, "open"): fail_lock_open(), (os, "link"): fail_lock_link()},
        "lock file",
        (),
    ),
    "distill_out_is_a_file": ("distill", _setup_file, {}, "is a file, not a folder", ()),
    "distill_read_only": (
        "distill",
        lambda t: t / "run",
        {(tempfile, "mkstemp"): fail_with(errno.EROFS)},
        "read-only",
        (),
    ),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_unwritable_out_is_refused(tmp_path, monkeypatch, teacher, case):
    command, where, patches, match, allowed = OUT_CASES[case]
    out = where(tmp_path)
    before = snapshot(tmp_path)
    for (module, name), fn in patches.items():
        monkeypatch.setattr(module, name, fn)
    if command == "train":
        res = train(out)
    else:  # a teacher that does not exist: the --out check comes first
        res = cli("distill", RECIPE, "--teacher", str(tmp_path / "missing.safetensors"), "--out", str(out), *SETS)
    check(res, "refused", tmp_path, before, allowed, match=match)


def test_unwritable_resume_folder_is_refused(tmp_path, monkeypatch, run_copy):
    before = snapshot(tmp_path)
    monkeypatch.setattr(tempfile, "mkstemp", fail_with(errno.EROFS))
    check(resume(run_copy), "refused", tmp_path, before, match="--resume")


# ------------------------------------------------------------------- class 5: a broken model is never saved as good


def _nan_loss_on_call(n: int):
    real, calls = trainloop.TrainStep.forward, {"n": 0}

    def forward(self, x, y):
        calls["n"] += 1
        loss, parts, deepest = real(self, x, y)
        return (loss * float("nan") if calls["n"] == n else loss), parts, deepest

    return forward


def _nan_val_loss_on_call(n: int):
    real, calls = trainloop.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        rep = real(*args, **kwargs)
        if calls["n"] == n:
            rep["exits"][-1]["loss"] = float("nan")
        return rep

    return evaluate


NAN_CASES = {
    # name: (how, message, epoch `last` holds (None: none written), start from the cut run)
    "weights_nan_last_step_epoch_2": (lambda m: at_step(m, 4, nan_weight), "weights became", 1, False),
    "bn_buffer_inf_epoch_2": (lambda m: at_step(m, 4, inf_buffer), "weights became", 1, False),
    "weights_nan_last_step_epoch_1": (lambda m: at_step(m, 2, nan_weight), "no checkpoint was written", None, False),
    "loss_nan_last_step_epoch_2": (
        lambda m: m.setattr(trainloop.TrainStep, "forward", _nan_loss_on_call(4)),
        "loss became nan at epoch 2, step 2",
        1,
        False,
    ),
    "val_loss_nan_epoch_2": (
        lambda m: m.setattr(trainloop, "evaluate", _nan_val_loss_on_call(2)),
        "val loss of exit 4 became nan",
        1,
        False,
    ),
    "huge_lr": (lambda m: None, "became nan after epoch 1", None, False),
    "resumed_weights_nan": (lambda m: at_step(m, 4, nan_weight), "weights became", 1, True),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_non_finite_model_is_not_saved(tmp_path, monkeypatch, cut_run, case):
    how, match, kept, resumed = NAN_CASES[case]
    run = tmp_path / "run"
    if resumed:
        shutil.copytree(cut_run, run)
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:
        how(m)
        res = resume(run) if resumed else train(run, *(["--set", "train.lr=1.0e+30"] if case == "huge_lr" else []))
    kept_msg = f"last.safetensors holds epoch {kept}, the last good one" if kept else "no checkpoint was written"
    allowed = ["run", "run/*"] if not resumed else ["run/metrics.jsonl"]  # resuming rewrites metrics.jsonl
    lines = check(res, "refused", tmp_path, before, allowed, match=match)
    assert kept_msg in lines[-1]
    assert last_epoch(run) == kept and finite_files(run)
    if kept:
        assert read_scalars(run)["epoch"] + 1 == kept and rows(run) == [kept]
        assert checkpoint.read_meta(run / "best.safetensors")["metrics"]["epoch"] <= kept
    else:
        assert {p.name for p in run.iterdir()} == {"recipe.yaml", "run.json"}


def test_resume_after_a_refused_epoch_restarts_from_good_weights(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        at_step(m, 4, nan_weight)
        assert train(run).exit_code == 1
    before = snapshot(tmp_path)
    check(resume(run), "tolerated", tmp_path, before, ["run/*"])
    assert rows(run) == [1, 2] and last_epoch(run) == 2 and finite_files(run)


# --------------------------------------------------------------------------- class 6: one writer per run folder


HOLD = (
    "import sys, time; from pathlib import Path; from sdtool.runlock import acquire; "
    "acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder():
    """Start a real process that holds the lock of a folder until the test ends."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00", **fields}
    (folder / ".lock").write_text(json.dumps(info))


LOCK_CASES = {
    # name: (the lock there, command, outcome, message)
    "live_holder_train": ("live", "train", "refused", "in use by another sdtool run (pid {pid} on {host}"),
    "live_holder_resume": ("live", "resume", "refused", "in use by another sdtool run (pid {pid} on {host}"),
    "live_holder_distill": ("live", "distill", "refused", "in use by another sdtool run (pid {pid}"),
    "other_host": ("other_host", "resume", "refused", "on another host (pid {pid} on elsewhere.example"),
    "unreadable_lock": ("garbage", "train", "refused", "not a readable sdtool lock"),
    "stale_lock_train": ("stale", "train", "tolerated", "removed the stale lock"),
    "stale_lock_resume": ("stale", "resume", "tolerated", "removed the stale lock"),
}


@pytest.mark.parametrize("case", list(LOCK_CASES))
def test_one_writer_per_run_folder(tmp_path, holder, teacher, cut_run, case):
    kind, command, outcome, match = LOCK_CASES[case]
    run = tmp_path / "run"
    if command == "resume":
        shutil.copytree(cut_run, run)
    stale_temp = run / ".last.safetensors.abcd1234.tmp"
    pid = os.getpid()
    if kind == "live":
        pid = holder(run).pid
    elif kind == "other_host":
        _write_lock(run, host="elsewhere.example")
    elif kind == "stale":
        pid = _dead_pid()
        _write_lock(run, pid=pid)
    else:
        run.mkdir()
        (run / ".lock").write_text('{"pid": 12')
    stale_temp.write_bytes(b"partial")
    before = snapshot(tmp_path)
    if command == "train":
        res = train(run)
    elif command == "resume":
        res = resume(run)
    else:
        res = cli("distill", RECIPE, "--teacher", str(teacher), "--out", str(run), *SETS)
    msg = match.format(pid=pid, host=socket.gethostname())
    if outcome == "refused":
        # Nothing is touched, not even the stale temporary file: only the lock holder may remove it.
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 1 and lines[-1].startswith("error: ") and msg in lines[-1], res.output
        assert not changed(before, snapshot(tmp_path)) and "Traceback" not in res.output
    else:
        check(res, outcome, tmp_path, before, ["run/*"], warnings=1, match=msg)
        assert not stale_temp.exists() and rows(run) == [1, 2]


# ----------------------------------------------------------- class 7: torn writes, stale temporary files, modes, Ctrl-C


TORN_CASES = {
    # name: (what happens to metrics.jsonl, outcome, warnings)
    "half_a_row_of_epoch_2": (lambda t: t + '{"epoch": 2, "lr": 0.0', "tolerated", 1),
    "nul_bytes_after_a_crash": (lambda t: t + "\0" * 32, "tolerated", 1),
    "invalid_utf8_after_a_crash": (lambda t: t + "\udcff\udcfe", "tolerated", 1),
    "the_committed_row_cut": (lambda t: t[: len(t) // 2], "tolerated", 1),
    "no_newline_at_end": (lambda t: t.rstrip("\n"), "tolerated", 0),
    "empty_file": (lambda t: "", "tolerated", 0),
    "damaged_middle_line": (lambda t: "not json\n" + t, "refused", 0),
}


@pytest.mark.parametrize("case", list(TORN_CASES))
def test_resume_after_a_torn_metrics_write(tmp_path, run_copy, case):
    tear, outcome, warnings = TORN_CASES[case]
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(tear(metrics.read_text()), errors="surrogateescape")  # \udcff: the byte 0xff
    before = snapshot(tmp_path)
    res = resume(run_copy)
    if outcome == "refused":
        check(res, "refused", tmp_path, before, match="line 1 is not a metrics row")
    else:
        check(res, "tolerated", tmp_path, before, ["run/*"], warnings=warnings, match="cut short by a crash")
        assert rows(run_copy) == [1, 2]


@pytest.mark.parametrize("fresh", [True, False])
def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path, run_copy, fresh):
    run = tmp_path / "fresh" if fresh else run_copy
    run.mkdir(exist_ok=True)
    stale = [".last.safetensors.k3j_9x2a.tmp", ".train_state.safetensors.00000000.tmp", ".sdtool-probe-abc123"]
    kept = [".notes.abcdefgh.tmp", "my.tmp", "notes.txt"]  # not sdtool's
    for name in stale + kept:
        (run / name).write_bytes(b"x")
    before = snapshot(tmp_path)
    res = train(run) if fresh else resume(run)
    check(res, "tolerated", tmp_path, before, [f"{run.name}", f"{run.name}/*"])
    assert all(not (run / n).exists() for n in stale) and all((run / n).exists() for n in kept)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        fileio.atomic_write_bytes(tmp_path / "f.bin", b"x")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "f.bin").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_run_files_have_one_mode(tmp_path):
    old = os.umask(0o027)
    try:
        assert train(tmp_path / "run").exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert set(modes) == RUN_FILES and set(modes.values()) == {0o640}, modes


INTERRUPT_CASES = {
    # name: (command, step of the Ctrl-C, the line's hint)
    "train_in_epoch_2": ("train", 3, "interrupted; continue with: sdtool train --resume {run}"),
    "train_in_epoch_1": ("train", 1, "interrupted"),
    "distill_in_epoch_2": ("distill", 3, "interrupted; continue with: sdtool distill --resume {run}"),
}


@pytest.mark.parametrize("case", list(INTERRUPT_CASES))
def test_ctrl_c_names_how_to_continue(tmp_path, monkeypatch, teacher, case):
    command, step, hint = INTERRUPT_CASES[case]
    run = tmp_path / "run"
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:
        at_step(m, step, interrupt)
        if command == "train":
            res = train(run)
        else:
            res = cli("distill", RECIPE, "--teacher", str(teacher), "--out", str(run), *SETS)
    lines = check(res, "interrupted", tmp_path, before, ["run", "run/*"])
    assert lines[-1] == hint.format(run=run)
    if step > 2:  # the message's command continues the run
        before = snapshot(tmp_path)
        again = cli(command, "--resume", str(run))
        check(again, "tolerated", tmp_path, before, ["run/*"])
        assert rows(run) == [1, 2]


def _start(out: Path, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdtool", "train", RECIPE, "--out", str(out), *SETS, "--set", f"train.epochs={epochs}"]
    return subprocess.Popen(cmd + ["--json"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(run: Path, proc: subprocess.Popen, n: int = 1) -> None:
    deadline = time.time() + 60
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no metrics row from the real run ({proc.poll()})")


@pytest.mark.slow
def test_real_processes_interrupted_then_resumed(tmp_path):
    """Two real runs (started together: most of their time is importing torch) hold their folders (a second
    writer is refused, naming them), are cut after epoch 1 by Ctrl-C and by kill -9 - which also tears the
    metrics row being written - and resume with one warning per leftover (the torn row; kill -9's stale lock)."""
    runs = {sig: tmp_path / sig.name for sig in (signal.SIGINT, signal.SIGKILL)}
    procs = {sig: _start(run, epochs=100) for sig, run in runs.items()}
    try:
        for sig, proc in procs.items():
            _wait_for_rows(runs[sig], proc)
            second = resume(runs[sig])  # a second writer on the same folder
            assert second.exit_code == 1 and f"(pid {proc.pid} on {socket.gethostname()}" in second.output
            proc.send_signal(sig)
        errs = {sig: proc.communicate(timeout=60)[1] for sig, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    run = runs[signal.SIGINT]
    assert procs[signal.SIGINT].returncode == 130 and not (run / ".lock").exists()
    assert errs[signal.SIGINT].strip().splitlines()[-1] == f"interrupted; continue with: sdtool train --resume {run}"
    assert procs[signal.SIGKILL].returncode == -signal.SIGKILL and (runs[signal.SIGKILL] / ".lock").exists()
    for sig, run in runs.items():
        done = rows(run)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(f'{{"epoch": {done[-1] + 1}, "lr"')  # the row a crash cut short
        recipe = run / "recipe.yaml"  # resume two more epochs only
        recipe.write_text(recipe.read_text().replace("epochs: 100", f"epochs: {done[-1] + 2}"))
        before = snapshot(run)
        res = resume(run)
        check(res, "tolerated", run, before, ["*"], warnings=1 if sig == signal.SIGINT else 2)
        assert rows(run) == list(range(1, done[-1] + 3)) and finite_files(run)


def test_a_lock_left_by_our_own_pid_is_stale(tmp_path):
    """A restarted container often gets the pid of the killed run: that lock is not a live writer."""
    import json as _json
    import socket as _socket

    from sdtool import runlock

    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_FILE).write_text(_json.dumps({"pid": os.getpid(), "host": _socket.gethostname()}))
    (run / ".lock.999.new").write_text("x")  # a kill between writing a lock's private copy and linking it
    lock = runlock.open_folder(run, "--out", [])
    assert _json.loads((run / runlock.LOCK_FILE).read_text())["started"]  # ours now, with its start time
    assert not (run / ".lock.999.new").exists()
    lock.release()
    assert not (run / runlock.LOCK_FILE).exists()


@pytest.mark.parametrize("text", ["{broken", "[1, 2]", '{"init": 5}', b"\xff\xfe".decode("latin-1")])
def test_a_damaged_run_json_is_refused_on_resume(tmp_path, text):
    from typer.testing import CliRunner

    from sdtool.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {width: 4}\n")
    (run / "run.json").write_text(text)
    before = {p: p.read_bytes() for p in run.iterdir()}
    r = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("error: "), r.output
    assert "run.json" in r.output and "Traceback" not in r.output
    assert {p: p.read_bytes() for p in run.iterdir()} == before
