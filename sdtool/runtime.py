"""Early exit on ONNX Runtime with numpy alone: the runtime of an sdtool early-exit bundle.

This module never imports torch (nor anything else of sdtool but, when it is installed, its error
class), so `sdtool export --early-exit` copies it into every bundle as `sdtool_runtime.py` and a
server needs only `pip install numpy onnxruntime` (and Pillow to read image files):

    from sdtool_runtime import EarlyExitSession          # or: from sdtool.runtime import ...
    sess = EarlyExitSession("bundle/")
    logits, exit_index = sess.predict(images)            # uint8 (N, H, W, 3) or normalized float (N, 3, H, W)

A bundle is a folder: `manifest.json` and one ONNX graph per step. Step k runs the backbone stages
between exit k-1 and exit k and, fused into the same graph, exit k's attention, head and classifier;
it returns the stage output `h` (the next step's input) and exit k's logits. One graph per step
means one `run` per exit a sample reaches, which is what makes the wall clock follow the MACs at
batch 1. Between steps the rows that left are dropped from `h` (numpy indexing), so later graphs only
see the samples still undecided; a batch of one simply stops. An exit whose threshold is "never"
(deepest fallback) has a stages-only graph: its head is neither run nor shipped.

Policies (a threshold is in the policy's own unit; null = the exit never answers):
  * max_softmax - leave when max_c softmax(z)_c >= threshold;
  * entropy     - leave when the entropy of softmax(z) (nats) <= threshold.
The fallback answers what no shallow exit took: the deepest exit, or the ensemble of all exits (mean
of the logits, or log of the mean softmax), which needs every head.

Checks, each ending in one `BundleError` line: the manifest's format and fields; every graph's
sha256 against the manifest (graphs are read as bytes and handed to ONNX Runtime from memory, so a
graph can never pull in files beside it: external data is refused); every graph's embedded identity
(the source checkpoint's hash and the step it is) against the manifest, so a graph from another model
is refused even with a matching hash; input shape, channels and dtype. Nothing is unpickled: npz
files are read with `allow_pickle=False`.

Threads: every step has its own InferenceSession; ONNX Runtime gives each one its own intra-op pool,
whose threads spin after every run by default, so several sessions in one process fight over the
cores (measured 2-3x slower on 2 cores). Spinning is turned off here and every session gets the same
thread count; `settings` records what was used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside sdtool, bundle errors are user errors like any other (one line, exit status 1)
    from sdtool.errors import SdtoolError as _Base
except ImportError:  # standalone copy in a bundle
    # mypy takes the base class from the import above and cannot follow a base chosen at run time.
    _Base = Exception  # type: ignore[misc,assignment]

BUNDLE_FORMAT = "sdtool-early-exit-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
RUNTIME_FILE = "sdtool_runtime.py"
POLICIES = ("max_softmax", "entropy")
FALLBACKS = ("deepest", "ensemble")
ENSEMBLES = ("logits", "softmax")
ORT_EXTRA = "onnxruntime is not installed; pip install onnxruntime (or sdtool[onnx])"


class BundleError(_Base):
    """A bundle or an input that cannot be used; the message is one line naming the problem and the fix."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Scores and combining exits (the numpy twins of sdtool.early_exit.confidence and losses.ensemble_logits)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32, copy=False)
    m = z.max(axis=1, keepdims=True)
    s = z - m
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def confidence(z: np.ndarray, policy: str) -> np.ndarray:
    """Confidence per row (N,), higher = more confident: max softmax, or minus the entropy (nats)."""
    logp = log_softmax(z)
    if policy == "max_softmax":
        return np.exp(logp.max(axis=1))
    return (np.exp(logp) * logp).sum(axis=1)


def score_thresholds(policy: str, values: list) -> list[float]:
    """Thresholds on the confidence score (+inf = never leave), from the policy's unit."""
    return [np.inf if v is None else (float(v) if policy == "max_softmax" else -float(v)) for v in values]


