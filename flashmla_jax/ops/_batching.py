"""`jax.vmap` and differentiation around the inference kernels: jax-triton has no batching rule, and the
decode-style kernels have no derivative."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Mapped(NamedTuple):
    """What a fold returns for members that cannot share one call: their outputs, already [V, ...]."""
    outputs: tuple


def member_axis(x, is_batched: bool, size: int):
    """x with a leading member axis of `size`: as it is when vmap batched it, else broadcast."""
    return x if is_batched else jnp.broadcast_to(x, (size,) + x.shape)


def fold_vmap_into_batch(fn: Callable, fold: Callable) -> Callable:
    """`jax.vmap` support for fn(*args) -> a tuple of outputs whose leading axis is the batch.

    Under vmap (V members), fold(call, V, in_batched, *args) gives the arguments of one call of `call` (fn under
    this same rule) with the members laid along the batch (B -> V * B); each output is then unfolded to
    [V, B, ...]. A fold may return Mapped(outputs) instead (e.g. from `jax.lax.map` over `call`)."""

    @jax.custom_batching.custom_vmap
    def call(*args):
        return fn(*args)

    @call.def_vmap
    def _rule(axis_size, in_batched, *args):
        folded = fold(call, axis_size, in_batched, *args)
        if isinstance(folded, Mapped):
            outs = folded.outputs
        else:
            outs = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in call(*folded))
        return outs, tuple(True for _ in outs)

    return call


def inference_only(fn: Callable, message: str) -> Callable:
    """fn, whose differentiation (jvp, grad) raises TypeError(message)."""

    @jax.custom_jvp
    def call(*args):
        return fn(*args)

    @call.defjvp
    def _jvp(primals, tangents):
        raise TypeError(message)

    return call
