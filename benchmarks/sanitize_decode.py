"""Paged, contiguous, layer-stacked and FP8 mla_decode calls with adversarial lengths and block tables, small enough to
run under `compute-sanitizer --tool memcheck` (any out-of-bounds read in the kernels is reported there)."""
import jax
import jax.numpy as jnp

import flashmla_jax as fm

b, n, page = 4, 512, 64
q = jax.random.normal(jax.random.PRNGKey(0), (b, 2, 16, 576), jnp.bfloat16)
kv = jax.random.normal(jax.random.PRNGKey(1), (b, n, 576), jnp.bfloat16)
lengths = jnp.asarray([0, -7, 1, 10 ** 6], jnp.int32)            # empty, negative, one token, past capacity
out = fm.mla_decode(q, kv, lengths, num_splits=5, implementation="triton")
pages = kv.reshape(b * n // page, page, 576)
table = jnp.asarray([[0, 1, -1, 10 ** 6, 7, 2 ** 31 - 1, 3, -(2 ** 31)]] * b, jnp.int32)   # garbage indices
paged = fm.mla_decode(q, pages, lengths, table, num_splits=3, implementation="triton")
# num_splits=None: the device-side schedule (a ragged batch: per-sequence splits, in-place combine)
scheduled = fm.mla_decode(q, kv, lengths, implementation="triton")
scheduled_paged = fm.mla_decode(q, pages, lengths, table, implementation="triton")
# A layer-stacked cache read at traced layers out of range (-1 and L): clamped, never read outside the stack.
stack = jnp.stack([kv, -kv])
at_layer = jax.jit(lambda i: fm.mla_decode(q, stack, lengths, layer=i, num_splits=2, implementation="triton"))
stacked = [at_layer(jnp.int32(i)) for i in (-1, 2)]
# An FP8 (blockscale) paged cache with a half-used page whose other slots hold 0xFF bytes (e4m3 NaN codes, NaN
# scales), and a spare page of them that the garbage block-table entries may be clamped onto: no NaN may result.
fp8_pages = fm.quantize_latent(pages, "fp8_blockscale")
half = fp8_pages[5].at[36:].set(0xFF)
fp8_pages = jnp.concatenate([fp8_pages, half[None], jnp.full((1,) + fp8_pages.shape[1:], 0xFF, jnp.uint8)])
fp8_table = table.at[:, 1].set(fp8_pages.shape[0] - 2).at[:, 2].set(fp8_pages.shape[0] - 1)
fp8_lengths = jnp.asarray([0, -7, 1, 64 + 36], jnp.int32)       # the last one ends in the half-used page
fp8 = fm.mla_decode(q, fp8_pages, fp8_lengths, fp8_table, kv_format="fp8_blockscale", implementation="triton")
outs = (out, paged, scheduled, scheduled_paged, *stacked, fp8)
jax.block_until_ready(outs)
print("sanitized calls finished; NaN in outputs:", any(bool(jnp.isnan(o).any()) for o in outs))
