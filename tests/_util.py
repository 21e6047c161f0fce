"""Helpers the tests share (imported as `from _util import ...`: pytest puts tests/ on sys.path, and
tests/sharding_checks.py runs from there)."""
from __future__ import annotations

from typing import Callable

import jax

from flashmla_jax import reference


def xla_prefill_bodies(causal: bool = True) -> tuple[Callable, Callable]:
    """(forward, backward) with the prefill kernel launchers' signatures, computed by the jnp reference: the
    pure-JAX bodies the CPU tests run through `partition_prefill` with plan None (the rules are the same for
    the Triton kernels)."""

    def forward(q, k, v, segment_ids, scale, plan):
        del plan
        out, lse = reference.mla_prefill_reference(q, k, v, softmax_scale=scale, causal=causal,
                                                   segment_ids=segment_ids)
        return out, lse.transpose(0, 2, 1)

    def backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan):
        del out, lse
        _, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, segment_ids, scale, plan), q, k, v)
        return vjp((dout, dlse))

    return forward, backward
