"""Recipe schema, YAML loading and `--set a.b=c` overrides.

A recipe is plain data: sections of typed keys with defaults. Components are named by registry name
only, so nothing in a recipe executes code. Unknown keys are rejected with a suggestion, wrong types or
values name what is allowed, and the resolved recipe (every default filled in) is what checkpoints
record in their lineage.

Every field carries a `help` string: `docs/recipes.md` is generated from it (`python -m
sdtool.recipe`), so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdtool import recipe_check, schema
from sdtool.errors import SdtoolError
from sdtool.prune_options import PruneSettings


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f(
        "resnet18",
        "Backbone registry name (`sdtool models` lists them, plugins included), or `torchvision:ARCH` / "
        "`timm:NAME` for a torchvision or timm model wrapped with exits (see `exits_after`).",
    )
    num_classes: int | None = _f(None, "Classes; null takes the data set's count. 1 to 10^7.")
    stem: Literal["cifar", "imagenet"] = _f(
        "cifar", "`cifar`: 3x3 stride-1 conv, no max-pool (32x32 inputs); `imagenet`: 7x7/2 conv + max-pool."
    )
    width: int | None = _f(
        None,
        "Base channel width; null = the model's standard (ResNet18-152 and VGG: 64, CIFAR ResNets and WRN: 16, "
        "resnet8x4/32x4: 64). 16 makes a ResNet18 small and CPU-friendly. At most 65536, and the model's "
        "parameters (4 bytes each) must fit in the machine's memory.",
    )
    width_mult: float | None = _f(
        None,
        "mobilenet_v2 / shufflenet_v2_x1_0 width multiplier; null = 1.0. At most 1024, and the parameters "
        "must fit in memory (as `width`).",
    )
    head: Literal["byot", "light", "pool"] = _f(
        "byot", "Shallow-exit head: `byot` (official SepConv stack), `light` (one SepConv), `pool` (GAP + Linear)."
    )
    attention: bool = _f(True, "Attention module before each shallow head (official: on).")
    exits: list[int] | None = _f(
        None, "Stages (1-based) followed by an exit; null = after every stage. The last stage always has one."
    )
    exits_after: list[str] | None = _f(
        None,
        "torchvision:ARCH models: names of the modules after which exits go, e.g. [layer1, layer2, layer3] "
        "(null = the family's default, where known); `exits` then picks among these stages.",
    )
    split_layer1: bool | None = _f(
        None,
        "ResNet family (resnet18 ... resnext50_32x4d): true cuts layer1 after its first block, giving 5 "
        "stages and an exit inside the full-resolution layer1 (`exits` picks among them); null = no cut.",
    )
    pretrained: str | None = _f(
        None,
        "Backbone weights to start from (docs/models.md, Pretrained weights): a torchvision weights name such as "
        "IMAGENET1K_V1 (resnet18-152, wide_resnet50_2, resnext50_32x4d, mobilenet_v2, shufflenet_v2_x1_0, "
        "torchvision:ARCH), read from torch's cache `torch.hub.get_dir()/checkpoints` and never downloaded; or a "
        "local .pth/.pt state dict (loaded with weights_only=True) or .safetensors file (an sdtool checkpoint "
        "too). Matched by name and shape; exits, attention and heads start fresh. Not with --init.",
    )
    pretrained_strict: bool | None = _f(
        None,
        "Refuse `pretrained` weights that leave a backbone tensor other than the stem convolution and the "
        "classifier unloaded (another architecture or width); false loads whatever fits; null = true.",
    )


@dataclass
class AugmentConfig:
    crop: bool = _f(True, "RandomCrop to the input size with padding (training only).")
    crop_padding: int = _f(4, "Padding for the random crop, in pixels.")
    crop_fill: int = _f(128, "Fill value (0-255) of the crop padding (official: 128).")
    flip: bool = _f(True, "Random horizontal flip (training only).")
    autoaugment: bool = _f(False, "AutoAugment per image (training only); the policy is `autoaugment_policy`.")
    autoaugment_policy: Literal["cifar10", "imagenet", "svhn", "official_cifar10"] | None = _f(
        None,
        "AutoAugment policy: torchvision's cifar10, imagenet or svhn, or official_cifar10 (the CIFAR-10 policy "
        "exactly as the self-distillation authors' code applies it: grey fill, bicubic shears, "
        "counter-clockwise rotations only); null = cifar10 for in-memory data sets, imagenet for imagefolder.",
    )
    cutout: int = _f(0, "Cutout square side in pixels, one hole, on the [0,1] tensor; 0 = off (official: 16).")
    mean: list[float] | None = _f(None, "Normalize mean per channel; null = the data set's default.")
    std: list[float] | None = _f(None, "Normalize std per channel; null = the data set's default.")


@dataclass
class DataConfig:
    name: str = _f("digits", "Data set: digits, npz, fake, cifar10, cifar100, imagefolder.")
    root: str = _f(
        "data", "Folder holding the data set's files (relative paths are relative to the working directory)."
    )
    train_file: str | None = _f(None, "npz: training arrays file (x uint8 NxHxWxC, y int), relative to `root`.")
    test_file: str | None = _f(None, "npz: test arrays file, relative to `root`.")
    download: bool = _f(False, "cifar10/cifar100: download when the files are missing (needs network access).")
    input_size: int | None = _f(
        None,
        "Square input side in pixels; null = the data set's default. At most 8192; in-memory data sets "
        "(all but imagefolder) hold every image at this size, which must fit in the machine's memory.",
    )
    val_size: float = _f(0, "Validation split held out of the training split: a fraction (<1) or a count; 0 = none.")
    val_seed: int = _f(0, "Seed of the validation split (recorded in the checkpoint); 0 to 10^12.")
    batch_size: int = _f(
        128,
        "Training batch size (per process). One batch as float32 (batch x 3 x side x side x 4 bytes, times "
        "1 + 2 x workers when workers prefetch) must fit in the machine's memory.",
    )
    eval_batch_size: int = _f(256, "Evaluation batch size; fits in memory as `batch_size`.")
    workers: int = _f(
        0,
        "DataLoader worker processes (0 = in the main process); 0 to 256. Used by imagefolder and "
        "AutoAugment; in-memory batches are one tensor op and ignore it.",
    )
    limit_train: int | None = _f(
        None,
        (
            "Use only N training images (after the validation split): a fixed "
            "class-stratified sample, the same in every run."
        ),
    )
    limit_test: int | None = _f(None, "Use only N test images: a fixed class-stratified sample, the same in every run.")
    fake_size: int = _f(
        256, "fake: number of training images (tests only); their pixels are generated in memory and must fit."
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "Training augmentation."})


@dataclass
class TrainConfig:
    epochs: int = _f(10, "Training epochs; 1 to 100000.")
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "Optimizer.")
    lr: float = _f(0.1, "Peak learning rate.")
    momentum: float = _f(0.9, "SGD momentum.")
    nesterov: bool = _f(False, "SGD Nesterov momentum.")
    weight_decay: float = _f(5e-4, "Weight decay (adaptation layers included, as the official code).")
    schedule: Literal["step", "cosine", "onecycle", "constant"] = _f("step", "Learning-rate schedule.")
    milestones: list[int] | None = _f(
        None, "step: epochs at which lr is multiplied by `gamma`; null = official E//3, 2E//3, E-10."
    )
    gamma: float = _f(0.1, "step: lr factor at each milestone.")
    warmup_epochs: float = _f(0, "Linear warm-up from 0 over this many epochs (fractions allowed); at most 100000.")
    label_smoothing: float = _f(0.0, "Label smoothing of the hard-label cross-entropy terms.")
    seed: int = _f(
        0,
        "Random seed (weights, data order, augmentation); 0 to 10^12, so that the per-epoch data-order seed "
        "(seed x 1000003 + epoch) fits torch's 64-bit generator seed.",
    )
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    amp: bool = _f(True, "Mixed precision on CUDA (bf16 where supported, else fp16 with a scaler); ignored on CPU.")
    channels_last: Literal["auto", True, False] = _f(
        "auto",
        "channels_last memory format. `auto`: on for CUDA and the CPU (faster there for plain and "
        "self-distillation training: `benchmarks/train_step.py --memory-format both`), off for MPS; true/false: "
        "on/off on any device. The choice is recorded in the run's `run.json` and kept by --resume.",
    )
    compile: bool = _f(False, "torch.compile the model.")
    threads: int | None = _f(None, "CPU threads for torch (null = torch's default); 1 to 1024.")
    sync_bn: bool = _f(False, "Multi-process runs: synchronise batch-norm statistics across processes (SyncBatchNorm).")
    limit_batches: int | None = _f(None, "Stop each training epoch after N batches (smoke tests).")
    eval_every: int = _f(1, "Evaluate every N epochs (and always after the last).")
    grad_clip: float | None = _f(None, "Clip the gradient norm to this value.")
    tensorboard: bool = _f(
        False,
        "Also write each epoch's metrics as TensorBoard scalars to RUN_DIR/tensorboard/ (needs the `tensorboard` "
        "extra); metrics.jsonl stays the record.",
    )


@dataclass
class SdConfig:
    mode: Literal["self_distill", "deep_supervision", "plain"] = _f(
        "self_distill",
        "self_distill: deepest exit teaches the rest; deep_supervision: CE on every exit; "
        "plain: the backbone with its own classifier, no exits.",
    )
    alpha: float = _f(0.3, "Weight of the soft (distillation) term for shallow exits; 1-alpha on their CE.")
    beta: float = _f(0.03, "Weight of the feature-hint term.")
    temperature: float = _f(3.0, "Softmax temperature of the distillation term (no T^2 factor, as official).")
    teacher: Literal["deepest", "ensemble"] = _f("deepest", "Which logits teach the shallow exits.")
    hint_exits: list[int] | None = _f(
        None, "Shallow exits (1-based, shallow to deep) that get the feature hint; null = official: all but exit K-1."
    )
    ensemble: Literal["logits", "softmax"] = _f(
        "logits", "Ensemble prediction: mean of logits (official) or of softmax."
    )


@dataclass
class DistillConfig:
    teacher: str | None = _f(None, "Teacher: an sdtool checkpoint path or `torchvision:NAME`.")
    teacher_weights: str | None = _f(None, "torchvision teacher: local weights file (.safetensors or .pth state dict).")
    teacher_output: Literal["deepest", "ensemble"] = _f("deepest", "sdtool teacher: which of its outputs teaches.")
    temperature: float = _f(4.0, "KD softmax temperature.")
    alpha: float = _f(0.9, "Weight of the KD term (the student's own loss keeps weight 1).")
    targets: Literal["deepest", "all"] = _f("deepest", "Which student exits receive KD.")
    feature: Literal["fitnet", "at"] | None = _f(None, "Optional feature distillation.")
    feature_weight: float = _f(1.0, "Weight of the feature-distillation term.")


@dataclass
class PruneConfig(PruneSettings):
    """The pruning settings `sdtool prune` takes too (sdtool.prune_options), plus the pipeline's own."""

    target_macs: float | None = _f(0.5, "Keep this fraction of the full multi-exit MACs (when `ratio` is null).")
    enabled: bool = _f(False, "Run the prune and fine-tune steps of a pipeline recipe.")
    finetune_epochs: int = _f(10, "Fine-tuning epochs after pruning (pipeline recipes); 0 to 100000.")


