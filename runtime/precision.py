"""How a run computes, not what: mixed precision (autocast dtype and gradient scaler), the
channels-last memory format, and where JPEGs are decoded. Shared by pretraining and every
harness; the config fields that select them are operational (they never enter a run's identity).

The forward pass runs under ``torch.autocast`` (``runtime.loop.Trainer``); losses and metrics are
computed from float32 values (the callers cast the outputs), so only the network's arithmetic
changes. bf16 works on CPU and CUDA; fp16 needs CUDA (and a GradScaler, which
:func:`grad_scaler` gives).
"""
from __future__ import annotations

import torch

from runtime.errors import ConfigError

AMP_CHOICES = ("off", "bf16", "fp16")
DECODE_DEVICES = ("cpu", "cuda")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full precision); ``auto`` (pretraining's
    default) is bf16 on CUDA where supported, else fp16 there, and off on CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"amp=fp16 needs a CUDA device (this run is on {device}); use amp=bf16 on CPU")
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"amp={amp!r}: expected one of {list(AMP_CHOICES)}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its small exponent range underflows gradients); None otherwise."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def check_decode_device(decode_device: str) -> None:
    """``decode_device=cuda`` decodes JPEG batches with nvJPEG (``torchvision.io.decode_jpeg``);
    refused in one line where there is no GPU."""
    if decode_device not in DECODE_DEVICES:
        raise ConfigError(f"decode_device={decode_device!r}: expected one of {list(DECODE_DEVICES)}")
    if decode_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("decode_device=cuda needs a GPU (no CUDA device here); use decode_device=cpu")
