"""Paged, contiguous, layer-stacked and FP8 mla_decode calls with adversarial lengths and block tables, and sparse
(top-k) decode and prefill calls with adversarial indices, small enough to run under
`compute-sanitizer --tool memcheck` (any out-of-bounds read in the kernels is reported there)."""
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
# Under jit, so that the kernels get the garbage (concrete values raise ValueError first); the last sequence reads
# the bad entries, and mla_decode makes its rows NaN.
paged_at = jax.jit(lambda t, splits: fm.mla_decode(q, pages, lengths, t, num_splits=splits, implementation="triton"),
                   static_argnums=1)
paged = paged_at(table, 3)
# num_splits=None: the device-side schedule (a ragged batch: per-sequence splits, in-place combine)
scheduled = fm.mla_decode(q, kv, lengths, implementation="triton")
scheduled_paged = paged_at(table, None)
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
# 16 query rows: the narrow Gluon kernel's FP8 path, one split and three.
fp8_narrow = [fm.mla_decode(q[:, :1], fp8_pages, fp8_lengths, fp8_table, kv_format="fp8_blockscale", num_splits=s,
                            implementation="triton") for s in (1, 3)]
# The same pages as "fp8_pertensor" (576 e4m3 bytes a token) with the same garbage, 16 query rows in bf16 and in
# fp16: the narrow Gluon kernel's register-operand path (raw stages, the codes converted in the consumers).
pt_pages, pt_scale = fm.quantize_latent(pages, "fp8_pertensor")
pt_half = pt_pages[5].at[36:].set(0xFF)
pt_pages = jnp.concatenate([pt_pages, pt_half[None], jnp.full((1,) + pt_pages.shape[1:], 0xFF, jnp.uint8)])
pt_narrow = [fm.mla_decode(q[:, :1].astype(dtype), pt_pages, fp8_lengths, fp8_table, kv_format="fp8_pertensor",
                           kv_scale=pt_scale, num_splits=s, implementation="triton")
             for s in (1, 3) for dtype in (jnp.bfloat16, jnp.float16)]
# Sparse decode over that FP8 pool: -1, negative, past-the-pool and extreme indices, a slot into the garbage pages,
# topk_length 0 for one sequence and past topk for another; one split, a few (merged in the kernel) and many
# (the combine kernel); a stacked pool at traced layers out of range.
num_tokens = fp8_pages.shape[0] * page
bad = jnp.asarray([-1, -7, num_tokens, num_tokens + 1, 2 ** 31 - 1, -(2 ** 31)], jnp.int32)
spare = (fp8_pages.shape[0] - 1) * page + 3                       # a token of the 0xFF page (valid, NaN bytes)
good = jax.random.randint(jax.random.PRNGKey(2), (b, 2, 24 * 64), 0, 5 * page, jnp.int32)
sparse_idx = good.at[:, :, ::5].set(jnp.tile(bad, 24 * 64 // 5 // 6 + 1)[: (24 * 64 + 4) // 5])
sparse_idx = sparse_idx.at[3, :, -64:].set(spare)                 # read only by the last sequence, past its length
topk_length = jnp.asarray([0, 24 * 64, 10 ** 6, 24 * 64 - 64], jnp.int32)
sparse = [fm.mla_decode_sparse(q, fp8_pages, sparse_idx, topk_length, kv_format="fp8_blockscale", num_splits=s,
                               implementation="triton")[0] for s in (1, 3, 20)]
sparse_bf16 = fm.mla_decode_sparse(q, pages, sparse_idx, topk_length, implementation="triton")[0]
at_sparse_layer = jax.jit(lambda i: fm.mla_decode_sparse(q, jnp.stack([pages, -pages]), sparse_idx, layer=i,
                                                        implementation="triton")[0])
sparse_stacked = [at_sparse_layer(jnp.int32(i)) for i in (-1, 2)]
# The same lists for 64 heads, which "triton" runs on the Hopper Gluon kernel (its gathering producer).
q64 = jax.random.normal(jax.random.PRNGKey(3), (b, 2, 64, 576), jnp.bfloat16)
sparse64 = [fm.mla_decode_sparse(q64, fp8_pages, sparse_idx, topk_length, kv_format="fp8_blockscale", num_splits=s,
                                 implementation="triton")[0] for s in (1, 3)]
sparse64.append(fm.mla_decode_sparse(q64, pages, sparse_idx, topk_length, implementation="triton")[0])
sparse64.append(jax.jit(lambda i: fm.mla_decode_sparse(q64, jnp.stack([pages, -pages]), sparse_idx, layer=i,
                                                       implementation="triton")[0])(jnp.int32(2)))
# 32 and 128 bf16 query rows on the fp8_pertensor pages: the 64-row Gluon kernel's fp16 tiles, the query rewritten
# as fp16 by its producer.
pt_wide = [fm.mla_decode(x, pt_pages, fp8_lengths, fp8_table, kv_format="fp8_pertensor", kv_scale=pt_scale,
                         num_splits=s, implementation="triton") for x, s in ((q, 1), (q64, 3))]
# Sparse prefill: 8 tokens over the bf16 latents as a flat kv, the same kinds of bad indices, topk_length 0 for one.
kv_flat = kv.reshape(-1, 576)
prefill_idx = sparse_idx[:, 0].reshape(8, -1) % (2 * kv_flat.shape[0]) - 3       # some past N, some negative
prefill = fm.mla_prefill_sparse(q.reshape(8, 16, 576), kv_flat, prefill_idx, jnp.arange(8, dtype=jnp.int32) * 100,
                                implementation="triton")
outs = (out, paged[:3], scheduled, scheduled_paged[:3], *stacked, fp8, *fp8_narrow, *pt_narrow, *pt_wide, *sparse,
        sparse_bf16, *sparse_stacked, *sparse64, prefill[0])
jax.block_until_ready(outs)
bad_rows_nan = bool(jnp.isnan(paged[3]).all() & jnp.isnan(scheduled_paged[3]).all())
print("sanitized calls finished; NaN in outputs:", any(bool(jnp.isnan(o).any()) for o in outs),
      "; the rows that read a bad block-table entry NaN:", bad_rows_nan)
