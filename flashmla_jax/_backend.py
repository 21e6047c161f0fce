"""What the machine offers the implementations: a CUDA GPU and its compute capability, and the SM count the
decode schedule plans for (which implementation runs a call is ops/_registry.py's choice)."""
from __future__ import annotations

import functools

import jax


# Triton's interpreter has no SMs; plans made for it assume an H100 SXM's 132 so that the interpreted kernels
# run the schedule the GPU would (tests set their own count where the schedule is the point).
INTERPRETER_SMS = 132


@functools.lru_cache(maxsize=None)
def has_cuda_gpu() -> bool:
    """True when JAX's default backend is a CUDA GPU."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    return device.platform == "gpu" and "cuda" in getattr(device.client, "platform_version", "cuda").lower()


@functools.lru_cache(maxsize=None)
def cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of JAX's default CUDA device, e.g. (9, 0) on an H100 or H200; None without one."""
    if not has_cuda_gpu():
        return None
    text = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    major, _, minor = text.partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() else None


def num_sms(implementation: str) -> int:
    """Streaming multiprocessors the split-KV schedule plans for: the CUDA device's own count for
    "triton", INTERPRETER_SMS for "interpret"."""
    if implementation == "interpret":
        return INTERPRETER_SMS
    return _device_sms()


@functools.lru_cache(maxsize=None)
def _device_sms() -> int:
    count = getattr(jax.devices()[0], "core_count", None) if has_cuda_gpu() else None
    if not count:
        raise RuntimeError("the default JAX device reports no SM count (core_count): the Triton decode "
                           "schedule needs a CUDA GPU")
    return int(count)
