"""Devices and precision: what 'auto', 'cpu', 'cuda:N' and a dtype name mean on this machine."""

import os
import platform
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' -> first CUDA device if any, else CPU; 'cpu'; 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: use 'auto', 'cpu' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: use 'auto', 'cpu' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 anywhere; bfloat16 on CUDA or CPU; float16 on CUDA only."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("dtype 'float16' needs a CUDA device; on CPU use 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def precision_for(device: torch.device) -> str:
    """Training precision: bf16 on CUDA devices that support it, fp16 on older ones, fp32 on CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def machine(device=None) -> str:
    """What a speed figure was measured on: the GPU's name for a CUDA device, else the CPU model and
    its core count (from /proc/cpuinfo where there is one)."""
    if device is not None and str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
