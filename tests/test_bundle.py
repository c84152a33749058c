"""The early-exit bundle: export, the torch-free runtime, `sdtool predict`, and every refusal.

Exporting takes seconds per model, so one tiny bundle is built per test session and the policy
variants run on in-memory sessions over the same exported pieces.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import make_ckpt
from typer.testing import CliRunner

from sdtool import SdtoolError, checkpoint, runtime
from sdtool.cli import app
from sdtool.deploy import BundleOptions, export_bundle
from sdtool.early_exit import ExitPolicy, confidence, early_exit_forward
from sdtool.engines import bundle_layout
from sdtool.exit_eval import FitOptions
from sdtool.meta import InputSpec
from sdtool.onnx_graphs import model_pieces

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
# Python code run first in a subprocess: `import torch` (and anything below it) fails there.
NO_TORCH = (
    "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, _Block())\n"
)


@pytest.fixture(scope="module", autouse=True)
def export_once():
    """The torch exporter is the slow part (seconds per model); export each model once per module.
    Cutting, identity, hashing, writing and checking still run for every bundle."""
    import hashlib

    import sdtool.onnx_graphs as og

    real, memo = og.export_proto, {}

    def cached(model, size, channels=3):
        h = hashlib.sha256(str(size).encode())
        for k, v in model.state_dict().items():
            h.update(k.encode() + v.detach().cpu().numpy().tobytes())
        if h.hexdigest() not in memo:
            memo[h.hexdigest()] = real(model, size, channels)
        proto = type(memo[h.hexdigest()])()
        proto.CopyFrom(memo[h.hexdigest()])
        return proto

    og.export_proto = cached
    yield
    og.export_proto = real


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("bundle") / "m.safetensors", sharpen=30.0)


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    """A bundle with thresholds fitted on the validation split (its rep, its folder)."""
    out = tmp_path_factory.mktemp("b") / "bundle"
    rep = export_bundle(
        str(ckpt),
        str(out),
        FitOptions(fit=True, max_drop=50.0),
        BundleOptions(threads=1, latency_batch=8, repeats=1),
        quiet=True,
    )
    return rep, out


@pytest.fixture(scope="module")
def model_and_pieces(ckpt):
    model, _ = checkpoint.load(ckpt)
    return model, model_pieces(model, 16, identity={"source_sha256": "x"})


def _session(model_and_pieces, pol):
    model, pieces = model_and_pieces
    manifest, graphs = bundle_layout(pieces, pol, InputSpec(16, 3, [0.5] * 3, [0.25] * 3), 10, "x")
    return runtime.EarlyExitSession.from_memory(manifest, graphs, threads=1)


def _median_thresholds(model, policy):
    """Per shallow exit, a threshold that splits X's rows: the median confidence (policy units), halfway
    between two rows (X has an even number of rows), so no row sits on it."""
    with torch.no_grad():
        logits, _ = model(X)
    med = [float(torch.quantile(confidence(z, policy).double(), 0.5)) for z in logits[:-1]]
    return med if policy == "max_softmax" else [-m for m in med]


def test_bundle_files_manifest_and_check(bundle, ckpt):
    rep, out = bundle
    names = sorted(p.name for p in out.iterdir())
    assert names == rep["files"] and "manifest.json" in names and runtime.RUNTIME_FILE in names
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == runtime.BUNDLE_FORMAT and m["source"]["sha256"] == checkpoint.sha256(ckpt)
    assert m["source"]["lineage"][0]["command"] == "train"
    assert m["input"]["size"] == 16 and m["input"]["mean"] == [0.5] * 3 and m["class_names"][0] == "0"
    assert m["runtime_settings"]["allow_spinning"] is False and m["runtime_settings"]["intra_op_threads"] == 1
    for s in m["steps"]:  # every graph hashed, MACs and measured latency per step
        assert runtime.sha256_bytes((out / s["file"]).read_bytes()) == s["sha256"]
        assert s["macs"]["leave"] > 0 and set(s["latency_ms_per_image"]) == {"1", "8"}
        for t in s["latency_ms_per_image"].values():  # median with the fastest and slowest repeat
            assert t["stages_min"] <= t["stages"] <= t["stages_max"] and t["head_min"] <= t["head"] <= t["head_max"]
    for b in ("1", "8"):
        lo, med, hi = (m[f"deepest_latency_ms_per_image{s}"][b] for s in ("_min", "", "_max"))
        assert 0 < lo <= med <= hi
    assert rep["check"]["max_abs_diff"] <= 1e-4 and rep["check"]["same_exit_choices"] and rep["fit"]["n"] == 100
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bundle_logits_equal_torch_per_exit(bundle, ckpt):
    _, out = bundle
    model, _ = checkpoint.load(ckpt)
    sess = runtime.EarlyExitSession(out, threads=1)
    with torch.no_grad():
        ref, _ = model(X)
    got = sess.run_exits(X.numpy())
    for g, r, s in zip(got, ref, sess.steps):
        if s["logits"] is None:
            assert g is None  # an exit that never answers ships no head
        else:
            assert np.abs(g - r.numpy()).max() <= 1e-4


@pytest.mark.parametrize("policy", ["max_softmax", "entropy"])
@pytest.mark.parametrize("fallback", ["deepest", "ensemble"])
def test_runtime_exit_choices_equal_torch(model_and_pieces, policy, fallback):
    model = model_and_pieces[0]
    values = _median_thresholds(model, policy)
    values[1] = None  # one exit that never answers: a stages-only step (deepest) or head kept (ensemble)
    pol = ExitPolicy(policy, values, fallback)
    sess = _session(model_and_pieces, pol)
    z_t, e_t = early_exit_forward(model, X, pol)
    z_o, e_o = sess.predict(X.numpy())
    assert len(set(e_t.tolist())) > 1  # the thresholds really split the batch
    with torch.no_grad():
        logits, _ = model(X)
    score = [confidence(z, policy) for z in logits[:-1]]
    thr = pol.score_thresholds()
    for i in range(len(X)):  # a different choice only where a confidence is within 1e-5 of a threshold
        if int(e_t[i]) != int(e_o[i]):
            assert any(abs(float(score[k][i]) - thr[k]) < 1e-5 for k in range(len(thr)))
        else:
            assert np.abs(z_o[i] - z_t[i].numpy()).max() <= 1e-4
    for i in range(len(X)):  # batch 1 gives the same answers
        z1, e1 = sess.predict(X[i : i + 1].numpy())
        assert int(e1[0]) == int(e_o[i]) and np.abs(z1[0] - z_o[i]).max() <= 1e-4


def test_uint8_images_are_normalized_like_training(bundle, ckpt):
    _, out = bundle
    sess = runtime.EarlyExitSession(out, threads=1)
    img = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x = (torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    np.testing.assert_allclose(sess.prepare(img), x.numpy(), atol=1e-6)
    z_u, e_u = sess.predict(img)
    z_f, e_f = sess.predict(x.numpy())
    assert (e_u == e_f).all() and np.abs(z_u - z_f).max() <= 1e-5


def test_runtime_needs_no_torch(bundle, tmp_path):
    """The copy in the bundle runs with torch unimportable, and importing sdtool.runtime imports no torch."""
    _, out = bundle
    code = NO_TORCH + (
        f"sys.path.insert(0, {str(out)!r})\n"
        "import numpy as np\nfrom sdtool_runtime import EarlyExitSession\n"
        f"s = EarlyExitSession({str(out)!r}, threads=1)\n"
        "z, e = s.predict(np.zeros((3, 16, 16, 3), np.uint8))\n"
        "print(z.shape, e.tolist(), 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("(3, 10)")[1].strip().endswith("False")
    code = NO_TORCH + "import sdtool.runtime\nprint('torch' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_onnxruntime_missing_is_one_line(bundle, tmp_path):
    _, out = bundle
    block = NO_TORCH.replace("name == 'torch' or name.startswith('torch.')", "name == 'onnxruntime'")
    code = block + (
        "from sdtool.runtime import EarlyExitSession, BundleError\n"
        f"try:\n    EarlyExitSession({str(out)!r})\nexcept BundleError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "pip install onnxruntime" in r.stdout, r.stderr


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _refused(folder, match: str) -> None:
    with pytest.raises(SdtoolError, match=match):
        runtime.EarlyExitSession(folder, threads=1)


def test_damaged_bundles_are_refused(bundle, tmp_path, ckpt):
    _, out = bundle
    _refused(tmp_path, "is not an early-exit bundle")  # a folder without a manifest
    _refused(tmp_path / "nope", "is not a folder")
    b = _copy(out, tmp_path)
    (b / "manifest.json").write_text("{not json")
    _refused(b, "not valid JSON")
    shutil.rmtree(b)
    b = _copy(out, tmp_path)
    _edit_manifest(b, lambda m: m.update(format="something else"))
    _refused(b, "not an sdtool early-exit bundle manifest")
    shutil.rmtree(b)
    for field, value, match in [
        ("input", {"size": 16, "channels": 3, "mean": ["a"] * 3, "std": [1] * 3}, "input spec"),
        ("class_names", ["0"], "class_names"),
        ("source", "x", "source"),
        ("num_classes", 7, "gives 10 logits but the manifest says 7"),
    ]:
        b = _copy(out, tmp_path)
        _edit_manifest(
            b,
            lambda m, f=field, v=value: (
                m.update({f: v}) if f != "num_classes" else m.update(num_classes=v, class_names=None)
            ),
        )
        _refused(b, match)
        shutil.rmtree(b)
    b = _copy(out, tmp_path)
    _edit_manifest(b, lambda m: m["steps"][0].update(file="../m.safetensors"))
    _refused(b, "not a graph file inside the bundle")
    shutil.rmtree(b)
    b = _copy(out, tmp_path)
    step1 = b / "step1.onnx"
    data = bytearray(step1.read_bytes())
    data[-10] ^= 0xFF
    step1.write_bytes(bytes(data))
    _refused(b, "does not match its sha256")
    step1.unlink()
    _refused(b, "is missing")


def test_graph_from_another_model_is_refused(bundle, tmp_path, model_and_pieces):
    """Even with its hash written into the manifest, a graph from another export does not pass."""
    _, out = bundle
    b = _copy(out, tmp_path)
    other = model_and_pieces[1].step(0)  # same architecture, other source identity
    (b / "step1.onnx").write_bytes(other)
    _edit_manifest(b, lambda m: m["steps"][0].update(sha256=runtime.sha256_bytes(other)))
    _refused(b, "a graph from another model")


def test_external_data_is_refused(bundle, tmp_path, monkeypatch):
    from onnx import TensorProto

    _, out = bundle
    b = _copy(out, tmp_path)
    proto = onnx.load_from_string((b / "step1.onnx").read_bytes())
    init = next(t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    e = init.external_data.add()
    e.key, e.value = "location", "weights.bin"
    (b / "weights.bin").write_bytes(b"\0" * 4096)
    data = proto.SerializeToString()
    (b / "step1.onnx").write_bytes(data)
    _edit_manifest(b, lambda m: m["steps"][0].update(sha256=runtime.sha256_bytes(data)))
    assert runtime.has_external_data(data) and not runtime.has_external_data((out / "step1.onnx").read_bytes())
    _refused(b, "external data")
    monkeypatch.chdir(b)  # where ONNX Runtime would find weights.bin for a graph loaded from bytes
    _refused(b, "external data")
    # the second guard alone: ONNX Runtime, pointed at an empty folder, does not read weights.bin either
    so, _ = runtime.session_options(1)
    monkeypatch.setattr(runtime, "has_external_data", lambda data: False)
    with pytest.raises(SdtoolError, match="external data|not a loadable ONNX graph"):
        runtime.make_session(data, so, "step1.onnx")


def test_wrong_inputs_are_refused(bundle, model_and_pieces):
    _, out = bundle
    sess = runtime.EarlyExitSession(out, threads=1)
    for bad, match in [
        (np.zeros((2, 32, 32, 3), np.uint8), r"must be \(N, 16, 16, 3\)"),
        (np.zeros((2, 16, 16, 1), np.uint8), r"must be \(N, 16, 16, 3\)"),
        (np.zeros((2, 1, 16, 16), np.float32), "float input must be normalized"),
        (np.zeros((2, 16, 16, 3), np.int32), "must be uint8"),
    ]:
        with pytest.raises(SdtoolError, match=match):
            sess.predict(bad)
    skipping = _session(model_and_pieces, ExitPolicy("max_softmax", [0.5, None, 0.5], "deepest"))
    assert skipping.steps[1]["logits"] is None and skipping.steps[1]["file"] == "stages2.onnx"
    with pytest.raises(SdtoolError, match="exit 2 has no head in this bundle"):
        skipping.set_thresholds([0.5, 0.5, 0.5])
    with pytest.raises(SdtoolError, match="3 thresholds are needed"):
        skipping.set_thresholds([0.5])


def test_export_refuses_a_used_folder_and_leaves_nothing(ckpt, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = runner.invoke(app, ["export", str(ckpt), "--early-exit", "--out", str(busy)])
    assert r.exit_code == 1 and "not an empty folder" in r.output and (busy / "keep.txt").exists()
    r = runner.invoke(app, ["export", str(ckpt), "--early-exit", "--out", str(tmp_path / "b")])  # no thresholds
    assert r.exit_code == 1 and "has no fitted thresholds" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_predict_image_files(bundle, ckpt, tmp_path):
    """Real CIFAR-10 test images as PNG and JPEG files, resized to the tiny model's 16x16."""
    from PIL import Image

    _, out = bundle
    if CIFAR_TEST.is_file():
        with np.load(CIFAR_TEST, allow_pickle=False) as d:
            imgs = d["x"][:3]
    else:  # pragma: no cover - the data copy is beside every checkout that runs the suite
        imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    files = []
    for i, a in enumerate(imgs):
        f = tmp_path / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
        Image.fromarray(a).save(f)
        files.append(str(f))
    r = runner.invoke(app, ["predict", str(out), *files, "--json"])
    assert r.exit_code == 1 and "is 32x32 but the model takes 16x16" in r.output
    r = runner.invoke(app, ["predict", str(out), *files, "--resize", "--json", "--top", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["images"] == 3 and rep["engine"]["engine"] == "onnxruntime"
    sess = runtime.EarlyExitSession(out, threads=1)
    z, e = sess.predict(runtime.load_images(files, 16, 3, resize=True))
    for row, zi, ei in zip(rep["predictions"], z, e):
        assert row["class"] == int(zi.argmax()) and row["exit"] == int(ei) + 1 and len(row["top"]) == 2
        assert row["file"].endswith((".png", ".jpg"))
    r = runner.invoke(app, ["predict", str(ckpt), *files, "--resize", "--json"])  # the checkpoint, in torch
    assert r.exit_code == 0 and json.loads(r.stdout)["engine"]["engine"] == "torch"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = runner.invoke(app, ["predict", str(out), str(tmp_path / "bad.png")])
    assert r.exit_code == 1 and "is not a readable image" in r.output
    r = runner.invoke(app, ["predict", str(tmp_path), files[0]])
    assert r.exit_code == 1 and "is not an early-exit bundle" in r.output
    np.save(tmp_path / "arr.npy", np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "arr.npy").rename(tmp_path / "renamed.npz")
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for f in ("renamed.npz", "zip.npz"):
        r = runner.invoke(app, ["predict", str(out), str(tmp_path / f)])
        assert r.exit_code == 1 and "is not a readable npz file" in r.output, r.output


@pytest.mark.slow
def test_pruned_and_one_exit_models_bundle(ckpt, tmp_path):
    """A pruned model (structure from the recorded shapes) and an `export --exit` model bundle too."""
    from sdtool.export import export
    from sdtool.prune import PruneOptions, prune_checkpoint

    pruned = tmp_path / "pruned.safetensors"
    prune_checkpoint(str(ckpt), str(pruned), PruneOptions(ratio=0.5), evaluate=False)
    ee = tmp_path / "ee.safetensors"
    model, meta = checkpoint.load(pruned)
    meta = checkpoint.derived_meta(meta)
    meta["thresholds"] = {
        "policy": "max_softmax",
        "values": _median_thresholds(model, "max_softmax"),
        "fallback": "deepest",
    }
    checkpoint.save(ee, model, meta)
    rep = export_bundle(str(ee), str(tmp_path / "pb"), run=BundleOptions(threads=1, repeats=0), quiet=True)
    assert rep["check"]["max_abs_diff"] <= 1e-4
    model, meta = checkpoint.load(ee)
    sess = runtime.EarlyExitSession(tmp_path / "pb", threads=1)
    pol = ExitPolicy(meta["thresholds"]["policy"], meta["thresholds"]["values"], "deepest")
    z_t, e_t = early_exit_forward(model, X, pol)
    z_o, e_o = sess.predict(X.numpy())
    assert (e_t.numpy() == e_o).all() and np.abs(z_o - z_t.numpy()).max() <= 1e-4
    one = tmp_path / "exit2.safetensors"
    export(str(ckpt), str(one), "safetensors", exit=2, check=False)
    rep = export_bundle(str(one), str(tmp_path / "ob"), run=BundleOptions(threads=1, repeats=0), quiet=True)
    assert rep["exits"] == 1 and rep["check"]["max_abs_diff"] <= 1e-4
    z, e = runtime.EarlyExitSession(tmp_path / "ob", threads=1).predict(X.numpy())
    with torch.no_grad():
        ref = checkpoint.load(ckpt)[0].forward_until(X, 1)
    assert (e == 0).all() and np.abs(z - ref.numpy()).max() <= 1e-4


def test_eval_engines_agree(bundle, ckpt):
    """eval --early-exit in onnxruntime and in torch: the same thresholds give the same accuracy."""
    from sdtool.exit_eval import RunOptions, eval_early_exit

    _, out = bundle
    m = json.loads((out / "manifest.json").read_text())
    ee = Path(out).parent / "ee.safetensors"
    model, meta = checkpoint.load(ckpt)
    meta = checkpoint.derived_meta(meta)
    meta["thresholds"] = {"policy": "max_softmax", "values": m["policy"]["values"], "fallback": "deepest"}
    checkpoint.save(ee, model, meta)
    reps = {
        e: eval_early_exit(
            str(ee),
            RunOptions(device="cpu", latency_images=4, repeats=1, engine=e, threads=1, batch_size=25),
            quiet=True,
        )
        for e in ("torch", "onnxruntime")
    }
    assert abs(reps["torch"]["top1"] - reps["onnxruntime"]["top1"]) <= 0.05 * 100 / reps["torch"]["n"] + 1e-9
    for e, rep in reps.items():
        assert rep["engine"] == e and rep["timing"]["engine"]["engine"] == e
        assert rep["expected_ms"] > 0 and rep["predicted_speedup"] > 0 and rep["wall_clock_speedup"]["batch_n"] > 0
    t = reps["torch"]["timing"]["engine"]
    assert t["batchnorm_folded"] is True and t["memory_format"] == "channels_last" and "omp_wait_policy" in t


def test_batchnorm_folding_keeps_outputs(ckpt):
    from sdtool.engines import fold_batchnorm

    model, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        model.train()
        model(torch.randn(32, 3, 16, 16))  # non-trivial running statistics
        model.eval()
        folded = fold_batchnorm(model)
        ref, _ = model(X)
        got, _ = folded(X)
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(folded) < n_bn(model) / 2
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for k in range(model.num_exits):
        torch.testing.assert_close(folded.forward_until(X, k), ref[k], atol=1e-4, rtol=1e-4)


def test_profile_onnxruntime_engine(ckpt):
    from sdtool.profile import ProfileOptions, profile

    rep = profile(str(ckpt), ProfileOptions(batch=4, warmup=1, repeats=2, threads=1, engine="onnxruntime"))
    lat = rep["latency"]
    assert lat["engine"]["engine"] == "onnxruntime" and lat["threads"] == 1
    assert [r["name"] for r in lat["exits"]] == ["exit 1", "exit 2", "exit 3", "exit 4"]
    assert all(r["latency_ms"]["1"] > 0 and r["latency_ms"]["4"] > 0 for r in lat["exits"] + [lat["full"]])


def test_cli_threads_value_checked(ckpt):
    r = runner.invoke(app, ["eval", str(ckpt), "--early-exit", "--fit-thresholds", "--threads", "0"])
    assert r.exit_code == 1 and "--threads must be at least 1" in r.output
    r = runner.invoke(app, ["eval", str(ckpt), "--engine", "onnxruntime"])
    assert r.exit_code == 1 and "add --early-exit" in r.output
    r = runner.invoke(app, ["export", str(ckpt), "--out", "x.onnx", "--format", "onnx", "--max-drop", "1"])
    assert r.exit_code == 1 and "belong to --early-exit" in r.output


def test_latency_costs_change_the_fit():
    """Injected costs: exit 1 is cheap in MACs but its head is slow in time; exit 2 pays off in both.
    Fitting for MACs uses exit 1; fitting for latency switches it off and keeps exit 2."""
    from sdtool import thresholds as th

    n = 100
    y = torch.zeros(n, dtype=torch.long)

    def exit_logits(right: int) -> torch.Tensor:
        z = torch.zeros(n, 10)
        z[:right, 0] = 8.0  # right and confident
        z[right:, 1] = 0.1  # wrong and unsure
        return z

    logits = [exit_logits(60), exit_logits(80), exit_logits(90)]
    costs = {
        "exits": [
            {"stages_macs": 10, "head_macs": 2},
            {"stages_macs": 20, "head_macs": 2},
            {"stages_macs": 40, "head_macs": 0},
        ],
        "reference": {"macs": 40},
    }
    times = {"stages_ms": [1.0, 1.0, 2.0], "head_ms": [10.0, 0.1, 0.0], "deepest_ms": 4.0}
    fits = {}
    for cost in ("macs", "latency"):
        t = th.make_table(logits, y, costs, "max_softmax", "deepest", "logits", times=times, cost=cost)
        fits[cost] = th.fit(t, "max_softmax", max_drop=0.0)
    assert fits["macs"]["values"][0] is not None and fits["macs"]["top1"] == 90.0
    assert fits["latency"]["values"][0] is None and fits["latency"]["values"][1] is not None
    assert fits["latency"]["top1"] == 90.0
    # 80 rows leave at exit 2 (1 + 1 + 0.1 ms), 20 go on (4 + 0.1 ms): predicted 4.0 / 2.5 ms
    assert fits["latency"]["expected_ms"] == pytest.approx(0.8 * 2.1 + 0.2 * 4.1)
    assert fits["latency"]["predicted_speedup"] == pytest.approx(4.0 / (0.8 * 2.1 + 0.2 * 4.1))
    assert fits["macs"]["expected_ms"] > fits["latency"]["expected_ms"]
    with pytest.raises(SdtoolError, match="needs measured piece times"):
        th.make_table(logits, y, costs, "max_softmax", "deepest", "logits", cost="latency")
