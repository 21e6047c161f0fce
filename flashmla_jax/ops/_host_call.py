"""`host_call`: `jax.pure_callback` without its device_put, for the interpreted kernels on many CPU devices.

Why (reproduced on 8 CPU host devices, jax 0.10.2): `jax.pure_callback`'s implementation hands the host
function's NumPy inputs to `jax.device_put(args, cpu_device_0)` and then `np.asarray` waits for that
transfer. When the callback runs inside a multi-device program, the transfer can be queued behind the very
program CPU device 0 is executing, so the callback never returns and the other devices abort in their next
collective rendezvous after 40 s (about 1 run in 3 of `jax.jit(mla_decode)` over batch-sharded inputs
with implementation="interpret"; 0 in 6 with the device_put removed).

This primitive emits the same host callback (same sharding rule: MAXIMAL on device 0 under automatic
partitioning, one call per device under `shard_map`) but gives the host function the runtime's NumPy arrays
directly. It has no batching or differentiation rules (neither had our pure_callback use: `mla_decode`
folds vmap into its batch, `mla_prefill` differentiates through custom_vjp).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax._src import callback as _callback
from jax._src import core, dispatch
from jax._src.interpreters import mlir

host_call_p = core.Primitive("flashmla_host_call")
host_call_p.multiple_results = True


def host_call(fn: Callable[..., Sequence[np.ndarray]], out_shape: Sequence[jax.ShapeDtypeStruct], *args):
    """fn(*numpy arrays) -> tuple of NumPy arrays matching `out_shape`; returns a list of jax arrays."""
    avals = tuple(core.ShapedArray(s.shape, s.dtype) for s in out_shape)
    return host_call_p.bind(*args, fn=fn, result_avals=avals)


def _abstract_eval(*avals, fn, result_avals):
    del avals, fn
    return result_avals


def _lowering(ctx, *args, fn, result_avals):
    del result_avals

    def host(*flat_args):
        return tuple(np.asarray(o) for o in fn(*flat_args))

    sharding = _callback._callback_op_sharding(ctx.module_context.axis_context, None, ctx.avals_out)
    result, _, _ = _callback.emit_python_callback(
        ctx, host, None, list(args), ctx.avals_in, ctx.avals_out, has_side_effect=False,
        returns_token=False, sharding=sharding)
    return result


host_call_p.def_abstract_eval(_abstract_eval)
host_call_p.def_impl(lambda *args, **params: dispatch.apply_primitive(host_call_p, *args, **params))
# Not cacheable, like pure_callback: the lowering embeds the Python callable.
mlir.register_lowering(host_call_p, _lowering, cacheable=False)
