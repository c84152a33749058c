"""sdtool: self-distillation, real early exit and structured pruning for CNNs."""

__version__ = "0.1.0"

from sdtool.errors import SdtoolError  # noqa: E402  (re-exported for library users)

__all__ = ["SdtoolError", "__version__"]
