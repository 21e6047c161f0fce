"""Named layouts for running MLA decode on many devices: PartitionSpecs over a `jax.sharding.Mesh`.

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    layout = sharding.data_tensor_parallel(mesh)                 # batch over "data", heads over "model"
    q, kv, lens, table = sharding.shard_decode_inputs(layout, q, kv, lens)
    out = jax.jit(flashmla_jax.mla_decode)(q, kv, lens)          # runs per shard; out is laid out as layout.out

Plain `jax.jit` over inputs placed this way partitions every op (flashmla_jax/_mesh.py says how the rules
work); nothing here is needed inside the jitted function. The roles:
  * batch (DP): q, cache, lengths, block table and outputs sharded on B.
  * heads (TP): q and outputs sharded on H; the latent cache is replicated over the head axes (all heads
    read the same latent rows).
  * sequence (CP, contiguous cache): the cache sharded on N; each device attends over its slice and the
    partial outputs are merged by an LSE-weighted combine (collectives over the sequence axes).
Paged caches under DP: `pool="sharded"` (the default) gives each device its own page pool,
[num_blocks / D, page_size, 576]: device k holds global pages [k * num_blocks / D, (k + 1) * num_blocks / D),
and every page a sequence of device k reads must lie there (block-table entries stay global indices;
LatentCache.create's default table satisfies this when num_blocks = B * max_blocks). A violating sequence
gets NaN. `pool="replicated"` keeps the whole pool on every device (any table; D times the memory).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flashmla_jax import _mesh
from flashmla_jax._mesh import Axes


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Mesh axes per role for `mla_decode` (and `LatentCache`), and the PartitionSpec of every operand.

    Fields: mesh; batch, heads, sequence: tuples of mesh axis names (empty: that dimension is not sharded);
    pool: for a paged cache under DP, "sharded" (per-device pools) or "replicated".
    Specs: q [B, S_q, H, D], kv_cache [B, N, D], paged_kv_cache [num_blocks, page_size, D],
    cache_seqlens [B], block_table [B, max_blocks], out [B, S_q, H, D_v], lse [B, S_q, H].
    """
    mesh: Mesh
    batch: Axes = ()
    heads: Axes = ()
    sequence: Axes = ()
    pool: Literal["sharded", "replicated"] = "sharded"

    def __post_init__(self):
        roles = self.batch + self.heads + self.sequence
        for a in roles:
            if a not in self.mesh.axis_names:
                raise ValueError(f"mesh axis {a!r} is not in the mesh's axes {self.mesh.axis_names}")
        if len(set(roles)) != len(roles):
            raise ValueError(f"a mesh axis may serve one role only: batch={self.batch}, heads={self.heads}, "
                             f"sequence={self.sequence}")
        if self.pool not in ("sharded", "replicated"):
            raise ValueError(f"pool must be 'sharded' or 'replicated', got {self.pool!r}")

    @property
    def q(self) -> P:
        return P(_mesh.entry(self.batch), None, _mesh.entry(self.heads), None)

    @property
    def kv_cache(self) -> P:
        return P(_mesh.entry(self.batch), _mesh.entry(self.sequence), None)

    @property
    def paged_kv_cache(self) -> P:
        return P(_mesh.entry(self.batch) if self.pool == "sharded" else None, None, None)

    @property
    def cache_seqlens(self) -> P:
        return P(_mesh.entry(self.batch))

    @property
    def block_table(self) -> P:
        return P(_mesh.entry(self.batch), None)

    @property
    def out(self) -> P:
        return P(_mesh.entry(self.batch), None, _mesh.entry(self.heads), None)

    @property
    def lse(self) -> P:
        return P(_mesh.entry(self.batch), None, _mesh.entry(self.heads))

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def size(self, axes: Axes) -> int:
        """Devices along `axes` of this layout's mesh."""
        return _mesh.size(self.mesh, axes)

    def check(self, q_shape: tuple, kv_shape: tuple, paged: bool):
        """Raises ValueError naming the mesh axis and the dimension when an axis does not divide it, or
        when the layout cannot apply (sequence sharding of a paged cache)."""
        b, _, h, _ = q_shape
        dims = [(self.batch, b, "the batch B (q axis 0)"), (self.heads, h, "the heads H (q axis 2)")]
        if paged:
            if self.sequence:
                raise ValueError(f"sequence (context-parallel) sharding over {_mesh.entry(self.sequence)!r} needs a "
                                 "contiguous kv_cache [B, N, D]; a paged pool is sharded only over the batch axes")
            if self.pool == "sharded":
                dims.append((self.batch, kv_shape[0], "the paged kv_cache's num_blocks (axis 0)"))
        else:
            dims.append((self.sequence, kv_shape[1], "the kv_cache's N (axis 1)"))
        for axes, extent, what in dims:
            _mesh.check_divides(self.mesh, axes, extent, what)