@dataclass
class EvalConfig:
    split: Literal["test", "val"] = _f(
        "test",
        # Removing the key would make every recipe, run folder and checkpoint that records it unloadable.
        "Not read by any command (`sdtool eval --split` chooses the split); kept so that recipes, run "
        "folders and checkpoints that record it still load.",
    )
    early_exit: bool = _f(False, "Pipeline recipes: evaluate with early exit at the end.")
    policy: Literal["max_softmax", "entropy"] = _f("max_softmax", "Early-exit confidence measure.")
    fallback: Literal["deepest", "ensemble"] = _f("deepest", "Who answers samples no exit takes.")
    max_drop: float | None = _f(0.5, "Threshold fitting: accuracy drop allowed, in percentage points.")
    budget: float | None = _f(None, "Threshold fitting: MACs budget, fraction of the reference cost.")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The network."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data set and augmentation."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    sd: SdConfig = field(default_factory=SdConfig, metadata={"help": "Self-distillation loss."})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "External-teacher KD."})
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={"help": "Pruning (pipeline recipes)."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(data: dict) -> Recipe:
    recipe = schema.build(Recipe, data)
    recipe_check.check(recipe)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (['train', 'epochs'], 3); the value is parsed as YAML (so 3, 0.1, true, [1,2])."""
    if "=" not in text:
        raise SdtoolError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SdtoolError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


# A recipe is a page of YAML; a file this big is a data set or a checkpoint passed by mistake (and is not read
# into memory to find out).
RECIPE_MAX_BYTES = 1 << 20


def read_recipe_text(p: Path) -> str:
    """The text of the recipe file `p`: UTF-8, refused in one line when it is a folder, a binary file, too
    big for a recipe, unreadable or in another encoding."""
    fix = "pass the path of a YAML recipe (see recipes/)"
    if p.is_dir():
        raise SdtoolError(f"recipe {p} is a folder, not a file; {fix}")
    if not p.is_file():
        raise SdtoolError(f"recipe {p} not found; {fix}")
    try:
        size = p.stat().st_size
        if size > RECIPE_MAX_BYTES:
            raise SdtoolError(f"recipe {p} is {size / 2**20:.1f} MiB, too big for a YAML recipe; {fix}")
        raw = p.read_bytes()
    except OSError as e:
        raise SdtoolError(
            f"recipe {p} could not be read ({e.strerror or e}); check the file and its permissions"
        ) from None
    # Text never holds NUL bytes, and binary files (checkpoints, images, archives, npz) practically always do.
    if b"\0" in raw:
        raise SdtoolError(f"recipe {p} is a binary file, not YAML text; {fix}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SdtoolError(
            f"recipe {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    text = read_recipe_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise SdtoolError(f"recipe {p} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdtoolError(f"recipe {p} must be a mapping of sections (model, data, train, ...)")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def reference_markdown() -> str:
    """The recipe reference (docs/recipes.md body), generated from the schema."""
    return schema.reference_markdown(Recipe)


if __name__ == "__main__":
    print(reference_markdown())
