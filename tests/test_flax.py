"""The Flax MLA layer (flashmla_jax.flax): hyperparameters and YaRN, RoPE, the absorption helpers, the layer
against a float64 NumPy forward pass, absorbed (cached) attention == non-absorbed attention of the same
layer, prefill + token-by-token decode == one long prefill, and the API's errors. CPU, small dims."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import flashmla_jax as fm  # noqa: E402
from flashmla_jax import flax as fmx  # noqa: E402
from _util import rel_err  # noqa: E402


# Small dims; RoPE theta and YaRN's original context are small too, so that positions < 40 turn the
# frequencies enough to matter.
SMALL = dict(hidden_size=48, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=24, rope_theta=100.0)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=8.0, beta_slow=1.0,
            mscale=0.9, mscale_all_dim=0.7)
V3_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=1.0)
TOL = 1e-4


def make_layer(seed=0, *, q_lora_rank=None, rope_scaling=None, dtype=None, implementation="xla", **overrides):
    """A layer with fresh random weights, its RMSNorm weights randomised too (so a skipped norm fails)."""
    dims = {**SMALL, **overrides}
    layer = fmx.MultiHeadLatentAttention(**dims, q_lora_rank=q_lora_rank, rope_scaling=rope_scaling, dtype=dtype,
                                         implementation=implementation, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1000)
    for name in ("q_norm", "kv_norm"):
        if hasattr(layer, name):
            param = getattr(layer, name)
            param[...] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(param[...].shape), param[...].dtype)
    return layer


def make_tokens(seed, b, s, hidden, start=0):
    """x [B, S, hidden] ~ N(0, 1) and positions [B, S] = start + arange(S)."""
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, s, hidden)), jnp.float32)
    positions = jnp.asarray(np.broadcast_to(start + np.arange(s, dtype=np.int32), (b, s)))
    return x, positions


def mla_numpy(params, x, positions, config):
    """float64 DeepSeek MLA forward (non-absorbed, causal), written independently: complex-number RoPE."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    pos = np.asarray(positions, np.float64)
    c, eps = config, config.rms_norm_eps

    def norm(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    def rope(v):  # v [B, S, ..., R]
        z = v[..., 0::2] + 1j * v[..., 1::2]
        angle = pos[..., None] * c.rope_inv_freq()
        rot = np.exp(1j * angle).reshape(angle.shape[:2] + (1,) * (v.ndim - 3) + angle.shape[2:])
        z = z * rot * c.rope_magnitude
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    if c.q_lora_rank is None:
        q = np.einsum("bsm,mhd->bshd", x, p["wq"])
    else:
        q = np.einsum("bsq,qhd->bshd", norm(x @ p["wq_a"], p["q_norm"]), p["wq_b"])
    q = np.concatenate([q[..., :c.qk_nope_head_dim], rope(q[..., c.qk_nope_head_dim:])], axis=-1)
    kv_a = x @ p["wkv_a"]
    c_kv = norm(kv_a[..., :c.kv_lora_rank], p["kv_norm"])
    k_pe = rope(kv_a[..., c.kv_lora_rank:])
    kv = np.einsum("bsc,chd->bshd", c_kv, p["wkv_b"])
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], axis=-1)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * c.softmax_scale
    n = x.shape[1]
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    prob = np.exp(scores - scores.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", prob, v)
    return np.einsum("bshv,hvm->bsm", o, p["wo"])


def new_cache(layer, batch, max_len, dtype=jnp.float32, page_size=None):
    return fm.LatentCache.create(batch, max_len, dim=layer.config.latent_dim, dtype=dtype, page_size=page_size)


@nnx.jit(static_argnames=("cache_empty",))
def layer_step(layer, x, positions, cache, cache_empty=False):
    return layer(x, positions, cache, cache_empty=cache_empty)


# ---------------------------------------------------------------- hyperparameters, YaRN, RoPE

def test_softmax_scale_follows_deepseek():
    assert fmx.MLAConfig(1024, 16).softmax_scale == pytest.approx(192 ** -0.5)
    v3 = fmx.MLAConfig(1024, 16, rope_scaling=V3_YARN)
    assert v3.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192))
    assert v3.rope_magnitude == pytest.approx(1.0)
    v2 = fmx.MLAConfig(1024, 16, rope_scaling={**V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
    assert v2.softmax_scale == pytest.approx((0.0707 * math.log(40) + 1) ** 2 / math.sqrt(192))
    # mscale_all_dim absent (0): no temperature on the softmax, the whole mscale on cos/sin.
    only_rope = fmx.MLAConfig(1024, 16, rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0})
    assert only_rope.softmax_scale == pytest.approx(192 ** -0.5)
    assert only_rope.rope_magnitude == pytest.approx(0.1 * math.log(40) + 1)


def test_yarn_frequencies_keep_fast_and_stretch_slow():
    plain = fmx.MLAConfig(1024, 16).rope_inv_freq()
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 64, 2) / 64))
    yarn = fmx.MLAConfig(1024, 16, rope_scaling=V3_YARN).rope_inv_freq()
    ratio = yarn / plain
    # DeepSeek-V3: pairs below index floor(64 ln(4096 / 64π) / 2 ln 1e4) = 10 keep their frequency, pairs from
    # ceil(64 ln(4096 / 2π) / 2 ln 1e4) = 23 on are divided by the factor, a linear blend in between.
    np.testing.assert_allclose(ratio[:11], 1.0)
    np.testing.assert_allclose(ratio[23:], 1 / 40)
    blend = (np.arange(11, 23) - 10) / 13
    np.testing.assert_allclose(ratio[11:23], (1 - blend) + blend / 40)


