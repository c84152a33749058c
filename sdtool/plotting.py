"""matplotlib, loaded only where a picture is drawn: it is the `plot` extra, not a core dependency.

Commands that draw (the early-exit sweep, `sdtool report`) ask `pyplot()`; without matplotlib they write
everything else and say once, in the words of `PLOT_HINT`, how to get the pictures too.
"""

from __future__ import annotations

from types import ModuleType

PLOT_HINT = "matplotlib is not installed, so no PNG plots were drawn; pip install 'sdtool[plot]' to get them"


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
