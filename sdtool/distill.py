"""`sdtool distill`: the student trains with its recipe's loss plus knowledge distillation from a frozen
external teacher (the paper's "self-distillation + KD" combination).

Per training step, on the same augmented, normalized batch x the student sees:

    L = L_student(recipe sd.mode)                                    (self_distill / deep_supervision / plain)
      + alpha * sum_{k in targets} KD_T(z_k, t)                      (Hinton: T^2 * KL(softmax(t/T) || softmax(z_k/T)))
      + feature_weight * sum_{(s, u) paired stages} D(f_s, g_u)      (optional: FitNet or attention transfer)

t: the teacher's logits, computed once per step in eval mode under no_grad; targets: the deepest exit
(`distill.targets: deepest`) or every exit (`all`). D = FitNetLoss (1x1-conv adapter, trained with the
student, then MSE) or ATLoss. Stages are paired from the deep end: the last n student stages with the
last n teacher stages, n = min(student stages, teacher stages); spatial sizes may differ.

Teachers:
  * an sdtool checkpoint: its deepest exit (computed alone, `forward_until`) or the ensemble of its
    exits (`distill.teacher_output`); its stages give the feature maps. If its recorded input
    normalisation differs from the student's data, the batch is re-normalized for it (exactly).
  * `torchvision:NAME` with weights from a local file (`--teacher-weights`: .safetensors, or a .pth /
    .pt state dict read with `torch.load(weights_only=True)`); nothing is downloaded. It sees the
    student's normalized batch as is: an ImageNet teacher on CIFAR-normalized inputs is the user's call.
    Feature distillation needs its stage modules: ResNet-family teachers (layer1..layer4) only (the
    layout table in sdtool/models/wrap.py).
A teacher whose class count or input size does not fit the student's data fails with one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from sdtool import checkpoint, fileio
from sdtool.errors import SdtoolError
from sdtool.losses import ATLoss, FitNetLoss, KDLoss, ensemble_logits
from sdtool.meta import CheckpointMeta
from sdtool.models.multi_exit import MultiExitNet

if TYPE_CHECKING:
    from sdtool.data import DataBundle
    from sdtool.recipe import DistillConfig

TV_PREFIX = "torchvision:"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: .safetensors, or a .pth/.pt state dict (torch.load, weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise SdtoolError(
            f"teacher weights file {p} not found; pass --teacher-weights with a local .safetensors "
            "or .pth file (sdtool never downloads weights)"
        )
    return fileio.read_state_dict(p)


def _torchvision_teacher(arch: str, weights: str | None) -> tuple[nn.Module, dict, list[str] | None]:
    from sdtool.models.wrap import torchvision_builder, torchvision_stages

    builder = torchvision_builder(arch)
    if not weights:
        raise SdtoolError(
            f"teacher torchvision:{arch} needs --teacher-weights PATH (a local .safetensors or "
            ".pth state dict; sdtool never downloads weights)"
        )
    state = read_state_dict(weights)
    with torch.device("meta"):  # find the classifier to read the class count from the weights
        probe = builder(weights=None)
    fc_name = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)][-1]
    if f"{fc_name}.weight" not in state:
        raise SdtoolError(f"{weights} has no {fc_name}.weight; it does not hold torchvision:{arch} weights")
    num_classes = int(state[f"{fc_name}.weight"].shape[0])
    net = builder(weights=None, num_classes=num_classes)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise SdtoolError(f"{weights} does not fit torchvision:{arch} ({what}); pass that architecture's weights")
    net.load_state_dict({k: state[k] for k in own})
    stages = torchvision_stages(arch)  # known for ResNet-family teachers (feature distillation)
    info = {
        "kind": "torchvision",
        "source": f"{TV_PREFIX}{arch}",
        "weights": str(weights),
        "weights_sha256": checkpoint.sha256(weights),
        "num_classes": num_classes,
    }
    return net, info, stages


class Teacher(nn.Module):
    """A frozen network: normalized student batch (N, 3, H, W) -> logits (N, C); stage outputs via hooks."""

    renorm_scale: torch.Tensor  # buffers registered by `check` when the teacher's normalisation differs
    renorm_shift: torch.Tensor

    def __init__(self, spec: str, weights: str | None = None, output: str = "deepest"):
        super().__init__()
        self.output = output
        self.renorm = False  # True: x_t = x * renorm_scale + renorm_shift (buffers, set by `check`)
        self.net: nn.Module
        self.info: dict[str, Any]
        if spec.startswith(TV_PREFIX):
            self.net, self.info, names = _torchvision_teacher(spec[len(TV_PREFIX) :], weights)
            self.meta: CheckpointMeta | None = None
            modules = dict(self.net.named_modules())
            self.stage_modules = [modules[n] for n in names] if names else None
        else:
            if weights:
                raise SdtoolError(
                    "--teacher-weights applies to torchvision:NAME teachers; an sdtool checkpoint holds its own weights"
                )
            ckpt = checkpoint.load_checkpoint(spec)
            self.net, self.meta = ckpt.model, ckpt.meta
            self.stage_modules = list(ckpt.model.stages)
            self.info = {
                "kind": "sdtool",
                "source": str(spec),
                "sha256": ckpt.sha256,
                "num_classes": ckpt.meta.num_classes,
                "output": output,
                "model": ckpt.meta.model.name,
            }
        self.net.requires_grad_(False)
        self.net.eval()
        self._captured: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._capture) for m in (self.stage_modules or [])]

    def _capture(self, module, inputs, output) -> None:
        self._captured.append(output)

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.net.eval()  # always: batch-norm statistics of the teacher never change
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, stage outputs captured during this call, shallow to deep)."""
        self._captured = []
        if self.renorm:
            x = x * self.renorm_scale + self.renorm_shift
        if self.meta is None:
            z = self.net(x)
        else:
            net = cast(MultiExitNet, self.net)  # an sdtool checkpoint's model (it has `meta`)
            if self.output == "ensemble" and net.num_exits > 1:
                z = ensemble_logits(net(x)[0], self.meta.ensemble)
            else:
                z = net.forward_until(x, net.num_exits - 1)
        feats, self._captured = self._captured, []
        return z, feats

    def check(self, num_classes: int, input_size: int, mean, std) -> None:
        """Fail with one line unless the teacher fits the student's data; set up re-normalisation."""
        n_t = self.info["num_classes"]
        if n_t != num_classes:
            raise SdtoolError(
                f"teacher {self.info['source']} predicts {n_t} classes but the student's data set has "
                f"{num_classes}; use a teacher trained on the same classes"
            )
        if self.meta is not None and self.meta.input is not None:
            size = self.meta.input.size
            if size != int(input_size):
                raise SdtoolError(
                    f"teacher {self.info['source']} was trained on {size}x{size} inputs but the student's "
                    f"data is {input_size}x{input_size}; set data.input_size={size} or use a matching teacher"
                )
            t_mean, t_std = self.meta.input.mean, self.meta.input.std
            if t_mean and t_std and (list(t_mean) != list(mean) or list(t_std) != list(std)):
                # x = (img - m_s) / s_s  ->  (img - m_t) / s_t = x * s_s / s_t + (m_s - m_t) / s_t
                s_s, m_s = torch.tensor(std).view(1, -1, 1, 1), torch.tensor(mean).view(1, -1, 1, 1)
                s_t, m_t = torch.tensor(t_std).view(1, -1, 1, 1), torch.tensor(t_mean).view(1, -1, 1, 1)
                self.register_buffer("renorm_scale", s_s / s_t, persistent=False)
                self.register_buffer("renorm_shift", (m_s - m_t) / s_t, persistent=False)
                self.renorm = True
                self.info["renormalized"] = True


