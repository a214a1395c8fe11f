"""Which float precision a stage runs in, chosen by what the hardware does natively.

torch emulates bf16 on a CPU without avx512_bf16/AMX, and there the small VAE's training loss
became NaN from its second step (decoder temporal ResNet gradients). So `auto` picks bf16 only
where the hardware has it, and an explicit bf16 on such a CPU is refused before any work.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Test hook: OSV_CPU_FLAGS="flag flag ..." replaces /proc/cpuinfo's flags (pretend to be another CPU).
FLAGS_ENV = "OSV_CPU_FLAGS"
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX), ARM ("bf16" feature)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unknown)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return set(override.split())
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: str) -> bool:
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def resolve(requested: str, device: str, key: str) -> str:
    """'fp32' or 'bf16' for a params value of auto/fp32/bf16; ParamsError for bf16 without hardware support."""
    from osv.params import ParamsError

    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device):
        raise ParamsError(f"{key} = bf16, but this {device} has no native bf16 ({cpu_name()}: no "
                          f"{'/'.join(sorted(NATIVE_BF16_FLAGS - {'bf16'}))}); torch emulates it and training "
                          f"diverged to NaN on such CPUs. Use {key}: auto (fp32 here) or fp32")
    return requested


def precision_flags() -> list[str]:
    """The CPU flags that bear on precision and speed (bf16, AMX, AVX-512, AVX2), for provenance."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in {"avx2", "bf16"})


def describe_device(device: str) -> dict:
    """What a metric was computed on: device name, the CPU's bf16/AVX-512 flags, threads."""
    import torch

    out = {"device": device, "cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_flags": precision_flags()}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def cuda_autocast(device: str):
    """bf16 (else fp16) autocast on CUDA only; the CPU stays fp32 so results are exact and repeatable
    (and the parity tests hold). Returns (context, name of the precision)."""
    import contextlib

    if device != "cuda":
        return contextlib.nullcontext(), "fp32"
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), f"{str(dtype).removeprefix('torch.')} autocast"