def data_parallel(mesh: Mesh, axis="data", pool: str = "sharded") -> DecodeLayout:
    """Batch over `axis` (a name or a tuple of names)."""
    return DecodeLayout(mesh, batch=_mesh.as_axes(axis), pool=pool)


def tensor_parallel(mesh: Mesh, axis="model") -> DecodeLayout:
    """Heads over `axis`; the cache replicated."""
    return DecodeLayout(mesh, heads=_mesh.as_axes(axis))


def context_parallel(mesh: Mesh, axis="seq") -> DecodeLayout:
    """The contiguous cache's N over `axis`; q and outputs replicated."""
    return DecodeLayout(mesh, sequence=_mesh.as_axes(axis))


def data_tensor_parallel(mesh: Mesh, data="data", model="model", pool: str = "sharded") -> DecodeLayout:
    """Batch over `data`, heads over `model`."""
    return DecodeLayout(mesh, batch=_mesh.as_axes(data), heads=_mesh.as_axes(model), pool=pool)


def data_context_parallel(mesh: Mesh, data="data", seq="seq") -> DecodeLayout:
    """Batch over `data`, the contiguous cache's N over `seq`."""
    return DecodeLayout(mesh, batch=_mesh.as_axes(data), sequence=_mesh.as_axes(seq))


def shard_decode_inputs(layout: DecodeLayout, q: jax.Array, kv_cache: jax.Array, cache_seqlens: jax.Array,
                        block_table: jax.Array | None = None):
    """Places `mla_decode`'s inputs in `layout` (jax.device_put) after checking that it applies.

    q [B, S_q, H, D]; kv_cache [B, N, D] or [num_blocks, page_size, D] with block_table [B, max_blocks].
    Returns (q, kv_cache, cache_seqlens, block_table) with block_table None when given None.
    """
    paged = block_table is not None
    layout.check(q.shape, kv_cache.shape, paged)
    put = lambda x, spec: jax.device_put(x, layout.sharding(spec))
    return (put(q, layout.q), put(kv_cache, layout.paged_kv_cache if paged else layout.kv_cache),
            put(cache_seqlens, layout.cache_seqlens), put(block_table, layout.block_table) if paged else None)


def shard_cache(layout: DecodeLayout, cache):
    """A LatentCache placed in `layout` (its kv, lengths and block table); appends and decodes under jit
    then run per shard."""
    # The heads role does not apply to the cache: check only batch, sequence and pool.
    layout.check((cache.batch, 1, layout.size(layout.heads), cache.dim), cache.kv.shape, cache.paged)
    put = lambda x, spec: jax.device_put(x, layout.sharding(spec))
    return dataclasses.replace(
        cache, kv=put(cache.kv, layout.paged_kv_cache if cache.paged else layout.kv_cache),
        seqlens=put(cache.seqlens, layout.cache_seqlens),
        block_table=None if cache.block_table is None else put(cache.block_table, layout.block_table))