class DistillExtra(nn.Module):
    """The engine's extra loss term (`fit(..., extra=...)`): KD (and feature distillation) from a teacher.

    It implements `sdtool.trainloop.ExtraLoss`: `bind`, the forward (called as the module) and `epoch_metrics`.
    """

    def __init__(self, cfg: DistillConfig, teacher: str, teacher_weights: str | None = None):
        super().__init__()
        self.cfg = cfg  # a validated recipe section (recipe.py checks the ranges; KDLoss the temperature)
        self.teacher = Teacher(teacher, teacher_weights, cfg.teacher_output)
        if cfg.feature and self.teacher.stage_modules is None:
            raise SdtoolError(
                f"distill.feature={cfg.feature} needs the teacher's stage outputs; "
                f"{self.teacher.info['source']} has no known stages (use an sdtool checkpoint or a "
                "torchvision ResNet teacher, or set distill.feature=null)"
            )
        self.kd = KDLoss(cfg.temperature)
        self.feature_losses = nn.ModuleList()
        self.pairs: list[tuple[int, int]] = []  # (student stage, teacher stage), 0-based
        self._student: list[torch.Tensor] = []
        self._hooks: list = []
        # The teacher's time this epoch: seconds on the CPU, (start, end) CUDA event pairs on the GPU.
        self._seconds, self._steps = 0.0, 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def info(self) -> dict[str, Any]:
        return self.teacher.info

    def train(self, mode: bool = True) -> DistillExtra:
        super().train(mode)
        self.teacher.train(mode)  # keeps the teacher network itself in eval mode
        return self

    def bind(self, model: MultiExitNet, bundle: DataBundle) -> None:
        """Called by `fit` with the student and the data before the optimizer exists."""
        self.teacher.check(bundle.num_classes, bundle.input_size, bundle.mean, bundle.std)
        x = torch.zeros(2, 3, bundle.input_size, bundle.input_size)
        try:
            z, t_feats = self.teacher(x)
        except Exception as e:  # noqa: BLE001 - any failure here is an input the teacher cannot take
            raise SdtoolError(
                f"teacher {self.info['source']} cannot run on {bundle.input_size}x{bundle.input_size} "
                f"inputs ({(str(e).splitlines() or [''])[0][:100]}); use a matching teacher"
            ) from None
        if tuple(z.shape) != (2, bundle.num_classes):
            raise SdtoolError(
                f"teacher {self.info['source']} outputs shape {tuple(z.shape)}, not (N, {bundle.num_classes}) logits"
            )
        if self.cfg.feature:
            self._bind_features(model, x, t_feats)

    def _bind_features(self, model: MultiExitNet, x: torch.Tensor, t_feats: list[torch.Tensor]) -> None:
        """Pair the student's stages with the teacher's, make their feature losses, hook the student's stages."""
        n_s, n_t = len(model.stages), len(t_feats)
        n = min(n_s, n_t)
        self.pairs = [(n_s - n + i, n_t - n + i) for i in range(n)]
        was = model.training
        model.eval()
        with torch.no_grad():  # the student's stage widths, from a dry run
            s_feats, h = [], x.to(next(model.parameters()).device)
            for stage in model.stages:
                h = stage(h)
                s_feats.append(h)
        model.train(was)
        for s, t in self.pairs:
            if self.cfg.feature == "fitnet":
                self.feature_losses.append(FitNetLoss(s_feats[s].shape[1], t_feats[t].shape[1]))
            else:
                self.feature_losses.append(ATLoss())
        self._hooks = [model.stages[s].register_forward_hook(self._capture) for s, _ in self.pairs]

    def _capture(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # training forward only; evaluation runs under no_grad
            self._student.append(output)

    def forward(
        self, x: torch.Tensor, logits: list[torch.Tensor], features: list[torch.Tensor], y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student, self._student = self._student, []
        t_logits, t_feats = self._timed_teacher(x)
        targets = logits if self.cfg.targets == "all" else logits[-1:]
        kd = self.cfg.alpha * sum(self.kd(z, t_logits) for z in targets)
        loss, parts = kd, {"teacher_kd": kd.detach()}  # tensors: reading them would wait for the GPU
        if self.cfg.feature:
            if len(student) != len(self.pairs):
                raise RuntimeError("student stage outputs were not captured; is the model compiled without hooks?")
            feat = self.cfg.feature_weight * sum(
                fl(student[i], t_feats[t])
                for i, (fl, (_, t)) in enumerate(zip(self.feature_losses, self.pairs, strict=True))
            )
            loss = loss + feat
            parts["teacher_feature"] = feat.detach()
        return loss, parts

    def _timed_teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's forward, timed: CUDA events on the GPU (read once per epoch, no sync per step)."""
        self._steps += 1
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.teacher(x)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.teacher(x)
        self._seconds += time.perf_counter() - t0
        return out

    def epoch_metrics(self) -> dict[str, float]:
        """The teacher's forward time since the last call (the engine adds it to the epoch's metrics)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000
        out = {
            "teacher_seconds": self._seconds,
            "teacher_ms_per_step": 1000 * self._seconds / self._steps if self._steps else 0.0,
        }
        self._seconds, self._steps, self._events = 0.0, 0, []
        return out


def distill(
    recipe,
    out: str | Path,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    init: str | None = None,
    quiet: bool = False,
    resume: str | Path | None = None,
):
    """`sdtool distill`: `fit` with a DistillExtra; the lineage records the teacher (path and sha256).

    With `resume`, the run folder's recipe (which names the teacher actually used) rebuilds the teacher.
    """
    from sdtool.engine import fit
    from sdtool.outputs import check_dir
    from sdtool.runfolder import load_run

    if resume is not None:
        _, recipe, info = load_run(resume)
        init = info.init
    # Before the teacher is loaded (fit checks again, and locks the folder, before data and student).
    check_dir(resume if resume is not None else out, "--resume" if resume is not None else "--out")
    spec = teacher or recipe.distill.teacher
    weights = teacher_weights or recipe.distill.teacher_weights
    if not spec:
        raise SdtoolError("no teacher: pass --teacher CKPT or --teacher torchvision:NAME (or set distill.teacher)")
    # The run's recipe.yaml and the lineage's resolved recipe then name the teacher actually used.
    recipe.distill.teacher, recipe.distill.teacher_weights = str(spec), (str(weights) if weights else None)
    extra = DistillExtra(recipe.distill, str(spec), str(weights) if weights else None)
    return fit(
        recipe,
        out,
        init=init,
        resume=resume,
        extra=extra,
        command="distill",
        quiet=quiet,
        lineage_extra={"teacher": extra.info},
    )
