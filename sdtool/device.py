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
    # Every command that computes takes --device (train, distill and pipeline write it into the recipe's
    # train.device), so one fix fits them all.
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SdtoolError(f"device {name} requested but CUDA is not available here; {_FIX}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SdtoolError(f"device {name} requested but MPS is not available here; {_FIX}")
    return dev


_FIX = "use --device cpu or --device auto"


def set_threads(n: int | None) -> None:
    """`--threads N` for commands that run torch in this process: its global CPU thread count."""
    if n is None:
        return
    if n < 1:
        raise SdtoolError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (which needs a gradient scaler); None = full precision."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_channels_last(setting: str | bool, device: torch.device) -> bool:
    """Resolve `train.channels_last` (auto, true or false) for `device`.

    `auto` is a fixed rule per device type, never a measurement at run time, so one recipe on one device
    always trains in the same format: on for CUDA (cudnn's NHWC kernels, tensor cores under AMP) and for
    the CPU, where oneDNN's NHWC kernels measured faster for plain and self-distillation training alike
    (1.1x to 1.4x per step, ResNet18 widths 16 and 64: `benchmarks/train_step.py --memory-format both`);
    off for MPS, which was not measured.
    """
    if setting == "auto":
        return device.type in ("cuda", "cpu")
    return setting is True