def test_rope_is_relative_and_norm_preserving():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    inv_freq = fmx.MLAConfig(48, 3, qk_rope_head_dim=8, rope_theta=100.0).rope_inv_freq()
    pos = jnp.asarray([[0, 1, 2, 7, 11], [3, 3, 9, 20, 40]], jnp.int32)

    @jax.jit
    def rotate(pos):
        q_rot, k_rot = fmx.apply_rope(q, pos, inv_freq), fmx.apply_rope(k, pos, inv_freq)
        return q_rot, jnp.einsum("bshr,btr->bhst", q_rot, k_rot)

    q0, scores0 = rotate(pos)
    _, scores17 = rotate(pos + 17)
    assert rel_err(scores17, scores0) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(q0, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    assert rel_err(q0, q) > 0.1                                      # it really rotates
    np.testing.assert_allclose(rotate(jnp.zeros_like(pos))[0], q, rtol=1e-6)   # position 0: identity


# ---------------------------------------------------------------- absorption

def test_absorbed_scores_and_output_equal_expanded():
    b, s, h, n, c, dn, r, dv = 2, 3, 4, 7, 32, 16, 8, 24
    rng = np.random.default_rng(5)
    q_nope, q_pe = rng.standard_normal((b, s, h, dn)), rng.standard_normal((b, s, h, r))
    w_uk, w_uv = rng.standard_normal((c, h, dn)), rng.standard_normal((c, h, dv))
    latent = rng.standard_normal((b, n, c + r))
    prob = rng.random((b, s, h, n))
    prob /= prob.sum(-1, keepdims=True)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    q_abs = fmx.absorb_query(f32(q_nope), f32(q_pe), f32(w_uk))
    assert q_abs.shape == (b, s, h, c + r) and q_abs.dtype == jnp.float32
    k_nope = np.einsum("bnc,chd->bnhd", latent[..., :c], w_uk)
    k = np.concatenate([k_nope, np.broadcast_to(latent[:, :, None, c:], (b, n, h, r))], axis=-1)
    expanded = np.einsum("bshd,bnhd->bshn", np.concatenate([q_nope, q_pe], -1), k)
    assert rel_err(np.einsum("bshd,bnd->bshn", np.asarray(q_abs, np.float64), latent), expanded) < 1e-5

    o_lat = np.einsum("bshn,bnc->bshc", prob, latent[..., :c])
    out = fmx.absorb_output(f32(o_lat), f32(w_uv))
    assert out.shape == (b, s, h, dv) and out.dtype == jnp.float32
    v = np.einsum("bnc,chd->bnhd", latent[..., :c], w_uv)
    assert rel_err(out, np.einsum("bshn,bnhd->bshd", prob, v)) < 1e-5

    with pytest.raises(ValueError, match="w_uk"):
        fmx.absorb_query(f32(q_nope), f32(q_pe), f32(w_uk[:, :2]))
    with pytest.raises(ValueError, match="q_nope"):
        fmx.absorb_query(f32(q_nope), f32(q_pe[:, :2]), f32(w_uk))
    with pytest.raises(ValueError, match="w_uv"):
        fmx.absorb_output(f32(o_lat), f32(w_uv[:5]))


@functools.partial(jax.jit, static_argnames=("config", "implementation", "new"))
def absorbed_on_raw_cache(params, x, pos, kv, seqlens, *, config, implementation, new):
    """The last `new` tokens of x attend, absorbed, to the raw cache kv [B, N, C+R]; -> y [B, new, M]."""
    q_nope, q_pe = fmx.project_queries(params, x[:, -new:], pos[:, -new:], config)
    o = fmx.attend_absorbed(params, q_nope, q_pe, kv, seqlens, None, config, implementation)
    return jnp.einsum("bshv,hvm->bsm", o, params["wo"])


def test_absorbed_attention_on_raw_cache_matches_numpy():
    """attend_absorbed + mla_decode against a hand-built contiguous cache (garbage past the lengths) equals the
    float64 forward pass; needs neither LatentCache nor mla_prefill."""
    layer = make_layer(1, q_lora_rank=24, rope_scaling=YARN)
    cfg, params = layer.config, layer.params_dict()
    b, s, n = 2, 9, 16
    x, pos = make_tokens(11, b, s, cfg.hidden_size, start=0)
    latent = jax.jit(fmx.project_latent, static_argnames="config")(params, x, pos, config=cfg)
    kv = jnp.concatenate([latent, jnp.full((b, n - s, cfg.latent_dim), 1e4, jnp.float32)], axis=1)
    y = absorbed_on_raw_cache(params, x, pos, kv, jnp.full((b,), s, jnp.int32), config=cfg, implementation="xla",
                              new=s)
    assert rel_err(y, mla_numpy(params, x, pos, cfg)) < TOL


def test_layer_with_interpreted_kernels_matches_xla():
    """The layer on the real Triton kernels (interpreter): a 6-token prefill (cache_empty: the prefill kernel),
    then a 2-token absorbed step (the decode kernel); kernel-friendly dims (64 + 16 latent, heads 32 / 32)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    outs = []
    for impl in ("xla", "interpret"):
        layer = make_layer(2, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                           num_heads=2, implementation=impl)
        x, pos = make_tokens(12, 1, 8, layer.config.hidden_size)
        y1, cache = layer_step(layer, x[:, :6], pos[:, :6], new_cache(layer, 1, 16), cache_empty=True)
        y2, cache = layer_step(layer, x[:, 6:], pos[:, 6:], cache)
        outs.append(jnp.concatenate([y1, y2], axis=1))
    assert rel_err(outs[1], outs[0]) < 1e-4
    assert rel_err(outs[0], mla_numpy(layer.params_dict(), x, pos, layer.config)) < TOL


# ---------------------------------------------------------------- the layer

@pytest.mark.parametrize("q_lora_rank,rope_scaling", [(None, None), (24, YARN)])
def test_layer_without_cache_matches_numpy(q_lora_rank, rope_scaling):
    layer = make_layer(3, q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    x, pos = make_tokens(13, 2, 11, layer.config.hidden_size, start=5)
    y, cache = layer_step(layer, x, pos, None)
    assert cache is None and y.shape == x.shape and y.dtype == jnp.float32
    assert rel_err(y, mla_numpy(layer.params_dict(), x, pos, layer.config)) < TOL


@pytest.mark.parametrize("page_size", [None, 16])
def test_absorbed_decode_equals_non_absorbed(page_size):
    """Same layer, same tokens: the cache path (absorbed mla_decode), all S at once and token by token, equals
    the no-cache path (non-absorbed mla_prefill)."""
    layer = make_layer(4, q_lora_rank=24, rope_scaling=YARN)
    b, s = 2, 12
    x, pos = make_tokens(14, b, s, layer.config.hidden_size)
    y_ref, _ = layer_step(layer, x, pos, None)

    y_all, cache = layer_step(layer, x, pos, new_cache(layer, b, 32, page_size=page_size))
    assert rel_err(y_all, y_ref) < TOL
    np.testing.assert_array_equal(cache.seqlens, [s, s])

    cache = new_cache(layer, b, 32, page_size=page_size)
    ys = []
    for t in range(s):
        y_t, cache = layer_step(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        ys.append(y_t)
    assert rel_err(jnp.concatenate(ys, axis=1), y_ref) < TOL


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_prefill_then_decode_equals_one_long_prefill(q_lora_rank):
    """Prompt through the cache with cache_empty=True (non-absorbed), then 1, 3, 1, ... tokens absorbed."""
    layer = make_layer(5, q_lora_rank=q_lora_rank, rope_scaling=YARN)
    b, prompt, total = 3, 7, 15
    x, pos = make_tokens(15, b, total, layer.config.hidden_size)
    y_ref, _ = layer_step(layer, x, pos, None)

    y, cache = layer_step(layer, x[:, :prompt], pos[:, :prompt], new_cache(layer, b, 24), cache_empty=True)
    ys = [y]
    t = prompt
    for step in (1, 3, 1, 1, 2):
        y, cache = layer_step(layer, x[:, t:t + step], pos[:, t:t + step], cache)
        ys.append(y)
        t += step
    assert t == total
    np.testing.assert_array_equal(cache.seqlens, [total] * b)
    assert rel_err(jnp.concatenate(ys, axis=1), y_ref) < TOL


def test_functional_form_equals_module_and_bf16_is_close():
    layer = make_layer(6, q_lora_rank=24)
    x, pos = make_tokens(16, 2, 6, layer.config.hidden_size)
    params = layer.params_dict()
    y_mod, _ = layer_step(layer, x, pos, None)
    step = jax.jit(fmx.mla_attention, static_argnames=("config", "cache_empty", "dtype", "implementation"))
    y_fn, _ = step(params, x, pos, config=layer.config, implementation="xla")
    assert rel_err(y_fn, y_mod) < 1e-6

    cache = new_cache(layer, 2, 8, dtype=jnp.bfloat16)
    y16, cache = step(params, x, pos, cache, config=layer.config, dtype=jnp.bfloat16, implementation="xla")
    assert y16.dtype == jnp.bfloat16 and cache.kv.dtype == jnp.bfloat16
    assert rel_err(y16, y_mod) < 3e-2


def test_gradients_flow_through_the_prefill_path():
    layer = make_layer(7, q_lora_rank=24)
    x, pos = make_tokens(17, 1, 5, layer.config.hidden_size)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, pos)[0] ** 2)))(layer)
    for name in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "kv_norm", "q_norm"):
        g = getattr(grads, name)[...]
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, name


# ---------------------------------------------------------------- shapes and errors

def test_param_shapes_and_init():
    cfg = fmx.MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=24)
    shapes = fmx.param_shapes(cfg)
    assert shapes == {"wq_a": (64, 24), "q_norm": (24,), "wq_b": (24, 4, 24), "wkv_a": (64, 40),
                      "kv_norm": (32,), "wkv_b": (32, 4, 40), "wo": (4, 24, 64)}
    assert "wq" in fmx.param_shapes(fmx.MLAConfig(64, 4))
    params = fmx.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    assert {k: v.shape for k, v in params.items()} == shapes
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    layer = make_layer(8, param_dtype=jnp.bfloat16)
    assert layer.wkv_b[...].dtype == jnp.bfloat16


def test_config_errors():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        fmx.MLAConfig(64, 4, qk_rope_head_dim=7)
    with pytest.raises(ValueError, match="num_heads"):
        fmx.MLAConfig(64, 0)
    with pytest.raises(TypeError, match="num_heads"):
        fmx.MLAConfig(64, 4.0)
    with pytest.raises(TypeError, match="hidden_size"):
        fmx.MLAConfig(True, 4)
    assert fmx.MLAConfig(np.int64(64), np.int32(4)).num_heads == 4
    with pytest.raises(ValueError, match="q_lora_rank"):
        fmx.MLAConfig(64, 4, q_lora_rank=-1)
    with pytest.raises(ValueError, match="type"):
        fmx.MLAConfig(64, 4, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown keys"):
        fmx.MLAConfig(64, 4, rope_scaling={"factor": 2.0, "alpha": 1.0})
    with pytest.raises(ValueError, match="factor"):
        fmx.MLAConfig(64, 4, rope_scaling={"type": "yarn"})
    with pytest.raises(TypeError, match="rope_scaling"):
        fmx.MLAConfig(64, 4, rope_scaling=2.0)
    with pytest.raises(ValueError, match="implementation"):
        make_layer(0, implementation="cuda")


def test_call_errors():
    layer = make_layer(9)
    cfg, params = layer.config, layer.params_dict()
    x, pos = make_tokens(18, 2, 4, cfg.hidden_size)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[0], pos)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(x[..., :-1], pos)
    with pytest.raises(ValueError, match="positions"):
        layer(x, pos[:, :3])
    with pytest.raises(TypeError, match="positions"):
        layer(x, pos.astype(jnp.float32))
    with pytest.raises(ValueError, match="cache_empty"):
        layer(x, pos, None, cache_empty=True)
    with pytest.raises(TypeError, match="cache"):
        layer(x, pos, cache=jnp.zeros((2, 8, cfg.latent_dim)))
    with pytest.raises(ValueError, match="missing"):
        fmx.mla_attention({k: v for k, v in params.items() if k != "wo"}, x, pos, config=cfg)
    with pytest.raises(ValueError, match="wkv_b"):
        fmx.mla_attention({**params, "wkv_b": params["wkv_b"][:-1]}, x, pos, config=cfg)
    with pytest.raises(TypeError, match="config"):
        fmx.mla_attention(params, x, pos, config=dict(hidden_size=48))


def test_cache_errors():
    layer = make_layer(10)
    x, pos = make_tokens(19, 2, 4, layer.config.hidden_size)
    with pytest.raises(ValueError, match="latent width"):
        layer(x, pos, fm.LatentCache.create(2, 8, dim=layer.config.latent_dim + 2, dtype=jnp.float32))
    with pytest.raises(ValueError, match="batch"):
        layer(x, pos, new_cache(layer, 3, 8))
    _, cache = layer(x, pos, new_cache(layer, 2, 16))
    with pytest.raises(ValueError, match="already holds"):
        layer(x, pos + 4, cache, cache_empty=True)


@pytest.mark.parametrize("extra", [[], ["--page-size", "16", "--q-lora-rank", "32"]])
def test_generate_example_runs(extra, capsys):
    """examples/generate.py end to end at toy size: the cached greedy decode reproduces a cache-free recompute."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--layers", "2", "--tokens", "5", "--prompt", "7", "--batch", "2", "--hidden", "64", "--heads", "2",
                 "--vocab", "32", "--implementation", "xla", *extra])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "saved:" in out
    assert "greedy choices agree 100.0%" in out
