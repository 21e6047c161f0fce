"""Layer-stacked latent caches: `mla_decode(..., layer=)`, `LatentCache(num_layers=)`, scans over layers and
the Flax layer under `nnx.scan` — each against L separate, unstacked caches (the semantics they promise)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flashmla_jax as fm
from flashmla_jax import LatentCache
from flashmla_jax.flax import MultiHeadLatentAttention, mla_attention
from _util import rel_err
from flashmla_jax.scanned_step import jit_scanned_step

SMALL = dict(head_dim_v=64)          # D = 96: the same kernels as 576 wide, fast to interpret
D = 96


def stacked_inputs(seed, layers, b, s_q, h, n, seqlens, dtype=jnp.float32):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h, D), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (layers, b, n, D), jnp.float32).astype(dtype)
    return q, kv, jnp.asarray(seqlens, jnp.int32)


# ---------------------------------------------------------------- mla_decode(layer=)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("s_q,num_splits", [(1, None), (3, 2)])
def test_decode_layer_equals_slice(implementation, s_q, num_splits):
    q, kv, sl = stacked_inputs(0, 3, 3, s_q, 2, 64, [0, 17, 64])
    for layer in (0, 2, np.int64(1)):
        out, lse = fm.mla_decode(q, kv, sl, layer=layer, num_splits=num_splits, return_lse=True,
                                 implementation=implementation, **SMALL)
        want, want_lse = fm.mla_decode(q, kv[int(layer)], sl, num_splits=num_splits, return_lse=True,
                                       implementation="xla", **SMALL)
        assert rel_err(out, want) < 1e-5
        np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_decode_traced_layer_is_clamped(implementation):
    q, kv, sl = stacked_inputs(1, 3, 2, 1, 2, 32, [5, 32])
    f = jax.jit(lambda i: fm.mla_decode(q, kv, sl, layer=i, implementation=implementation, **SMALL))
    for layer, used in ((-1, 0), (1, 1), (3, 2), (100, 2)):
        want = fm.mla_decode(q, kv[used], sl, implementation="xla", **SMALL)
        assert rel_err(f(jnp.int32(layer)), want) < 1e-5, layer


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_decode_layer_paged(implementation):
    b, n, page = 2, 64, 16
    q, kv, sl = stacked_inputs(2, 2, b, 1, 2, n, [9, 64])
    per_seq = n // page
    perm = np.random.default_rng(0).permutation(b * per_seq + 2)[: b * per_seq].reshape(b, per_seq)
    pages = np.full((2, b * per_seq + 2, page, D), np.nan, np.float32)     # NaN in the spare pages
    for layer in range(2):
        pages[layer, perm.reshape(-1)] = np.asarray(kv[layer]).reshape(b * per_seq, page, D)
    table = jnp.asarray(perm, jnp.int32)
    for layer in range(2):
        out = fm.mla_decode(q, jnp.asarray(pages), sl, table, layer=layer, implementation=implementation, **SMALL)
        want = fm.mla_decode(q, kv[layer], sl, implementation="xla", **SMALL)
        assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_decode_layer_under_vmap(implementation):
    q, kv, sl = stacked_inputs(3, 3, 2, 1, 2, 32, [7, 32])
    qs = jnp.stack([q, -q])
    out = jax.vmap(lambda q, i: fm.mla_decode(q, kv, sl, layer=i, implementation=implementation, **SMALL))(
        qs, jnp.array([2, 0], jnp.int32))
    assert rel_err(out[0], fm.mla_decode(q, kv[2], sl, implementation="xla", **SMALL)) < 1e-5
    assert rel_err(out[1], fm.mla_decode(-q, kv[0], sl, implementation="xla", **SMALL)) < 1e-5


def test_decode_layer_errors():
    q, kv, sl = stacked_inputs(4, 3, 2, 1, 2, 32, [1, 2])
    with pytest.raises(ValueError, match=r"layer must be an int \[0, "):
        fm.mla_decode(q, kv, sl, layer=3, **SMALL)
    with pytest.raises(ValueError, match=r"layer must be an int \[0, "):
        fm.mla_decode(q, kv, sl, layer=-1, **SMALL)
    with pytest.raises(TypeError, match="layer"):
        fm.mla_decode(q, kv, sl, layer=True, **SMALL)
    with pytest.raises(TypeError, match="layer"):
        fm.mla_decode(q, kv, sl, layer=1.0, **SMALL)
    with pytest.raises(ValueError, match="kv_cache"):
        fm.mla_decode(q, kv[0], sl, layer=0, **SMALL)          # not stacked
    with pytest.raises(ValueError, match="kv_cache"):
        fm.mla_decode(q, kv, sl, **SMALL)                      # stacked without a layer


# ---------------------------------------------------------------- LatentCache(num_layers=)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_stacked_cache_equals_separate_caches(page_size, implementation):
    layers, b, h = 3, 2, 2
    stacked = LatentCache.create(b, 48, dim=D, dtype=jnp.float32, page_size=page_size, num_layers=layers)
    separate = [LatentCache.create(b, 48, dim=D, dtype=jnp.float32, page_size=page_size) for _ in range(layers)]
    key = jax.random.PRNGKey(5)
    for step, s in enumerate((5, 1, 3)):
        for layer in range(layers):
            key, kx, kq = jax.random.split(key, 3)
            x = jax.random.normal(kx, (b, s, D))
            q = jax.random.normal(kq, (b, s, h, D))
            num_new = jnp.array([s, max(s - 1 - layer, 0)], jnp.int32)       # ragged, and differing by layer
            stacked = stacked.append(x, num_new=num_new, layer=layer)
            separate[layer] = separate[layer].append(x, num_new=num_new)
            out = stacked.decode(q, layer=layer, implementation=implementation, **SMALL)
            want = separate[layer].decode(q, implementation="xla", **SMALL)
            assert rel_err(out, want) < 1e-5, (step, layer)
    for layer in range(layers):
        np.testing.assert_array_equal(stacked.lengths(layer), separate[layer].seqlens)
        got = stacked.kv[layer]
        np.testing.assert_array_equal(got, separate[layer].kv)


def test_stacked_append_drops_past_capacity_and_never_writes_other_layers():
    cache = LatentCache.create(2, 8, dim=D, dtype=jnp.float32, num_layers=2)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 11, D))
    cache = cache.append(x, layer=1)
    np.testing.assert_array_equal(cache.seqlens, [[0, 0], [8, 8]])
    np.testing.assert_array_equal(cache.kv[0], 0)                       # layer 0 untouched
    np.testing.assert_array_equal(cache.kv[1], x[:, :8])
    traced = jax.jit(lambda c, i: c.append(x[:, :2], layer=i))(cache, jnp.int32(-5))   # clamped to 0
    np.testing.assert_array_equal(traced.seqlens, [[2, 2], [8, 8]])


def test_stacked_cache_errors():
    cache = LatentCache.create(2, 8, dim=D, num_layers=2)
    x = jnp.zeros((2, 1, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="pass layer="):
        cache.append(x)
    with pytest.raises(ValueError, match=r"layer must be an int \[0, "):
        cache.append(x, layer=2)
    with pytest.raises(TypeError, match="layer"):
        cache.append(x, layer=False)
    with pytest.raises(ValueError, match="needs a layer-stacked cache"):
        LatentCache.create(2, 8, dim=D).append(x, layer=0)
    with pytest.raises(ValueError, match="num_layers"):
        LatentCache.create(2, 8, dim=D, num_layers=0)
    assert cache.kv.shape == (2, 2, 8, D) and cache.seqlens.shape == (2, 2) and cache.batch == 2
    paged = LatentCache.create(2, 40, dim=D, page_size=16, num_layers=3)
    assert paged.kv.shape == (3, 6, 16, D) and paged.block_table.shape == (2, 3)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_scan_over_layers_equals_python_loop(implementation):
    layers, b, h = 3, 2, 2
    xs = jax.random.normal(jax.random.PRNGKey(7), (layers, b, 1, D))
    qs = jax.random.normal(jax.random.PRNGKey(8), (layers, b, 1, h, D))
    start = LatentCache.create(b, 32, dim=D, dtype=jnp.float32, num_layers=layers)
    start = start.append(jax.random.normal(jax.random.PRNGKey(9), (b, 4, D)), layer=0)

    def layer_step(cache, inputs):
        i, x, q = inputs
        cache = cache.append(x, layer=i)
        return cache, cache.decode(q, layer=i, implementation=implementation, **SMALL)

    step = jax.jit(lambda c: jax.lax.scan(layer_step, c, (jnp.arange(layers), xs, qs)), donate_argnums=0)
    got_cache, got = step(jax.tree.map(jnp.copy, start))
    cache, want = start, []
    for i in range(layers):
        cache = cache.append(xs[i], layer=i)
        want.append(cache.decode(qs[i], layer=i, implementation="xla", **SMALL))
    assert rel_err(got, jnp.stack(want)) < 1e-5
    np.testing.assert_array_equal(got_cache.seqlens, cache.seqlens)
    np.testing.assert_array_equal(got_cache.kv, cache.kv)


def test_donated_scanned_step_copies_no_cache_xla():
    """The compiled HLO of a donated, scanned model step (xla implementation, CPU) holds no copy of the
    stacked cache and no slice of one layer: no `copy`, `dynamic-slice` or `slice` instruction whose
    result has the stacked cache's shape [L, B, N, D] or one layer's [B, N, D] (float32: XLA's CPU
    backend widens bfloat16 scatters). Without the donation the same step compiles to a `copy` of the
    stack, which this catches; on the CPU a slice of one layer fuses into its consumer either way, so
    the GPU test below is the one that guards the Triton call's operand."""
    layers, b, n = 4, 2, 256
    cache = LatentCache.create(b, n, dim=D, dtype=jnp.float32, num_layers=layers)
    q = jnp.ones((b, 1, 2, D), jnp.float32)
    x = jnp.ones((b, 1, D), jnp.float32)

    def model_step(cache):
        def layer_step(cache, i):
            cache = cache.append(x, layer=i)
            return cache, cache.decode(q, layer=i, implementation="xla", **SMALL)
        return jax.lax.scan(layer_step, cache, jnp.arange(layers))

    hlo = jax.jit(model_step, donate_argnums=0).lower(cache).compile().as_text()
    shapes = {f"f32[{layers},{b},{n},{D}]", f"f32[{b},{n},{D}]"}
    offending = [line for line in hlo.splitlines()
                 if re.search(r"= (\S+) (copy|dynamic-slice|slice)\(", line)
                 and re.search(r"= (\S+) ", line).group(1).split("{")[0] in shapes]
    assert not offending, "\n".join(offending)


