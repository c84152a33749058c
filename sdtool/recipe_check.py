"""Range, bound and memory checks of a recipe that its types alone cannot express.

`check(recipe)` runs after the schema has built and typed the recipe (sdtool/recipe.py): plain ranges,
upper bounds on what sizes memory or time, and estimates of the memory a batch, the model and an
in-memory data set need against this machine's (sdtool.memory). Each ends in one line naming the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtool import memory
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import Recipe


def check(r: Recipe) -> None:
    """Every check below, in order: ranges, then bounds, then memory."""
    _check_values(r)


def _check_values(r: Recipe) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (r.train.epochs >= 1, "train.epochs must be at least 1"),
        (r.train.lr > 0, "train.lr must be positive"),
        (0 <= r.sd.alpha <= 1, "sd.alpha must be in [0, 1]"),
        (r.sd.beta >= 0, "sd.beta must be >= 0"),
        (r.sd.temperature > 0, "sd.temperature must be positive"),
        (r.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (r.data.val_size >= 0, "data.val_size must be >= 0 (a fraction below 1 or a count)"),
        (r.model.width is None or r.model.width >= 1, "model.width must be at least 1"),
        (r.model.width_mult is None or r.model.width_mult > 0, "model.width_mult must be positive"),
        (0 <= r.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (
            r.data.val_size < 1 or float(r.data.val_size).is_integer(),
            "data.val_size must be a fraction below 1 or a whole count",
        ),
        (r.data.eval_batch_size >= 1, "data.eval_batch_size must be at least 1"),
        (r.data.workers >= 0, "data.workers must be >= 0"),
        (r.data.input_size is None or r.data.input_size >= 1, "data.input_size must be at least 1"),
        (r.data.fake_size >= 1, "data.fake_size must be at least 1"),
        (r.data.limit_train is None or r.data.limit_train >= 1, "data.limit_train must be at least 1"),
        (r.data.limit_test is None or r.data.limit_test >= 1, "data.limit_test must be at least 1"),
        (r.train.eval_every >= 1, "train.eval_every must be at least 1"),
        (r.train.limit_batches is None or r.train.limit_batches >= 1, "train.limit_batches must be at least 1"),
        (r.train.warmup_epochs >= 0, "train.warmup_epochs must be >= 0"),
        (r.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 <= r.train.momentum < 1, "train.momentum must be in [0, 1)"),
        (r.train.gamma > 0, "train.gamma must be positive"),
        (r.train.grad_clip is None or r.train.grad_clip > 0, "train.grad_clip must be positive"),
        (r.train.threads is None or r.train.threads >= 1, "train.threads must be at least 1"),
        (
            r.train.milestones is None or list(r.train.milestones) == sorted(set(r.train.milestones)),
            "train.milestones must be increasing epochs",
        ),
        (r.distill.temperature > 0, "distill.temperature must be positive"),
        (r.distill.alpha >= 0, "distill.alpha must be >= 0"),
        (r.distill.feature_weight >= 0, "distill.feature_weight must be >= 0"),
        (r.prune.finetune_epochs >= 0, "prune.finetune_epochs must be >= 0"),
        (r.eval.max_drop is None or r.eval.max_drop >= 0, "eval.max_drop must be >= 0 (percentage points)"),
        (r.eval.budget is None or r.eval.budget > 0, "eval.budget must be a positive fraction of the reference cost"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SdtoolError(f"{msg}; fix the recipe or the --set value")
    try:
        r.prune.check("recipe")  # the pruning settings' own ranges, shared with `sdtool prune`
    except SdtoolError as e:
        raise SdtoolError(f"{e}; fix the recipe or the --set value") from None
    _check_bounds(r)
    _check_memory(r)
    _check_pretrained(r)


def _check_pretrained(r: Recipe) -> None:
    """model.pretrained: a local file must exist, a torchvision weights name must exist for the model (whether
    it is in torch's cache is looked at when the run starts: a recipe may be written before the download)."""
    if r.model.pretrained is not None:
        from sdtool.models.pretrained import check_setting

        check_setting(r.model.name, r.model.pretrained)


# Upper bounds on values that size time or memory. They are far above any real setting; what they stop is
# a typo (an extra zero or three) turning into a run that never ends, a giant allocation or an overflow.
EPOCHS_MAX = 100_000
# torch seeds its generators with 64-bit integers, and the data order seeds one per epoch with
# seed * 1_000_003 + epoch (sdtool/data/loader.py SEED_STRIDE): 10^12 keeps that below 2^63. numpy's
# generators (the validation split) refuse negative seeds.
SEED_MAX = 10**12
WIDTH_MAX = 65_536  # beyond it the meta-device estimate below could overflow torch's 64-bit sizes
WIDTH_MULT_MAX = 1024.0
NUM_CLASSES_MAX = 10**7
INPUT_SIZE_MAX = 8192
WORKERS_MAX = 256
THREADS_MAX = 1024
# Models within these are far from any machine's memory (the largest registered one, wrn_28_10 at width 64,
# is 0.6 G parameters), so building them on the meta device to count is skipped: it is not free for the
# deepest ones (about 0.5 s for resnet152).
_SMALL_WIDTH, _SMALL_WIDTH_MULT, _SMALL_CLASSES = 64, 4.0, 10_000


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_bounds(r: Recipe) -> None:
    d, t, m = r.data, r.train, r.model
    checks = [
        ("train.epochs", t.epochs, 1, EPOCHS_MAX),
        ("train.warmup_epochs", t.warmup_epochs, 0, EPOCHS_MAX),
        ("prune.finetune_epochs", r.prune.finetune_epochs, 0, EPOCHS_MAX),
        ("train.seed", t.seed, 0, SEED_MAX),
        ("data.val_seed", d.val_seed, 0, SEED_MAX),
        ("model.width", m.width, 1, WIDTH_MAX),
        ("model.width_mult", m.width_mult, 0, WIDTH_MULT_MAX),
        ("model.num_classes", m.num_classes, 1, NUM_CLASSES_MAX),
        ("data.input_size", d.input_size, 1, INPUT_SIZE_MAX),
        ("data.workers", d.workers, 0, WORKERS_MAX),
        ("train.threads", t.threads, 1, THREADS_MAX),
    ]
    for key, value, low, high in checks:
        if value is not None and not low <= value <= high:
            raise SdtoolError(
                f"{key} must be from {_num(low)} to {_num(high)}, got {_num(value)}; fix the recipe or the --set value"
            )


def default_side(r: Recipe) -> int:
    """The input side a run uses when data.input_size is null: imagefolder's 224, else CIFAR's 32 (npz files
    have their own, unknown here; the data loader checks those)."""
    return r.data.input_size or (224 if r.data.name == "imagefolder" or r.model.stem == "imagenet" else 32)


def _model_parameters(r: Recipe, side: int) -> int | None:
    """Parameters and buffers of the recipe's model, counted on the meta device (no memory is allocated);
    None when the builder refuses the arguments (the run says so where it builds the model)."""
    import torch

    from sdtool.models import create_model
    from sdtool.models.from_recipe import model_args

    try:
        with torch.device("meta"):
            net = create_model(r.model.name, **model_args(r, r.model.num_classes or 10, side))
    except SdtoolError:
        return None
    return sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


def _check_memory(r: Recipe) -> None:
    """Refuse settings whose data alone cannot fit in the machine's memory (see `memory.check_fits`)."""
    d, m = r.data, r.model
    side = default_side(r)
    # Worker processes each prefetch 2 batches (DataLoader's prefetch_factor); they run for imagefolder and
    # the per-image AutoAugment path only (sdtool/data/loader.py ignores them for one-op batches).
    prefetch = 1 + 2 * d.workers if d.workers and (d.name == "imagefolder" or d.augment.autoaugment) else 1
    for key, batch in (("batch_size", d.batch_size), ("eval_batch_size", d.eval_batch_size)):
        workers = f" (x{prefetch}: the {d.workers} workers prefetch 2 batches each)" if prefetch > 1 else ""
        fix = [f"data.{key}"] + (["data.input_size"] if d.input_size else []) + (["data.workers"] if workers else [])
        memory.check_fits(
            batch * 3 * side * side * 4 * prefetch,
            f"data.{key}={batch}: one batch of {batch} float32 {side}x{side} RGB images{workers}",
            "lower " + " or ".join(fix),
        )
    if d.name == "fake":
        # The fake images are generated as float32 patterns plus int64 noise, summed in float32 and then cast to
        # uint8: 17 bytes per pixel value at once.
        memory.check_fits(
            d.fake_size * 3 * side * side * 17,
            f"data.fake_size={d.fake_size}: generating {d.fake_size} fake {side}x{side} images",
            "lower data.fake_size" + (" or data.input_size" if d.input_size else ""),
        )
    sizing = [(k, getattr(m, k)) for k in ("width", "width_mult", "num_classes") if getattr(m, k) is not None]
    big = (m.width or 0) > _SMALL_WIDTH or (m.width_mult or 0) > _SMALL_WIDTH_MULT
    params = _model_parameters(r, side) if big or (m.num_classes or 0) > _SMALL_CLASSES else None
    if params is not None:
        # The model is built on the host (CPU) before it moves to the device: its float32 weights must fit there.
        memory.check_fits(
            params * 4,
            f"{', '.join(f'model.{k}={_num(v)}' for k, v in sizing)}: {m.name} with {params:,} float32 parameters",
            "lower " + " or ".join(f"model.{k}" for k, _ in sizing),
        )