def ensemble(logits: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "logits":
        return np.mean(np.stack(logits), axis=0)
    logp = np.stack([log_softmax(z) for z in logits])  # log(mean_k p_k), stable
    m = logp.max(axis=0)
    return (m + np.log(np.exp(logp - m).sum(axis=0)) - np.log(len(logits))).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The manifest


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BundleError(f"{where}: {what}; re-export the bundle with sdtool export --early-exit")


def check_manifest(m: Any, where: str) -> dict:  # m: parsed JSON, anything until checked here
    """Validate the fields the runtime relies on (types and consistency), before any graph is loaded.

    The first problem found raises, checked in this order: format and version, policy, input spec,
    steps and thresholds, classes and source, then each step.
    """
    _check_format(m, where)
    pol = m.get("policy")
    _require(
        isinstance(pol, dict)
        and pol.get("policy") in POLICIES
        and pol.get("fallback") in FALLBACKS
        and pol.get("ensemble", "logits") in ENSEMBLES,
        where,
        "the manifest's policy is malformed",
    )
    _check_input(m.get("input"), where)
    steps = m.get("steps")
    _require(isinstance(steps, list) and len(steps) >= 1, where, "the manifest lists no graphs")
    k_all = len(steps)
    vals = pol.get("values")
    _require(
        isinstance(vals, list)
        and len(vals) == k_all - 1
        and all(x is None or isinstance(x, (int, float)) for x in vals),
        where,
        f"the policy needs {k_all - 1} thresholds (one per shallow exit)",
    )
    _check_classes(m, where)
    _require(isinstance(m.get("source", {}), dict), where, "source must be an object")
    for k, s in enumerate(steps):
        last = k == k_all - 1
        # An exit answers unless its threshold is "never" under the deepest fallback; the last one always does.
        used = last or vals[k] is not None or pol["fallback"] != "deepest"
        _check_step(s, k, last, used, where)
    return m


def _check_format(m: Any, where: str) -> None:
    """An sdtool bundle manifest of a format version this runtime reads."""
    _require(
        isinstance(m, dict) and m.get("format") == BUNDLE_FORMAT,
        where,
        f"not an sdtool early-exit bundle manifest (format is not {BUNDLE_FORMAT!r})",
    )
    v = m.get("format_version")
    _require(isinstance(v, int), where, "the manifest has no format_version")
    if v > BUNDLE_VERSION:
        raise BundleError(
            f"{where} was written by a newer sdtool (bundle format {v}, this runtime reads up to "
            f"{BUNDLE_VERSION}); upgrade sdtool or use the sdtool_runtime.py shipped in the bundle"
        )


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _check_input(inp: Any, where: str) -> None:
    """A positive size, and one mean and one positive std per channel."""
    _require(
        isinstance(inp, dict)
        and isinstance(inp.get("size"), int)
        and inp["size"] > 0
        and isinstance(inp.get("channels"), int)
        and _numbers(inp.get("mean"))
        and _numbers(inp.get("std"))
        and len(inp["mean"]) == inp["channels"] == len(inp["std"])
        and all(s > 0 for s in inp["std"]),
        where,
        "the manifest's input spec (size, channels, mean, std) is malformed",
    )


def _check_classes(m: dict, where: str) -> None:
    """A positive num_classes, and class_names null or one string per class."""
    _require(isinstance(m.get("num_classes"), int) and m["num_classes"] > 0, where, "num_classes is missing")
    names = m.get("class_names")
    _require(
        names is None
        or (isinstance(names, list) and len(names) == m["num_classes"] and all(isinstance(n, str) for n in names)),
        where,
        "class_names must be a list of num_classes strings (or null)",
    )


def _check_step(s: Any, k: int, last: bool, used: bool, where: str) -> None:
    """Step k (0-based): its fields, a graph file inside the bundle (no path can leave the folder), the
    stage output passed on unless it is the last, and logits where its exit answers."""
    ok = (
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and isinstance(s.get("sha256"), str)
        and isinstance(s.get("input"), str)
        and (s.get("h") is None or isinstance(s["h"], str))
        and (s.get("logits") is None or isinstance(s["logits"], str))
    )
    _require(ok, where, f"step {k + 1} is malformed")
    name = s["file"]
    _require(
        "/" not in name and "\\" not in name and name not in ("", ".", "..") and name.endswith(".onnx"),
        where,
        f"step {k + 1} names {name!r}, which is not a graph file inside the bundle",
    )
    _require(last or s.get("h") is not None, where, f"step {k + 1} does not pass its stage output on")
    _require(s.get("logits") is not None or not used, where, f"step {k + 1} has no exit logits but its exit is used")


def read_manifest(bundle: str | os.PathLike) -> tuple[Path, dict]:
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder; pass the folder that sdtool export --early-exit wrote")
    f = root / MANIFEST
    if not f.is_file():
        raise BundleError(
            f"{root} is not an early-exit bundle ({MANIFEST} is missing); pass the folder "
            "that sdtool export --early-exit wrote"
        )
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{f} is not valid JSON; the bundle is damaged, export it again") from None
    return root, check_manifest(m, str(f))


# --------------------------------------------------------------------------------------------------
# Sessions


def session_options(threads: int | None):
    """Options for every session of a bundle: a fixed thread count, no spinning, sequential execution."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError(ORT_EXTRA) from None
    n = threads or default_threads()
    so = ort.SessionOptions()
    so.intra_op_num_threads = n
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Several sessions live in one process; spinning pools would fight over the cores (see module doc).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # A graph loaded from bytes would resolve relative external-data paths against the current directory:
    # point ONNX Runtime at an empty folder instead (the second guard; make_session scans the graph first).
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", _empty_folder())
    so.log_severity_level = 3
    settings = {
        "engine": "onnxruntime",
        "onnxruntime": ort.__version__,
        "intra_op_threads": n,
        "inter_op_threads": 1,
        "allow_spinning": False,
        "execution_mode": "sequential",
        "graph_optimization": "all",
        "providers": ["CPUExecutionProvider"],
    }
    return so, settings


# A minimal protobuf walk over the ONNX messages that can hold tensors (onnx.proto3 field numbers), so the
# runtime can refuse external data without the onnx package.
_MODEL = {7: "graph", 25: "function"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_FUNCTION = {7: "node"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_SCHEMA = {
    "model": _MODEL,
    "graph": _GRAPH,
    "function": _FUNCTION,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
}
_TENSOR_LOCATION, _EXTERNAL = 14, 1


def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i
        if shift > 63:
            raise ValueError("varint too long")


def _fields(b: bytes, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    i = start
    while i < end:
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
            yield field, wire, v
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > end:
                raise ValueError("truncated field")
            yield field, wire, (i, i + n)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def has_external_data(data: bytes) -> bool:
    """Whether any tensor of a serialized ONNX model (initializers, constants, subgraphs, functions)
    has data_location EXTERNAL."""
    stack = [("model", 0, len(data))]
    while stack:
        kind, a, z = stack.pop()
        for field, wire, v in _fields(data, a, z):
            if kind == "tensor":
                if field == _TENSOR_LOCATION and wire == 0 and v == _EXTERNAL:
                    return True
                continue
            sub = _SCHEMA[kind].get(field)
            if sub is not None and wire == 2:
                stack.append((sub, *v))
    return False


_EMPTY: list = []  # the process's empty folder (a TemporaryDirectory, removed at exit)


def _empty_folder() -> str:
    if not _EMPTY:
        import tempfile

        _EMPTY.append(tempfile.TemporaryDirectory(prefix="sdtool-no-external-data-"))
    return _EMPTY[0].name


def default_threads() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def make_session(data: bytes, so, where: str):
    """An InferenceSession from graph bytes; refuse graphs with external data (they would read files).

    Two guards: the graph's tensors are scanned for external data before ONNX Runtime sees it, and
    ONNX Runtime is pointed at an empty folder for external initializers (from bytes it would otherwise
    resolve relative locations against the current directory).
    """
    import onnxruntime as ort

    try:
        external = has_external_data(data)
    except (IndexError, ValueError):
        raise BundleError(
            f"{where} is not a readable ONNX graph (malformed protobuf); the bundle is damaged, export it again"
        ) from None
    if external:
        raise BundleError(
            f"{where} references external data files; bundles must hold every weight inside "
            "their graphs (export again with sdtool export --early-exit)"
        )
    try:
        return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure is a damaged or foreign graph
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "external" in msg.lower() or "model_path" in msg.lower():
            raise BundleError(
                f"{where} references external data files; bundles must hold every weight inside "
                "their graphs (export again with sdtool export --early-exit)"
            ) from None
        raise BundleError(
            f"{where} is not a loadable ONNX graph ({msg[:160]}); the bundle is damaged, export it again"
        ) from None


class EarlyExitSession:
    """A loaded bundle: `predict` runs real early exit over ONNX Runtime sessions, one per step.

    threads: intra-op threads of every session (default: the cores this process may use).
    thresholds: replace the manifest's thresholds (same unit and length; an exit without a head in
    the bundle cannot be switched on).
    """

    root: Path | None  # the bundle folder; None for a session made from memory

    def __init__(self, bundle: str | os.PathLike, threads: int | None = None, thresholds: list | None = None):
        self.root, self.manifest = read_manifest(bundle)
        so, self.settings = session_options(threads)
        graphs = {}
        for s in self.manifest["steps"]:
            f = self.root / s["file"]
            if not f.is_file():
                raise BundleError(f"{f} is missing; the bundle is incomplete, export it again")
            graphs[s["file"]] = f.read_bytes()
        self._load(graphs, so, str(self.root))
        if thresholds is not None:
            self.set_thresholds(thresholds)

    @classmethod
    def from_memory(cls, manifest: dict, graphs: dict[str, bytes], threads: int | None = None) -> EarlyExitSession:
        """A session over a manifest and graph bytes that are not on disk (sdtool's own engine)."""
        self = cls.__new__(cls)
        self.root, self.manifest = None, check_manifest(manifest, "manifest")
        so, self.settings = session_options(threads)
        self._load(graphs, so, "bundle")
        return self

    def _load(self, graphs: dict[str, bytes], so, where: str) -> None:
        m = self.manifest
        self.steps, self.sessions = m["steps"], []
        src = (m.get("source") or {}).get("sha256")
        for k, s in enumerate(self.steps):
            name = f"{where}/{s['file']}"
            data = graphs[s["file"]]
            if sha256_bytes(data) != s["sha256"]:
                raise BundleError(
                    f"{name} does not match its sha256 in the manifest (tampered or damaged); export the bundle again"
                )
            sess = make_session(data, so, name)
            ident = sess.get_modelmeta().custom_metadata_map.get("sdtool_bundle_step")
            try:
                ident = json.loads(ident) if ident else {}
            except json.JSONDecodeError:
                ident = {}
            if not isinstance(ident, dict) or ident.get("source_sha256") != src or ident.get("step") != k + 1:
                raise BundleError(
                    f"{name} is not step {k + 1} of the model this manifest describes (a graph from "
                    "another model or bundle); export the bundle again"
                )
            ins = [i.name for i in sess.get_inputs()]
            outs = {o.name for o in sess.get_outputs()}
            want = {x for x in (s.get("h"), s.get("logits")) if x}
            if ins != [s["input"]] or not want <= outs:
                raise BundleError(
                    f"{name} has inputs {ins} and outputs {sorted(outs)}, not what the manifest "
                    "says; the bundle is damaged, export it again"
                )
            width = {o.name: o.shape for o in sess.get_outputs()}.get(s.get("logits"))
            if width is not None and width[-1] != m["num_classes"]:
                raise BundleError(
                    f"{name} gives {width[-1]} logits but the manifest says {m['num_classes']} classes; "
                    "the bundle is damaged, export it again"
                )
            self.sessions.append(sess)
        self._wanted = [[n for n in (s.get("h"), s.get("logits")) if n] for s in self.steps]
        self._wanted_h = [[s["h"]] if s.get("h") else [] for s in self.steps]
        self.policy = m["policy"]["policy"]
        self.fallback = m["policy"]["fallback"]
        self.ensemble_kind = m["policy"].get("ensemble", "logits")
        self.set_thresholds(m["policy"]["values"])
        inp = m["input"]
        self.size, self.channels = inp["size"], inp["channels"]
        self._mean = np.asarray(inp["mean"], np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(inp["std"], np.float32).reshape(1, -1, 1, 1)
        self.class_names = m.get("class_names")

    @property
    def num_exits(self) -> int:
        return len(self.steps)

    def set_thresholds(self, values: list) -> None:
        k_all = self.num_exits
        if len(values) != k_all - 1:
            raise BundleError(f"{k_all - 1} thresholds are needed (one per shallow exit), got {len(values)}")
        for k, v in enumerate(values):
            if v is not None and self.steps[k].get("logits") is None:
                raise BundleError(
                    f"exit {k + 1} has no head in this bundle (it was exported as never answering); "
                    "export again with a threshold for it"
                )
        self.values = list(values)
        self._thr = score_thresholds(self.policy, self.values)

    # ---- inputs

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, C) or (H, W, C) -> normalized float32 (N, C, H, W); float32 input
        (N, C, H, W) is taken as already normalized. Anything else is refused in one line."""
        a = np.asarray(images)
        s, c = self.size, self.channels
        if a.dtype == np.uint8:
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4 or a.shape[1:3] != (s, s) or a.shape[3] != c:
                raise BundleError(
                    f"uint8 images must be (N, {s}, {s}, {c}) (height, width, channels), got "
                    f"{tuple(np.asarray(images).shape)}; resize them to {s}x{s} with {c} channels"
                )
            x = a.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
            return np.ascontiguousarray((x - self._mean) / self._std, dtype=np.float32)
        if a.dtype in (np.float32, np.float64):
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4 or a.shape[1:] != (c, s, s):
                raise BundleError(f"float input must be normalized (N, {c}, {s}, {s}), got {tuple(a.shape)}")
            return np.ascontiguousarray(a, dtype=np.float32)
        raise BundleError(f"images must be uint8 (N, H, W, C) or normalized float32 (N, C, H, W), got {a.dtype}")

    # ---- early exit

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, classes) float32, exit index (N,) int64, 0-based: K-1 = the fallback answered)."""
        x = self.prepare(images)
        n, k_all = x.shape[0], self.num_exits
        if n == 1 and self.fallback == "deepest":
            return self._predict_one(x)
        out = np.empty((n, self.manifest["num_classes"]), np.float32)
        exit_at = np.full(n, k_all - 1, np.int64)
        rows = np.arange(n)  # original positions of the rows still in h
        keep_all = self.fallback == "ensemble"
        seen: list[np.ndarray]  # logits of the exits so far, for the ensemble fallback
        h, seen = x, []
        for k, (s, sess) in enumerate(zip(self.steps, self.sessions, strict=True)):
            last = k == k_all - 1
            want = [s["logits"]] if last else [s["h"]] + ([s["logits"]] if s.get("logits") else [])
            res = sess.run(want, {s["input"]: h})
            if last:
                z = res[0]
                out[rows] = ensemble(seen + [z], self.ensemble_kind) if keep_all else z
                break
            h = res[0]
            if len(res) == 1 or (not keep_all and not np.isfinite(self._thr[k])):
                continue  # this exit never answers (and no ensemble needs it)
            z = res[1]
            if keep_all:
                seen.append(z)
            leave = confidence(z, self.policy) >= self._thr[k]
            n_leave = int(leave.sum())
            if n_leave == 0:
                continue
            out[rows[leave]] = z[leave]
            exit_at[rows[leave]] = k
            if n_leave == len(rows):
                break  # everyone left (batch 1: the network simply stops here)
            stay = ~leave
            h, rows = np.ascontiguousarray(h[stay]), rows[stay]
            seen = [z_[stay] for z_ in seen]
        return out, exit_at

    def _predict_one(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch 1, deepest fallback: the same decisions with scalar bookkeeping (per-call overhead is
        what batch 1 pays for; the graphs' own time is the same)."""
        h, last = x, self.num_exits - 1
        for k, (s, sess, thr) in enumerate(zip(self.steps, self.sessions, self._thr + [None], strict=True)):
            if k == last:
                return sess.run(self._wanted[k], {s["input"]: h})[0], np.array([last], np.int64)
            assert thr is not None  # only the last step has none, and it returned above
            if not np.isfinite(thr):  # never answers: the stages alone
                h = sess.run(self._wanted_h[k], {s["input"]: h})[0]
                continue
            h, z = sess.run(self._wanted[k], {s["input"]: h})
            if confidence(z, self.policy)[0] >= thr:  # the batch path's arithmetic: the same decisions
                return z, np.array([k], np.int64)
        raise AssertionError("unreachable")  # pragma: no cover

    def run_exits(self, images: np.ndarray) -> list[np.ndarray | None]:
        """Every exit's logits for every row (no early exit), shallow to deep; exits without a head: None."""
        h = self.prepare(images)
        outs = []
        for s, sess in zip(self.steps, self.sessions, strict=True):
            names = [n for n in (s.get("h"), s.get("logits")) if n]
            res = dict(zip(names, sess.run(names, {s["input"]: h}), strict=True))
            outs.append(res.get(s.get("logits")) if s.get("logits") else None)
            if s.get("h"):
                h = res[s["h"]]
        return outs

    def classify(self, images: np.ndarray, top: int = 1) -> list[dict]:
        """Per image: the predicted class (index and name), its softmax confidence and the exit (1-based)."""
        logits, exit_at = self.predict(images)
        p = np.exp(log_softmax(logits))
        rows = []
        for i in range(len(logits)):
            order = np.argsort(-p[i])[:top]
            c = int(order[0])
            rows.append(
                {
                    "class": c,
                    "name": self.class_names[c] if self.class_names else str(c),
                    "confidence": float(p[i, c]),
                    "exit": int(exit_at[i]) + 1,
                    "top": [{"class": int(j), "confidence": float(p[i, j])} for j in order],
                }
            )
        return rows


# --------------------------------------------------------------------------------------------------
# Reading image files and npz arrays (Pillow is imported only for image files)


def load_images(paths: list[str | os.PathLike], size: int, channels: int = 3, resize: bool = False) -> np.ndarray:
    """Image files (PNG, JPEG, ...) or npz files (array `x`, uint8 (N, H, W, C)) -> uint8 (N, size, size, C).

    Image files are converted to RGB (grayscale to 3 equal channels). One of another size is refused,
    unless `resize`: then its shorter side is scaled to `size` (bilinear) and the centre cropped.
    """
    arrays = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise BundleError(f"{p} not found; pass image files (PNG, JPEG) or an npz file with an array x")
        if p.suffix.lower() == ".npz":
            import zipfile

            try:
                d = np.load(p, allow_pickle=False)
                if not isinstance(d, np.lib.npyio.NpzFile):
                    raise ValueError("not an npz archive")
                with d:
                    if "x" not in d.files:
                        raise BundleError(
                            f"{p} has no array 'x' (it has {', '.join(d.files) or 'none'}); save the "
                            f"images as x, uint8 (N, {size}, {size}, {channels})"
                        )
                    x = d["x"]
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise BundleError(f"{p} is not a readable npz file of plain arrays ({str(e)[:100]})") from None
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, channels):
                raise BundleError(
                    f"{p}: x must be uint8 (N, {size}, {size}, {channels}), got {x.dtype} {tuple(x.shape)}"
                )
            arrays.append(x)
            continue
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise BundleError("reading image files needs Pillow: pip install Pillow") from None
        try:
            with Image.open(p) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                if im.size != (size, size):
                    if not resize:
                        raise BundleError(
                            f"{p} is {im.size[0]}x{im.size[1]} but the model takes {size}x{size}; "
                            "resize it, or pass --resize (shorter side to size, centre crop)"
                        )
                    im = _resize_crop(im, size)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise BundleError(f"{p} is not a readable image ({str(e)[:100]})") from None
        arrays.append(a.reshape(size, size, channels)[None])
    if not arrays:
        raise BundleError("no images given")
    return np.concatenate(arrays)


def _resize_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    # Pillow sets the pre-9.1 constants at import time (mypy cannot see them); Image.Resampling needs Pillow >= 9.1.
    bilinear = Image.BILINEAR  # type: ignore[attr-defined]
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), bilinear)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))