# ---------------------------------------------------------------- the Flax layer under nnx.scan


def test_nnx_scan_over_stacked_layers_equals_unrolled():
    """nnx.scan over an nnx.vmap-built stack equals L unrolled layers, run eagerly and, as
    MultiHeadLatentAttention's docstring compiles it, by jit_scanned_step with the cache donated."""
    layers, b, s, hidden, heads = 3, 2, 2, 32, 2
    dims = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, implementation="xla")

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return MultiHeadLatentAttention(hidden, heads, rngs=rngs, **dims)

    stack = make(nnx.Rngs(0))
    latent = 32 + 8
    x = jax.random.normal(jax.random.PRNGKey(10), (b, s, hidden))
    x2 = jax.random.normal(jax.random.PRNGKey(11), (b, 1, hidden))
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    pos2 = jnp.full((b, 1), s, jnp.int32)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(attn, carry):
        x, positions, cache, i = carry
        y, cache = attn(x, positions, cache, layer=i)
        return x + y, positions, cache, i + 1

    cache = LatentCache.create(b, 16, dim=latent, dtype=jnp.float32, num_layers=layers)
    h1, _, cache, _ = run(stack, (x, pos, cache, jnp.int32(0)))             # a 2-token prompt
    graphdef, state = nnx.split(stack)
    step = jit_scanned_step(lambda state, x, cache: run(nnx.merge(graphdef, state), (x, pos2, cache, jnp.int32(0))),
                            donate_argnums=2)
    jitted, _, jitted_cache, _ = step(state, x2, jax.tree.map(jnp.copy, cache))
    h2, _, cache, _ = run(stack, (x2, pos2, cache, jnp.int32(0)))           # one decode step
    assert rel_err(jitted, h2) < 1e-6
    np.testing.assert_array_equal(jitted_cache.kv, cache.kv)

    params = [{k: v[i] for k, v in stack.params_dict().items()} for i in range(layers)]
    caches = [LatentCache.create(b, 16, dim=latent, dtype=jnp.float32) for _ in range(layers)]
    for x_in, positions, scanned in ((x, pos, h1), (x2, pos2, h2)):
        h = x_in
        for i in range(layers):
            y, caches[i] = mla_attention(params[i], h, positions, caches[i], config=stack.config,
                                         implementation="xla")
            h = h + y
        assert rel_err(scanned, h) < 1e-5
    np.testing.assert_array_equal(cache.seqlens, np.full((layers, b), s + 1))


