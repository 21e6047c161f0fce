"""Which implementation runs a call: "triton" (GPU), "xla" (jnp reference) or "interpret" (Triton on CPU)."""
from __future__ import annotations

import functools

import jax

IMPLEMENTATIONS = ("triton", "xla", "interpret")


@functools.lru_cache(maxsize=None)
def has_cuda_gpu() -> bool:
    """True when JAX's default backend is a CUDA GPU."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    return device.platform == "gpu" and "cuda" in getattr(device.client, "platform_version", "cuda").lower()


def resolve_implementation(implementation: str | None) -> str:
    """Maps the user's `implementation` to one of IMPLEMENTATIONS.

    None means "triton" on a CUDA device and "xla" elsewhere. Asking for "triton" without a CUDA device
    is an error, never a silent fallback.
    """
    if implementation is None:
        return "triton" if has_cuda_gpu() else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "triton" and not has_cuda_gpu():
        raise ValueError('implementation="triton" needs a CUDA GPU as JAX\'s default backend; '
                         'use "interpret" to run the Triton kernels on the CPU, or "xla"')
    return implementation


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM when JAX does not say)."""
    if has_cuda_gpu():
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return 132
