"""Model-level structured pruning of a MultiExitNet with Torch-Pruning (what `sdtool prune` runs).

See `sdtool.prune` for what is pruned and why; this module holds the algorithm on an in-memory model:
the plan (ignored layers, the highest safe ratio), one pruning pass, and the bisection that reaches a
MACs target. `sdtool.prune` wraps it with the checkpoint, the data and the lineage.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.common import FixedWidth
from sdtool.models.multi_exit import MultiExitNet
from sdtool.progress import progress as bar
from sdtool.prune_options import PruneOptions
from sdtool.prune_rules import TieBreak, custom_pruners, make_importance

TOLERANCE = 0.02  # target_macs: relative distance to the target that counts as reached
# A larger ratio keeping this much more of the MACs than a smaller one means a group was skipped
# whole (see _bisect); smaller wiggles are normal with global ranking and are searched through.
COLLAPSE = 0.05
EXIT_PREFIXES = ("attention.", "heads.")  # modules of the shallow exit branches
_ROOTS = (nn.Conv2d, nn.Linear)


def _logits(out):
    """Trace through every exit: MultiExitNet returns (logits list, features list)."""
    return out[0] if isinstance(out, tuple) else out


def _plan(model: MultiExitNet, example: torch.Tensor, opts: PruneOptions) -> tuple[list[str], float]:
    """(names of the ignored layers, highest safe ratio) for this model.

    Classifiers are always ignored (their outputs are the classes). With `protect_exits`, the groups
    that live entirely inside the shallow exit branches (the widths of the head's SepConv blocks, the
    inner width of the attention module) are ignored too: those exits then change only where they
    share channels with the backbone. The safe ratio keeps at least one channel (or `round_to`) in
    the smallest prunable group; beyond it Torch-Pruning skips whole groups and MACs stop falling.
    """
    ignored: list[nn.Module] = list(model.classifiers)
    try:
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, output_transform=_logits, customized_pruners=custom_pruners()
        )
    except Exception as e:  # e.g. a channel shuffle (view + transpose) that the graph cannot map
        name = model.spec.get("name", type(model).__name__)
        raise SdtoolError(
            f"Torch-Pruning cannot trace the channel dependencies of {name} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else 'no message'}); "
            "sdtool prune does not support this architecture"
        ) from None
    names = {m: n for n, m in model.named_modules()}
    q = opts.round_to or 1
    channels = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_ROOTS):
        outs = [
            dep.target.module
            for dep, _ in group
            if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names
        ]
        if any(isinstance(dep.target.module, FixedWidth) for dep, _ in group):
            ignored.extend(outs)
            continue
        if opts.protect_exits and outs and all(names[m].startswith(EXIT_PREFIXES) for m in outs):
            ignored.extend(outs)
            continue
        c = dg.get_out_channels(group[0].dep.target.module)
        if c is not None and c > q:
            channels.append(c)
    if not channels:
        raise SdtoolError(
            "this model has no prunable channel groups left at these options; "
            "try --no-protect-exits or a smaller --round-to"
        )
    return [names[m] for m in ignored], min(0.95, 1.0 - q / min(channels) - 1e-9)


@contextlib.contextmanager
def _threads(n: int):
    """Run with n torch CPU threads, then restore the caller's setting.

    Tracing, pruning and counting MACs run the network on a single image: extra threads only wait on
    each other, and on a busy 2-core machine that made a pruning run 15x slower than on one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _taylor_grads(model: nn.Module, batches: list, loss_fn: Callable, threads: int, progress: bool = True) -> None:
    """Accumulate the loss gradient over `batches` into .grad (BN in eval mode: statistics untouched).

    Every parameter gets a .grad (zeros where the loss does not reach), because Torch-Pruning's
    Taylor importance reads the gradient of every layer of a group.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    # real batches: the caller's threads pay off here
    with torch.enable_grad(), _threads(threads), bar("taylor gradients (batches)", len(batches), progress) as b:
        for x, y in batches:
            logits, feats = model(x)
            loss = loss_fn(logits, feats, y)
            (loss / len(batches)).backward()
            b.advance()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def prune_once(
    model: MultiExitNet,
    example: torch.Tensor,
    opts: PruneOptions,
    ratio: float,
    batches: list | None = None,
    loss_fn: Callable | None = None,
    *,
    ignored: list[str] | None = None,
    threads: int | None = None,
    grads: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> MultiExitNet:
    """Prune `model` in place with channel ratio `ratio` (in `opts.iterative_steps` steps); returns it.

    ignored: names of layers whose output channels stay (default: from `_plan`). threads: torch
    threads for taylor's gradient batches (default: the current setting); the rest uses one.
    grads: taylor, the gradients of this (unpruned) model by parameter name, reused for the first
    step instead of running the batches again (the target search prunes many copies of one model).
    progress: a bar on stderr over the iterative steps (sdtool.progress: only on a terminal).
    """
    if opts.criterion == "taylor" and (not batches or loss_fn is None):
        raise SdtoolError(
            "criterion taylor needs data batches for the gradients; give the checkpoint's "
            "data (recorded in it) or --data"
        )
    if ignored is None:
        ignored = _plan(model, example, opts)[0]
    modules = dict(model.named_modules())
    threads = threads or torch.get_num_threads()
    with torch.random.fork_rng(), torch.enable_grad(), _threads(1):
        torch.manual_seed(opts.seed)  # the random criterion and the tie-break draw numbers
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=TieBreak(make_importance(opts.criterion)),
            pruning_ratio=ratio,
            global_pruning=opts.global_pruning,
            iterative_steps=opts.iterative_steps,
            ignored_layers=[modules[n] for n in ignored],
            round_to=opts.round_to,
            output_transform=_logits,
            customized_pruners=custom_pruners(),
        )
        with bar(f"ratio {ratio:.4f} (steps)", opts.iterative_steps, progress) as b:
            for step in range(opts.iterative_steps):
                if opts.criterion == "taylor" and step == 0 and grads is not None:
                    for n, p in model.named_parameters():  # the unpruned network's, computed once
                        p.grad = grads[n].clone()
                elif opts.criterion == "taylor":  # gradients of the current (partly pruned) network
                    assert batches and loss_fn is not None  # checked above
                    _taylor_grads(model, batches, loss_fn, threads, progress)
                pruner.step()
                b.advance()
    model.zero_grad(set_to_none=True)
    return model.eval()


def check_pruned(model: MultiExitNet, example: torch.Tensor, num_classes: int) -> None:
    """Every exit runs, alone and in the full forward, and predicts `num_classes` classes."""
    with torch.no_grad():
        logits, _ = model(example)
        for k, z in enumerate(logits):
            if tuple(z.shape) != (example.shape[0], num_classes):
                raise SdtoolError(f"pruning broke exit {k + 1} (logits {tuple(z.shape)}); please report this")
            if not torch.allclose(model.forward_until(example, k), z, atol=1e-5, rtol=1e-4):
                raise SdtoolError(f"pruning left exit {k + 1} inconsistent with the full forward; please report this")


def full_macs(model: nn.Module, size: int) -> int:
    """MACs of the whole multi-exit network, every exit computed (fvcore, batch 1)."""
    from sdtool.profile import module_macs

    return module_macs(model, (size, size))[""]


def prune_model(
    model: MultiExitNet,
    opts: PruneOptions,
    size: int,
    batches: list | None = None,
    loss_fn: Callable | None = None,
    log: Callable[[str], None] = lambda s: None,
    progress: bool = True,
) -> tuple[MultiExitNet, dict]:
    """Prune a copy of `model` per `opts` (the original keeps its weights; it is put in eval mode).

    size: square input side. batches: [(x, y)] prepared inputs for taylor. progress: bars on stderr
    (pruning runs of the target search, steps, taylor batches; sdtool.progress: only on a terminal).
    Returns (pruned model in eval mode, info) with info = {"ratio", "macs_before", "macs_after",
    "macs_fraction", "search": [...]}.
    """
    opts.check()
    caller_threads = torch.get_num_threads()  # for taylor's batches; the rest runs on one thread
    with _threads(1):
        model = model.eval()
        num_classes = model.num_classes
        example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        base = full_macs(model, size)
        ignored, r_max = _plan(model, example, opts)
        search: list[dict] = []
        grads = None
        if opts.criterion == "taylor" and batches and loss_fn is not None:
            scratch = copy.deepcopy(model)
            _taylor_grads(scratch, batches, loss_fn, caller_threads, progress)
            grads = {n: p.grad for n, p in scratch.named_parameters() if p.grad is not None}

        def probe(r: float) -> tuple[MultiExitNet, float]:
            m = copy.deepcopy(model)
            m = prune_once(
                m, example, opts, r, batches, loss_fn, ignored=ignored, threads=caller_threads, grads=grads,
                progress=progress,
            )  # fmt: skip
            f = full_macs(m, size) / base
            search.append({"ratio": round(r, 6), "macs_fraction": f})
            log(f"ratio {r:.4f}: {100 * f:.2f}% of the MACs")
            return m, f

        pruned, ratio, frac = _run_probes(probe, opts, r_max, progress)
        check_pruned(pruned, example, num_classes)
        info = {
            "ratio": ratio,
            "macs_before": base,
            "macs_after": round(frac * base),
            "macs_fraction": frac,
            "search": search,
        }
        return pruned, info


def _run_probes(
    probe: Callable[[float], tuple[MultiExitNet, float]], opts: PruneOptions, r_max: float, progress: bool
) -> tuple[MultiExitNet, float, float]:
    """One pruning run at `opts.ratio`, or the search for `opts.target_macs` (a bar counts the runs:
    the search needs at most 24, usually far fewer, so the bar shows no total)."""
    total = 1 if opts.ratio is not None else None
    what = "pruning" if opts.ratio is not None else f"ratio search, {opts.target_macs} of MACs"
    with bar(f"{what} (runs)", total, progress) as b:

        def counted(r: float) -> tuple[MultiExitNet, float]:
            out = probe(r)
            b.advance()
            return out

        if opts.ratio is not None:
            pruned, frac = counted(opts.ratio)
            return pruned, opts.ratio, frac
        assert opts.target_macs is not None  # opts.check: exactly one of ratio and target_macs
        return _bisect(counted, opts.target_macs, r_max, opts.protect_exits)


def _bisect(
    probe: Callable[[float], tuple[MultiExitNet, float]], target: float, r_max: float, protected: bool
) -> tuple[MultiExitNet, float, float]:
    """Bisection on the ratio until the MACs fraction is within TOLERANCE (relative) of `target`.

    MACs fall in steps as the ratio grows (channel counts are integers). Past some ratio a group
    would lose every channel and Torch-Pruning skips it whole, so MACs jump back up: a probe that
    keeps clearly more MACs (COLLAPSE) than a probe at a smaller ratio marks such a collapse and
    bounds the search from above. The first probe uses MACs ~ (1 - r)^2 (convolutions shrink on
    both channel sides); if it keeps too much, the second tries the highest safe ratio, so an
    unreachable target fails after two runs. When the target falls inside one step, the probes
    keep landing on the step's two sides and the search stops after a few of them.
    """
    ok = lambda f: abs(f - target) <= TOLERANCE * target  # noqa: E731
    lo, hi = 0.0, r_max
    seen: list[tuple[float, float]] = [(0.0, 1.0)]  # (ratio, fraction) probed so far
    best: tuple[float, MultiExitNet, float, float] | None = None
    stale = 0
    r = min(max(1.0 - target**0.5, 1e-3), r_max)
    for _ in range(24):
        m, f = probe(r)
        if best is None or abs(f - target) < best[0]:
            best = (abs(f - target), m, r, f)
        if ok(f):
            return m, r, f
        collapsed = any(r0 < r and f > f0 + COLLAPSE for r0, f0 in seen)
        stale = stale + 1 if any(f == f0 for _, f0 in seen) else 0
        seen.append((r, f))
        lo, hi = (r, hi) if f > target and not collapsed else (lo, r)
        if hi - lo < 1e-4 or stale >= 4:
            break
        r = r_max if len(seen) == 2 and lo == r else (lo + hi) / 2
    assert best is not None  # the loop probes at least once
    _, m, r, f = best
    lowest = min(f0 for _, f0 in seen)
    if lowest > target:
        raise SdtoolError(
            f"--target-macs {target} is unreachable: the most this model can be pruned keeps "
            f"{lowest:.3f} of its MACs; ask for at least {lowest + 0.005:.2f}"
            + (" or use --no-protect-exits" if protected else "")
        )
    raise SdtoolError(
        f"--target-macs {target} could not be reached within {100 * TOLERANCE:.0f}%: the closest "
        f"is {f:.3f} (ratio {r:.3f}); channel counts move in steps here; try --global-pruning, a smaller "
        "--round-to or a nearby target"
    )