# ---------------------------------------------------------------- GPU: no copy of the cache in a scanned step


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 64])
def test_gpu_scanned_step_reads_stacked_cache_in_place(page_size):
    """D1-like sizes, 4 layers, triton: the compiled HLO of a donated, scanned decode step holds no `copy`,
    `dynamic-slice` or `slice` whose result has the stacked cache's shape or one layer's, and the step
    equals the xla implementation."""
    layers, b, n, h = 4, 16, 1024, 16
    cache = LatentCache.create(b, n, dtype=jnp.bfloat16, page_size=page_size, num_layers=layers)
    key = jax.random.PRNGKey(0)
    for i in range(layers):
        key, k = jax.random.split(key)
        cache = cache.append(jax.random.normal(k, (b, n - 8, 576), jnp.bfloat16), layer=i)
    xs = jax.random.normal(jax.random.PRNGKey(1), (layers, b, 1, 576), jnp.bfloat16)
    qs = jax.random.normal(jax.random.PRNGKey(2), (layers, b, 1, h, 576), jnp.bfloat16)

    def model_step(cache, implementation):
        def layer_step(cache, inputs):
            i, x, q = inputs
            cache = cache.append(x, layer=i)
            return cache, cache.decode(q, layer=i, softmax_scale=192 ** -0.5, implementation=implementation)
        return jax.lax.scan(layer_step, cache, (jnp.arange(layers), xs, qs))

    step = jax.jit(lambda c: model_step(c, "triton"), donate_argnums=0)
    hlo = step.lower(cache).compile().as_text()
    one_layer = cache.kv.shape[1:]
    shapes = {"bf16[" + ",".join(map(str, s)) + "]" for s in (cache.kv.shape, one_layer)}
    offending = [line for line in hlo.splitlines()
                 if re.search(r"= (\S+) (copy|dynamic-slice|slice)\(", line)
                 and re.search(r"= (\S+) ", line).group(1).split("{")[0] in shapes]
    assert not offending, "\n".join(offending)
    want_cache, want = jax.jit(lambda c: model_step(c, "xla"))(cache)
    got_cache, got = step(jax.tree.map(jnp.copy, cache))
    assert rel_err(got, want) < 1e-2
    np.testing.assert_array_equal(got_cache.seqlens, want_cache.seqlens)
