"""Device choice and mixed-precision settings."""

from __future__ import annotations

import torch

from sdtool.errors import SdtoolError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; explicit names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SdtoolError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SdtoolError(f"device {name} requested but CUDA is not available here; use --set train.device=cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SdtoolError(f"device {name} requested but MPS is not available here; use --set train.device=cpu")
    return dev


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (which needs a gradient scaler); None = full precision."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
