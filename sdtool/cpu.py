"""CPU runtime defaults that degrade gracefully on a shared machine, and a record of what was chosen.

torch runs its CPU kernels on OpenMP (the Linux pip wheels link GNU libgomp; MKL and oneDNN share that
runtime). Between parallel regions OpenMP's threads spin-wait for the next one: libgomp spins about
300,000 times, Intel/LLVM OpenMP for 200 ms (KMP_BLOCKTIME). On a quiet machine that saves a wake-up;
when another process wants a core, the spinning threads take the time slices the working thread needs
and torch slows down or collapses. The 2-epoch quickstart on 2 cores beside one busy process took
17.6-22.2 s with the defaults and 16.5-17.6 s with OMP_WAIT_POLICY=PASSIVE, which costs 9-23 % on a
quiet machine (docs/benchmarks.md); under heavier contention the gap grows to several times.

So the CLI sets OMP_WAIT_POLICY=PASSIVE, unless the environment already holds a policy: the user's value
always wins (OMP_WAIT_POLICY=ACTIVE restores the spinning), and so do the runtimes' own knobs
(GOMP_SPINCOUNT, KMP_BLOCKTIME), which they apply over the policy. Both runtimes honour PASSIVE (LLVM/Intel
OpenMP then uses a block time of 0 too) and read it once, when torch loads them: `configure()` must run
before anything imports torch. Nothing is sensed (load, cores): one command behaves the same everywhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"

# Where the process's policy came from: "default" (configure() set it), "environment" (it was there
# before), or None (configure() never ran before torch: library use, where nothing is changed).
_source: str | None = None


def configure(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set the OpenMP wait policy unless the environment names one; return where the policy came from.

    Called first thing by the CLI (`sdtool.cli.main`, which `python -m sdtool` and the `sdtool` script
    both run). Once torch is imported the OpenMP runtime has read its settings, so this changes nothing
    then (and records nothing: the report must say what the runtime really uses).
    """
    global _source
    if "torch" in sys.modules:
        return None
    if environ.get(WAIT_POLICY):
        _source = "environment"
    else:
        environ[WAIT_POLICY] = DEFAULT_WAIT_POLICY
        _source = "default"
    return _source


def runtime_settings() -> dict:
    """What the CPU runtime of this process uses, for start lines and JSON timing blocks:
    {"threads": 2, "omp_wait_policy": "PASSIVE", "omp_wait_policy_source": "default"}.

    The source is "default" (set by sdtool), "environment" (the user's), or "openmp" (nobody set it, the
    runtime's own default applies; the policy is then null)."""
    import torch

    policy = os.environ.get(WAIT_POLICY) or None
    source = _source or ("environment" if policy else "openmp")
    return {"threads": torch.get_num_threads(), "omp_wait_policy": policy, "omp_wait_policy_source": source}


def describe(settings: dict) -> str:
    """One phrase for a start line, e.g. '2 threads (OMP_WAIT_POLICY PASSIVE, sdtool default)'."""
    policy, source = settings["omp_wait_policy"], settings["omp_wait_policy_source"]
    source = {"default": "sdtool default", "environment": "from the environment"}.get(source, source)
    where = f"{WAIT_POLICY} {policy}, {source}" if policy else "OpenMP's default wait policy"
    return f"{settings['threads']} threads ({where})"
