"""Partitioning rules of `mla_decode_sparse` and `mla_prefill_sparse`: plain `jax.jit` over NamedSharding inputs
runs them per shard instead of gathering the queries (flashmla_jax/_mesh.py says how a rule wraps a body).

Layouts, with mesh axes read from the operands' NamedShardings:
  * batch (DP): q, indices, topk_length and the outputs sharded on B (the prefill's tokens T).
  * heads (TP): q and the outputs sharded on H; indices are shared by a pair's heads, so they stay whole.
  * both: batch x heads.
The pool is read whole on every device: indices are positions in the whole pool, so a pool sharded on any axis
raises ValueError naming it (no layout uses a slice of it without gathering it; under jit XLA wraps the
partitioner's ValueError in a JaxRuntimeError that keeps its text). q's S_q and D axes and the
indices' S_q and topk axes are replicated (small). A mesh axis whose size does not divide the dimension it
shards raises ValueError naming both.
"""
from __future__ import annotations

import functools
from typing import Callable

from jax.experimental.custom_partitioning import custom_partitioning

from flashmla_jax._mesh import axes_of, check_divides, minus, named

SparseBody = Callable[..., tuple]
"""body(q, pool, indices, topk_length, layer) -> (out, lse) or (out, lse, max_logits): one implementation's
`attend` on one shard. q [B, S_q, H, D]; pool [N, W] or [L, N, W] with layer (a 0-d int32); indices
[B, S_q, topk] int32; topk_length None or [B] int32; out [B, S_q, H, D_v]; lse and max_logits [B, S_q, H]."""


def partitioned_sparse(body: SparseBody, *, with_max: bool) -> SparseBody:
    """body (SparseBody), partitioned under jit by the module docstring's rules. On one device, inside
    `shard_map`, or on replicated inputs the body runs as is."""

    @functools.lru_cache(maxsize=None)
    def wrapper(has_length: bool, stacked: bool):
        def fn(q, pool, indices, *rest):
            topk_length = rest[0] if has_length else None
            layer = rest[-1] if stacked else None
            return tuple(body(q, pool, indices, topk_length, layer))

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            q_s, pool_s, idx_s = arg_shapes[:3]
            len_s = arg_shapes[3] if has_length else None
            pool_axes = tuple(a for d in range(len(pool_s.shape)) for a in axes_of(pool_s.sharding, d))
            if pool_axes:
                raise ValueError(f"the sparse ops read the pool whole on every device (indices are positions in the "
                                 f"whole pool): shard q, indices and topk_length instead; got a pool sharded over "
                                 f"{pool_axes} ({pool_s.sharding.spec})")
            batch = axes_of(q_s.sharding, 0) or axes_of(idx_s.sharding, 0) or (
                axes_of(len_s.sharding, 0) if has_length else ())
            heads = minus(axes_of(q_s.sharding, 2), batch)
            b, _, h, _ = q_s.shape
            check_divides(mesh, batch, b, "the batch B (q axis 0)")
            check_divides(mesh, heads, h, "the heads H (q axis 2)")
            rows = named(mesh, batch, (), heads)
            outs = (named(mesh, batch, (), heads, ()), rows) + ((rows,) if with_max else ())
            args = (named(mesh, batch, (), heads, ()), named(mesh, *(() for _ in pool_s.shape)),
                    named(mesh, batch, (), ()))
            args += (named(mesh, batch),) if has_length else ()
            args += (named(mesh),) if stacked else ()
            return mesh, fn, outs, args

        wrapped = custom_partitioning(fn)
        # The pool and the layer get factors of their own, which partition() keeps replicated.
        rule = "b s h d, " + ("l n w" if stacked else "n w") + ", b s k" + (", b" if has_length else "")
        rule += ", " if stacked else ""                                  # the 0-d layer: no factors
        rule += " -> b s h v, b s h" + (", b s h" if with_max else "")
        wrapped.def_partition(partition=partition, sharding_rule=rule)
        return wrapped

    def attend(q, pool, indices, topk_length, layer):
        operands = (q, pool, indices) + (() if topk_length is None else (topk_length,))
        operands += () if layer is None else (layer,)
        return wrapper(topk_length is not None, layer is not None)(*operands)

    return attend
