"""The one way to the data a checkpoint runs on: which data set, with which transforms, checked against it.

eval, early exit, prune (taylor and --eval) and export's threshold fitting all go through
`checkpoint_data`: the checkpoint's recorded data section (or `--data`), `data.*` overrides, then the
checks that the data fits the network (input size, class count, a validation split when one is asked
for), that it is the data set the network was trained on (unless `allow_other_data`), and the
normalisation the network was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.checkpoint import Checkpoint
    from sdtool.data import DataBundle
    from sdtool.meta import CheckpointMeta
    from sdtool.recipe import DataConfig


def data_config(meta: CheckpointMeta, data: str | None = None, overrides: list[str] | None = None) -> DataConfig:
    """The data config to run a checkpoint on: its recorded recipe's data section, or `data`.

    `data` is a recipe file (its data section is used) or a data set name; `overrides` are
    `data.key=value` settings applied on top.
    """
    from sdtool.recipe import apply_overrides, from_dict, load_yaml

    base = meta.recorded_recipe() or {}
    raw: dict[str, Any] = {"data": dict(base.get("data") or {})}
    if data is not None:
        raw["data"] = (load_yaml(data).get("data") or {}) if _is_recipe(data) else {"name": data}
    for o in overrides or []:
        if not o.startswith("data."):
            raise SdtoolError(f"--set {o}: only data.* keys apply when evaluating a checkpoint")
    if not raw["data"]:
        raise SdtoolError("the checkpoint records no data set; pass --data RECIPE.yaml or --data NAME")
    return from_dict(apply_overrides(raw, overrides or [])).data


def _is_recipe(data: str) -> bool:
    """Whether `--data` names a recipe file (else a data set name); a file or folder that is neither is
    refused here, where its path says what went wrong, rather than as an unknown data-set name."""
    from sdtool.data import dataset_names

    p = Path(data)
    if p.suffix in (".yaml", ".yml"):
        return True
    if data not in dataset_names() and p.exists():
        kind = "folder" if p.is_dir() else "file"
        raise SdtoolError(
            f"--data {data} is a {kind}, neither a recipe (.yaml or .yml) nor a data set name "
            f"({', '.join(dataset_names())}); pass --data RECIPE.yaml or --data NAME"
        )
    return False


def checked_bundle(
    where: str | Path, meta: CheckpointMeta, cfg: DataConfig, split: str, train: bool = False
) -> DataBundle:
    """Build `cfg`'s data for the checkpoint at `where` (with its training split when `train`); refuse
    another input size, a class-count mismatch and a missing validation split when `split` is val."""
    from sdtool.data import build_data

    bundle = build_data(cfg, train=train)
    spec = meta.input
    if spec is not None and spec.size and bundle.input_size != spec.size:
        raise SdtoolError(
            f"{where} takes {spec.size}x{spec.size} inputs but data set {cfg.name} gives "
            f"{bundle.input_size}x{bundle.input_size}; pass --set data.input_size={spec.size}"
        )
    if spec is not None and spec.mean and spec.std and bundle.in_memory:
        # The network expects the normalisation it was trained with, whatever the data set's default.
        bundle.mean, bundle.std = tuple(spec.mean), tuple(spec.std)
        bundle._stats.clear()
    if bundle.num_classes != meta.num_classes:
        raise SdtoolError(
            f"{where} predicts {meta.num_classes} classes but data set {cfg.name} has "
            f"{bundle.num_classes}; evaluate it on a matching data set"
        )
    if split == "val" and bundle.val is None:
        raise SdtoolError(
            "this data configuration has no validation split; set data.val_size "
            "(e.g. --set data.val_size=0.1) or use --split test"
        )
    return bundle


def checkpoint_data(
    ckpt: Checkpoint,
    data: str | None = None,
    overrides: list[str] | None = None,
    split: str = "test",
    train: bool = False,
    allow_other_data: bool = False,
) -> tuple[DataConfig, DataBundle]:
    """`(cfg, bundle)` for running `ckpt` on `split` (see `data_config`, `checked_bundle` and
    `check_same_data`; `allow_other_data` turns the refusal of another data set into a warning)."""
    cfg = data_config(ckpt.meta, data, overrides)
    bundle = checked_bundle(ckpt.path or "the checkpoint", ckpt.meta, cfg, split, train)
    check_same_data(ckpt.meta, cfg, data, overrides, allow_other_data)
    return cfg, bundle


def trained_on(meta: CheckpointMeta) -> str | None:
    """The name of the data set the network was trained on, as recorded (None: not recorded)."""
    if meta.data is not None:
        return meta.data.name
    name = ((meta.recorded_recipe() or {}).get("data") or {}).get("name")
    return name if isinstance(name, str) else None


def check_same_data(
    meta: CheckpointMeta, cfg: DataConfig, data: str | None, overrides: list[str] | None, allow: bool
) -> None:
    """Refuse to score a network on a data set other than the one it was trained on (a warning on stderr
    when `allow`). Called after `checked_bundle`, so another data set reaching this point has the same
    input size and class count: such a run would otherwise give meaningless accuracy without a word.

    Data sets are compared by name only: the same data set under another root folder (or other files of
    the same kind) is taken to be a copy of it, or its held-out files, and is allowed.
    """
    recorded = trained_on(meta)
    if recorded is None or cfg.name == recorded:
        return
    source = _name_source(data, overrides)
    what = f"checkpoint was trained on {recorded}; {source} names {cfg.name} (same input size and class count)"
    if not allow:
        raise SdtoolError(f"{what}; pass --allow-other-data to score it anyway")
    from sdtool.report import err

    err.print(f"warning: {what}; scoring it anyway (--allow-other-data)", highlight=False, markup=False, soft_wrap=True)


def _name_source(data: str | None, overrides: list[str] | None) -> str:
    """Which option chose the data set's name, in the user's words."""
    named = [o for o in overrides or [] if o.startswith("data.name=")]
    if named:
        return f"--set {named[-1]}"
    if data is None:
        return "the recorded recipe"
    return f"--data {data}" if _is_recipe(data) else "--data"
