"""How much memory this machine has, and one-line refusals of what would not fit in it.

Used where a setting or a file would size an allocation (recipe values, in-memory data sets, checkpoint
metadata): the estimate is compared with the machine's physical memory and the numbers are printed.
"""

from __future__ import annotations

import os

from sdtool.errors import SdtoolError


def machine_memory() -> int | None:
    """The machine's physical memory in bytes; None where the OS does not say (os.sysconf is POSIX only)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return total if total > 0 else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(need: int, what: str, fix: str) -> None:
    """Refuse `what` when it needs more bytes than the machine has memory (a lower bound: the estimates
    count one copy of the data at stake, so nothing that could have run is refused)."""
    total = machine_memory()
    if total is not None and need > total:
        raise SdtoolError(f"{what} needs {gib(need)}, more than this machine's {gib(total)} of memory; {fix}")
