"""The DeepSeek checkpoint loader (flashmla_jax.checkpoint): small random checkpoints written in the Hugging
Face layout (single file and sharded, float32, bfloat16 and block-scaled FP8), loaded into stacked
parameters, and each layer checked against an independent float64 NumPy forward that follows transformers'
DeepseekV3Attention directly from the HF-layout weights (rotate_half RoPE for rope_interleave false; the
de-interleave-then-rotate_half variant for true). Also: config.json parsing (transformers v4 and v5 styles),
the rotary-row permutation rule and its direction, errors. CPU, tiny dims."""
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from flashmla_jax import checkpoint as ck  # noqa: E402
from flashmla_jax import config as fm_config  # noqa: E402
from flashmla_jax import flax as fmx  # noqa: E402
from _util import rel_err, run_python  # noqa: E402

M, H, C, R, DN, DV, LAYERS = 64, 2, 32, 8, 16, 16, 3
TOL = 1e-5
# YaRN with a short original context, so positions below ~100 already reach the interpolated frequencies.
# max_position_embeddings = factor * original, as in DeepSeek's configs (transformers derives factor from it).
YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 8, "beta_slow": 1,
        "mscale": 0.9, "mscale_all_dim": 0.7}
# DeepSeek-V3's published config.json (attention part).
V3_CONFIG = {"hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
             "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
             "rope_theta": 10000, "rms_norm_eps": 1e-06, "num_hidden_layers": 61, "max_position_embeddings": 163840,
             "attention_bias": False, "num_nextn_predict_layers": 1, "n_routed_experts": 256,
             "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096, "type": "yarn"},
             "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}}


# ---------------------------------------------------------------- writing checkpoints

def make_hf_config(q_lora_rank=None, interleave=True, style="v4", yarn=None, theta=1000.0):
    """A tiny DeepSeek config.json dict, RoPE in the transformers v4 (rope_theta + rope_scaling) or v5
    (rope_parameters) layout."""
    cfg = {"model_type": "deepseek_v3", "hidden_size": M, "num_attention_heads": H, "num_key_value_heads": H,
           "q_lora_rank": q_lora_rank, "kv_lora_rank": C, "qk_nope_head_dim": DN, "qk_rope_head_dim": R,
           "v_head_dim": DV, "rms_norm_eps": 1e-6, "num_hidden_layers": LAYERS, "rope_interleave": interleave,
           "attention_bias": False, "vocab_size": 100, "intermediate_size": 96}
    if yarn is not None:
        cfg["max_position_embeddings"] = yarn["factor"] * yarn["original_max_position_embeddings"]
    else:
        cfg["max_position_embeddings"] = 4096
    if style == "v4":
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None if yarn is None else dict(yarn)
    else:
        rp = {"rope_theta": theta, "rope_type": "default"}
        if yarn is not None:
            rp = {**{k: v for k, v in yarn.items() if k != "type"}, "rope_type": "yarn", "rope_theta": theta}
        cfg["rope_parameters"] = rp
    return cfg


def make_state_dict(hf_cfg, seed=0):
    """Random float32 weights with Hugging Face names and [out, in] layouts (written out here, not taken
    from the library), plus a few non-attention tensors the loader must ignore."""
    rng = np.random.default_rng(seed)
    q = hf_cfg["q_lora_rank"]
    sd = {"model.embed_tokens.weight": rng.standard_normal((100, M), np.float32)}

    def lin(out, inp):
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        if q is None:
            sd[p + "q_proj.weight"] = lin(H * (DN + R), M)
        else:
            sd[p + "q_a_proj.weight"] = lin(q, M)
            sd[p + "q_a_layernorm.weight"] = (1 + 0.3 * rng.standard_normal(q)).astype(np.float32)
            sd[p + "q_b_proj.weight"] = lin(H * (DN + R), q)
        sd[p + "kv_a_proj_with_mqa.weight"] = lin(C + R, M)
        sd[p + "kv_a_layernorm.weight"] = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
        sd[p + "kv_b_proj.weight"] = lin(H * (DN + DV), C)
        sd[p + "o_proj.weight"] = lin(M, H * DV)
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = lin(M, 96)
        sd[f"model.layers.{i}.input_layernorm.weight"] = np.ones(M, np.float32)
    return sd


def write_checkpoint(directory, sd, hf_cfg, *, sharded, dtype=np.float32):
    """Writes config.json and either model.safetensors or two shards + model.safetensors.index.json.
    Returns the state dict as stored (cast to dtype)."""
    stored = {k: v.astype(dtype) for k, v in sd.items()}
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    if not sharded:
        safetensors_numpy.save_file(stored, str(directory / "model.safetensors"))
        return stored
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # Layer 0 and the embedding in the first shard, the rest in the second: a layer never spans shards
    # here, but the loader must find every layer's file through the index.
    weight_map = {k: names[0] if (k.startswith("model.layers.0.") or "embed" in k) else names[1] for k in stored}
    for name in names:
        safetensors_numpy.save_file({k: v for k, v in stored.items() if weight_map[k] == name}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return stored


# ---------------------------------------------------------------- the independent forward (transformers' math)

def hf_rope_tables(hf_cfg):
    """(inv_freq [R/2], attention_factor, softmax scale) as transformers computes them for DeepSeek-V3
    (modeling_rope_utils' default / yarn init and DeepseekV3Attention.scaling), float64."""
    rp = hf_cfg.get("rope_parameters")
    if rp is None:
        rp = {**(hf_cfg.get("rope_scaling") or {}), "rope_theta": hf_cfg["rope_theta"]}
    base, dim = float(rp["rope_theta"]), R
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = rp.get("rope_type", rp.get("type", "default"))
    scale = (DN + R) ** -0.5
    if kind == "default":
        return 1.0 / pos_freqs, 1.0, scale

    def get_mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    orig = rp.get("original_max_position_embeddings") or hf_cfg["max_position_embeddings"]
    factor = hf_cfg["max_position_embeddings"] / orig if "original_max_position_embeddings" in rp else rp["factor"]
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                        if mscale and mscale_all_dim else get_mscale(factor))

    def correction_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rp["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rp["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    if mscale_all_dim:
        scale *= get_mscale(rp["factor"], mscale_all_dim) ** 2
    return inv_freq, attention_factor, scale


def rotate_half(x):
    return np.concatenate([-x[..., R // 2:], x[..., :R // 2]], axis=-1)


def hf_rope(x, positions, hf_cfg, interleave):
    """x [B, S, (H,) R] -> RoPE'd as transformers: cos/sin of cat(freqs, freqs) times attention_factor, and
    for rope_interleave the features de-interleaved (evens, then odds) before rotate_half."""
    inv_freq, attention_factor, _ = hf_rope_tables(hf_cfg)
    freqs = positions[..., None].astype(np.float64) * inv_freq           # [B, S, R/2]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb) * attention_factor, np.sin(emb) * attention_factor
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    if interleave:
        x = x.reshape(x.shape[:-1] + (R // 2, 2)).swapaxes(-1, -2).reshape(x.shape)
    return x * cos + rotate_half(x) * sin


def hf_rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def hf_attention(sd, layer, hf_cfg, x, positions):
    """DeepseekV3Attention.forward (eager, causal, no cache) in float64 from the HF-layout weights of one
    layer. x [B, S, M], positions [B, S] -> [B, S, M]."""
    p = f"model.layers.{layer}.self_attn."

    def w(name):
        return np.asarray(sd[p + name + ".weight"], np.float64)

    eps, interleave = hf_cfg["rms_norm_eps"], hf_cfg.get("rope_interleave", True)
    x = np.asarray(x, np.float64)
    b, s, _ = x.shape
    if hf_cfg["q_lora_rank"] is None:
        q = x @ w("q_proj").T
    else:
        q = hf_rms_norm(x @ w("q_a_proj").T, w("q_a_layernorm"), eps) @ w("q_b_proj").T
    q = q.reshape(b, s, H, DN + R)
    q_pass, q_rot = q[..., :DN], q[..., DN:]
    compressed = x @ w("kv_a_proj_with_mqa").T
    k_pass, k_rot = compressed[..., :C], compressed[..., C:]
    kv = (hf_rms_norm(k_pass, w("kv_a_layernorm"), eps) @ w("kv_b_proj").T).reshape(b, s, H, DN + DV)
    k_pass, v = kv[..., :DN], kv[..., DN:]
    q_rot = hf_rope(q_rot, positions, hf_cfg, interleave)
    k_rot = hf_rope(k_rot, positions, hf_cfg, interleave)                 # [B, S, R], one shared head
    qs = np.concatenate([q_pass, q_rot], axis=-1)
    ks = np.concatenate([k_pass, np.broadcast_to(k_rot[:, :, None], (b, s, H, R))], axis=-1)
    _, _, scale = hf_rope_tables(hf_cfg)
    scores = np.einsum("bqhd,bkhd->bhqk", qs, ks) * scale
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhv->bqhv", probs, v).reshape(b, s, H * DV)
    return o @ w("o_proj").T


def tokens(seed, b=2, s=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, s, M)).astype(np.float32)
    # Row 1 starts far into the sequence: large angles, and YaRN's interpolated frequencies matter.
    positions = (np.arange(s)[None] + np.array([[0], [97]])[:b]).astype(np.int32)
    return x, positions


def layer_params(params, i):
    return {k: v[i] for k, v in params.items()}


def ours(params_i, x, positions, config):
    y, _ = fmx.mla_attention(params_i, jnp.asarray(x), jnp.asarray(positions), config=config, implementation="xla")
    return np.asarray(y)


# ---------------------------------------------------------------- the permutation rule

def test_rope_permutation_maps_rotate_half_onto_interleaved():
    """apply_rope(x[perm]) == rotate_half_rope(x)[perm] for perm = [0, R/2, 1, R/2+1, ...]: the exact rule
    the loader applies to the rotary weight rows of rope_interleave=false checkpoints."""
    np.testing.assert_array_equal(ck.rope_permutation(8), [0, 4, 1, 5, 2, 6, 3, 7])
    hf_cfg = make_hf_config(interleave=False, yarn=YARN)
    inv_freq, attention_factor, _ = hf_rope_tables(hf_cfg)
    x, positions = tokens(1)
    x = x[..., :R]
    perm = ck.rope_permutation(R)
    ours_ = np.asarray(fmx.apply_rope(jnp.asarray(x[..., perm]), jnp.asarray(positions), inv_freq, attention_factor))
    theirs = hf_rope(x, positions, hf_cfg, interleave=False)[..., perm]
    assert rel_err(ours_, theirs) < 1e-6
    # The inverse permutation is a different map, and the wrong direction does not agree.
    inverse = np.argsort(perm)
    assert not np.array_equal(inverse, perm)
    wrong = np.asarray(fmx.apply_rope(jnp.asarray(x[..., inverse]), jnp.asarray(positions), inv_freq,
                                      attention_factor))
    assert rel_err(wrong, hf_rope(x, positions, hf_cfg, interleave=False)[..., inverse]) > 1e-2
    with pytest.raises(ValueError, match="even"):
        ck.rope_permutation(7)


# ---------------------------------------------------------------- loading == the HF forward

CASES = [  # q_lora_rank, rope_interleave, sharded, stored dtype, config style, yarn
    (None, True, False, np.float32, "v4", None),
    (32, True, True, np.float32, "v5", YARN),
    (None, False, True, ml_dtypes.bfloat16, "v5", None),
    (32, False, False, ml_dtypes.bfloat16, "v4", YARN),
    (32, False, True, np.float32, "v5", YARN),
]


@pytest.mark.parametrize("q_lora_rank,interleave,sharded,dtype,style,yarn", CASES)
def test_loaded_stack_matches_hf_forward(tmp_path, q_lora_rank, interleave, sharded, dtype, style, yarn):
    hf_cfg = make_hf_config(q_lora_rank, interleave, style, yarn)
    stored = write_checkpoint(tmp_path, make_state_dict(hf_cfg, seed=3), hf_cfg, sharded=sharded, dtype=dtype)
    config, params = ck.load_mla_stack(tmp_path, dtype=np.float32)
    assert config == fmx.MLAConfig.from_hf_config(hf_cfg)
    shapes = fmx.param_shapes(config)
    assert {k: v.shape for k, v in params.items()} == {k: (LAYERS,) + s for k, s in shapes.items()}
    assert all(v.dtype == np.float32 for v in params.values())
    x, positions = tokens(4)
    for i in range(LAYERS):
        ref = hf_attention(stored, i, hf_cfg, x, positions)
        assert rel_err(ours(layer_params(params, i), x, positions, config), ref) < TOL, f"layer {i}"
    # dtype=None keeps the stored dtype (bfloat16 stays bfloat16, exactly).
    _, kept = ck.load_mla_stack(tmp_path, layers=[1])
    assert kept["wkv_b"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(kept["wkv_b"].astype(np.float32), params["wkv_b"][1:2])


def test_rope_interleave_false_needs_the_permutation_in_this_direction(tmp_path):
    """A rotate_half checkpoint matches only with new rotary row j = old row perm[j]: loaded unpermuted,
    or permuted the other way, its scores differ."""
    hf_cfg = make_hf_config(32, interleave=False, yarn=YARN)
    stored = write_checkpoint(tmp_path, make_state_dict(hf_cfg, seed=5), hf_cfg, sharded=False)
    config, loaded = ck.load_mla_stack(tmp_path)
    _, raw = ck.load_mla_stack(tmp_path, rope_interleave=True)   # loaded as if interleaved: no permutation
    x, positions = tokens(6)
    ref = hf_attention(stored, 0, hf_cfg, x, positions)
    assert rel_err(ours(layer_params(loaded, 0), x, positions, config), ref) < TOL
    assert rel_err(ours(layer_params(raw, 0), x, positions, config), ref) > 1e-3

    def permuted(p, perm):   # the rule written out on this layer's [in, out] layout
        p = dict(p)
        p["wq_b"] = np.concatenate([p["wq_b"][..., :DN], p["wq_b"][..., DN + perm]], axis=-1)
        p["wkv_a"] = np.concatenate([p["wkv_a"][:, :C], p["wkv_a"][:, C + perm]], axis=-1)
        return p

    perm = ck.rope_permutation(R)
    raw0 = layer_params(raw, 0)
    np.testing.assert_array_equal(permuted(raw0, perm)["wq_b"], loaded["wq_b"][0])
    np.testing.assert_array_equal(permuted(raw0, perm)["wkv_a"], loaded["wkv_a"][0])
    assert rel_err(ours(permuted(raw0, np.argsort(perm)), x, positions, config), ref) > 1e-3
    # The same rule in HF's [out, in] rows: q_b_proj rows h*(Dn+R) + Dn + perm[j] and kv_a rows C + perm[j].
    w = stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    np.testing.assert_array_equal(loaded["wkv_a"][0][:, C:], w[C + perm].T)
    wq_b = stored["model.layers.0.self_attn.q_b_proj.weight"].reshape(H, DN + R, -1)
    np.testing.assert_array_equal(loaded["wq_b"][0][:, :, DN:], wq_b[:, DN + perm].transpose(2, 0, 1))


def test_fp8_block_scaled_checkpoint_is_dequantized(tmp_path):
    """DeepSeek-V3's release format: float8_e4m3 Linear weights with a float32 weight_scale_inv per block
    (16 x 16 here, from quantization_config); norms in bfloat16."""
    hf_cfg = make_hf_config(32, interleave=True, yarn=YARN)
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    rng = np.random.default_rng(7)
    stored, dequantized = {}, {}
    for k, v in make_state_dict(hf_cfg, seed=8).items():
        if k.endswith("proj.weight") and ".self_attn." in k:
            scale = rng.uniform(0.5, 2.0, (math.ceil(v.shape[0] / 16), math.ceil(v.shape[1] / 16))).astype(np.float32)
            q = (v * 8).astype(ml_dtypes.float8_e4m3fn)
            stored[k], stored[k + "_scale_inv"] = q, scale
            dequantized[k] = q.astype(np.float32) * np.kron(scale, np.ones((16, 16), np.float32))[:v.shape[0], :v.shape[1]]
        else:
            stored[k] = v.astype(ml_dtypes.bfloat16)
            dequantized[k] = stored[k].astype(np.float32)
    safetensors_numpy.save_file(stored, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    config, params = ck.load_mla_stack(tmp_path, dtype=np.float32)
    x, positions = tokens(9)
    for i in range(LAYERS):
        ref = hf_attention(dequantized, i, hf_cfg, x, positions)
        assert rel_err(ours(layer_params(params, i), x, positions, config), ref) < TOL
    # Without its scale an FP8 weight is refused.
    del stored["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match="o_proj.weight_scale_inv"):
        ck.mla_params_from_state_dict(stored, config, 0, weight_block_size=(16, 16))
    # Scales for another block size are refused, naming the tensor.
    with pytest.raises(ValueError, match=r"q_a_proj.weight_scale_inv must have shape \(1, 1\)"):
        ck.mla_params_from_state_dict(stored, config, 1)


def test_raw_reader_matches_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((5, 3)).astype(ml_dtypes.bfloat16),
               "b": rng.standard_normal((4,)).astype(np.float32),
               "c": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e4m3fn)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "x.safetensors"))
    for name, t in tensors.items():
        got = ck._read_raw(tmp_path / "x.safetensors", name)
        assert got.dtype == t.dtype and got.shape == t.shape
        np.testing.assert_array_equal(got.astype(np.float32), t.astype(np.float32))
    sd = ck.SafetensorsStateDict(tmp_path / "x.safetensors")
    assert sorted(sd) == ["a", "b", "c"] and len(sd) == 3
    np.testing.assert_array_equal(sd["a"].astype(np.float32), tensors["a"].astype(np.float32))
    with pytest.raises(KeyError):
        sd["d"]


def test_stack_scans_over_layers(tmp_path):
    """The stacked parameters drive a lax.scan over layers exactly as L separate calls."""
    hf_cfg = make_hf_config(32, interleave=False, yarn=YARN)
    write_checkpoint(tmp_path, make_state_dict(hf_cfg, seed=11), hf_cfg, sharded=True)
    config, params = ck.load_mla_stack(tmp_path)
    x, positions = tokens(12)

    def step(h, p):
        y, _ = fmx.mla_attention(p, h, positions, config=config, implementation="xla")
        return h + y, None

    scanned, _ = jax.jit(lambda h, ps: jax.lax.scan(step, h, ps))(jnp.asarray(x), params)
    h = jnp.asarray(x)
    for i in range(LAYERS):
        h, _ = step(h, layer_params(params, i))
    assert rel_err(scanned, h) < 1e-5


def test_layer_selection_and_counting(tmp_path):
    hf_cfg = make_hf_config(None)
    write_checkpoint(tmp_path, make_state_dict(hf_cfg), hf_cfg, sharded=True)
    config, all_ = ck.load_mla_stack(tmp_path)
    _, some = ck.load_mla_stack(tmp_path, layers=[2, 0])
    for k in all_:
        np.testing.assert_array_equal(some[k], all_[k][[2, 0]])
    # An MLAConfig instead of config.json: the layer count comes from the files.
    (tmp_path / "config.json").unlink()
    _, counted = ck.load_mla_stack(tmp_path, config)
    assert counted["wo"].shape[0] == LAYERS
    with pytest.raises(ValueError, match="config.json"):
        ck.load_mla_stack(tmp_path)
    # The index file itself is a valid path too.
    _, via_index = ck.load_mla_stack(tmp_path / "model.safetensors.index.json", hf_cfg)
    np.testing.assert_array_equal(via_index["wq"], all_["wq"])


# ---------------------------------------------------------------- config.json

def test_config_v4_and_v5_styles_agree():
    v4 = fmx.MLAConfig.from_hf_config(V3_CONFIG)
    v5_dict = {k: v for k, v in V3_CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    # transformers v5's standardized form: the base inside, rope_type beside the legacy type, floats.
    v5_dict["rope_parameters"] = {**{k: float(v) if k in ("factor", "beta_fast", "beta_slow") else v
                                     for k, v in V3_CONFIG["rope_scaling"].items()},
                                  "rope_type": "yarn", "rope_theta": 10000.0}
    v5 = fmx.MLAConfig.from_hf_config(v5_dict)
    assert v4 == v5
    assert (v4.hidden_size, v4.num_heads, v4.q_lora_rank, v4.kv_lora_rank) == (7168, 128, 1536, 512)
    assert v4.rope_scaling == fmx.YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert v4.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    info = ck.read_hf_config(V3_CONFIG)
    assert (info.num_layers, info.rope_interleave, info.weight_block_size) == (61, True, (128, 128))
    # V2-Lite: no query LoRA; plain RoPE in v5's form; rope_interleave false read through.
    lite = make_hf_config(None, interleave=False, style="v5")
    info = ck.read_hf_config(lite)
    assert info.config.q_lora_rank is None and info.config.rope_scaling is None
    assert info.config.rope_theta == 1000.0 and not info.rope_interleave
    # v4 without rope_scaling, and v5 YaRN without original_max_position_embeddings (from max_position_embeddings).
    assert fmx.MLAConfig.from_hf_config(make_hf_config(32)).rope_scaling is None
    no_orig = make_hf_config(32, style="v5", yarn=YARN)
    del no_orig["rope_parameters"]["original_max_position_embeddings"]
    assert fmx.MLAConfig.from_hf_config(no_orig).rope_scaling.original_max_position_embeddings == 128


def test_config_from_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_CONFIG))
    assert fmx.MLAConfig.from_hf_config(tmp_path / "config.json") == fmx.MLAConfig.from_hf_config(V3_CONFIG)
    assert ck.read_hf_config(tmp_path).config == fmx.MLAConfig.from_hf_config(V3_CONFIG)
    with pytest.raises(ValueError, match="no config file"):
        ck.read_hf_config(tmp_path / "nope.json")


def test_yarn_accepts_rope_parameters_dicts():
    rp = {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
          "truncate": True}
    assert fmx.YarnScaling.from_config(rp) == fmx.YarnScaling.from_config(V3_CONFIG["rope_scaling"])
    assert fmx.MLAConfig(64, 2, rope_theta=10000.0, rope_scaling=rp).rope_scaling.factor == 40.0
    assert fmx.MLAConfig(64, 2, rope_scaling={"rope_type": "default", "rope_theta": 10000.0}).rope_scaling is None
    with pytest.raises(ValueError, match="unknown keys"):
        fmx.YarnScaling.from_config({**rp, "attention_factor": 1.0})
    with pytest.raises(ValueError, match="truncate"):
        fmx.YarnScaling.from_config({**rp, "truncate": False})
    with pytest.raises(ValueError, match="rope_theta"):
        fmx.MLAConfig(64, 2, rope_theta=500.0, rope_scaling=rp)
    with pytest.raises(ValueError, match="unexpected keys"):
        fmx.MLAConfig(64, 2, rope_scaling={"rope_type": "default", "factor": 2.0})


def test_config_errors():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        fmx.MLAConfig.from_hf_config({k: v for k, v in V3_CONFIG.items() if k != "kv_lora_rank"})
    with pytest.raises(ValueError, match="'linear'"):
        fmx.MLAConfig.from_hf_config({**V3_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'llama3'"):
        fmx.MLAConfig.from_hf_config(make_hf_config(style="v5") | {"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0}})
    with pytest.raises(ValueError, match="rope_theta"):
        fmx.MLAConfig.from_hf_config({**V3_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0e5}})
    with pytest.raises(ValueError, match="attention_bias"):
        fmx.MLAConfig.from_hf_config({**V3_CONFIG, "attention_bias": True})
    with pytest.raises(TypeError, match="hf_config"):
        fmx.MLAConfig.from_hf_config(3)
    with pytest.raises(ValueError, match="rope_interleave"):
        ck.read_hf_config({**V3_CONFIG, "rope_interleave": "yes"})


# ---------------------------------------------------------------- state-dict errors

def test_state_dict_errors():
    hf_cfg = make_hf_config(32)
    config = fmx.MLAConfig.from_hf_config(hf_cfg)
    sd = make_state_dict(hf_cfg)
    p = "model.layers.1.self_attn."
    ck.mla_params_from_state_dict(sd, config, 1)   # the intact one loads

    missing = {k: v for k, v in sd.items() if k != p + "kv_b_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks \['model.layers.1.self_attn.kv_b_proj.weight'\]"):
        ck.mla_params_from_state_dict(missing, config, 1)
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj.weight"):   # V2-Lite key in a LoRA config
        ck.mla_params_from_state_dict({**sd, p + "q_proj.weight": np.zeros((H * (DN + R), M))}, config, 1)
    with pytest.raises(ValueError, match="o_proj.bias"):
        ck.mla_params_from_state_dict({**sd, p + "o_proj.bias": np.zeros(M)}, config, 1)
    wrong = {**sd, p + "kv_b_proj.weight": sd[p + "kv_b_proj.weight"].T}
    with pytest.raises(ValueError, match=r"kv_b_proj.weight must have shape \(64, 32\)"):
        ck.mla_params_from_state_dict(wrong, config, 1)
    lite = fmx.MLAConfig.from_hf_config(make_hf_config(None))
    with pytest.raises(ValueError, match="q_proj.weight"):   # a LoRA checkpoint read with a V2-Lite config
        ck.mla_params_from_state_dict(sd, lite, 0)
    with pytest.raises(ValueError, match="lacks"):
        ck.mla_params_from_state_dict(sd, config, LAYERS)
    with pytest.raises(TypeError, match="config"):
        ck.mla_params_from_state_dict(sd, hf_cfg, 0)
    with pytest.raises(TypeError, match="rope_interleave"):
        ck.mla_params_from_state_dict(sd, config, 0, rope_interleave="false")
    # Ignored: a stale rotary buffer under self_attn.
    ck.mla_params_from_state_dict({**sd, p + "rotary_emb.inv_freq": np.zeros(R // 2)}, config, 1)


def test_stack_params_and_path_errors(tmp_path):
    a = {"w": np.zeros((2, 3), np.float32)}
    assert ck.stack_params([a, a])["w"].shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"layers\[1\]\['w'\]"):
        ck.stack_params([a, {"w": np.zeros((3, 2), np.float32)}])
    with pytest.raises(ValueError, match=r"layers\[1\] has keys"):
        ck.stack_params([a, {"v": np.zeros((2, 3), np.float32)}])
    with pytest.raises(ValueError, match="non-empty"):
        ck.stack_params([])
    with pytest.raises(ValueError, match="no model.safetensors"):
        ck.SafetensorsStateDict(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ck.SafetensorsStateDict(tmp_path / "missing")
    hf_cfg = make_hf_config(None)
    write_checkpoint(tmp_path, make_state_dict(hf_cfg), hf_cfg, sharded=True)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        ck.load_mla_stack(tmp_path)
    with pytest.raises(ValueError, match="layers"):
        ck.load_mla_stack(tmp_path, layers=[-1])


def test_import_flashmla_jax_does_not_import_safetensors():
    assert run_python("import sys, flashmla_jax; print('safetensors' in sys.modules)").strip() == "False"


def test_config_and_checkpoint_config_need_no_flax():
    """flashmla_jax.config and the loader's config reading run where `import flax` fails, and read what the
    Flax layer's re-exported MLAConfig reads."""
    code = f"""
import sys
sys.modules["flax"] = None                      # every `import flax` now raises ImportError
from flashmla_jax import checkpoint, config
hf = {make_hf_config(q_lora_rank=16, yarn=YARN)!r}
read = checkpoint.read_hf_config(hf)
assert read.config == config.MLAConfig.from_hf_config(hf) and read.num_layers == {LAYERS}
assert set(config.param_shapes(read.config)) >= {{"wq_a", "wkv_b"}}
print(sorted(m for m in sys.modules if m.split(".")[0] == "flax" and sys.modules[m] is not None))
"""
    assert run_python(code).strip() == "[]"
    assert fmx.MLAConfig is fm_config.MLAConfig and fmx.YarnScaling is fm_config.YarnScaling
    assert fmx.param_shapes is fm_config.param_shapes


# ---------------------------------------------------------------- transformers itself, when installed

@pytest.mark.parametrize("interleave", [True, False])
def test_matches_transformers_deepseek_v3_attention(tmp_path, interleave):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    hf_cfg = make_hf_config(32, interleave=interleave, style="v4", yarn=YARN)
    stored = write_checkpoint(tmp_path, make_state_dict(hf_cfg, seed=13), hf_cfg, sharded=False)
    config, params = ck.load_mla_stack(tmp_path)
    tconf = transformers.DeepseekV3Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    tconf._attn_implementation = "eager"
    attn = hf.DeepseekV3Attention(tconf, layer_idx=0).eval()
    pre = "model.layers.0.self_attn."
    attn.load_state_dict({k[len(pre):]: torch.from_numpy(np.array(v)) for k, v in stored.items()
                          if k.startswith(pre)}, strict=True)
    rotary = hf.DeepseekV3RotaryEmbedding(config=tconf)
    x, positions = tokens(14)
    xt, pt = torch.from_numpy(x), torch.from_numpy(positions.astype(np.int64))
    s = x.shape[1]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None].expand(x.shape[0], 1, s, s)
    with torch.no_grad():
        out = attn(hidden_states=xt, position_embeddings=rotary(xt, pt), attention_mask=mask)[0].numpy()
    assert rel_err(ours(layer_params(params, 0), x, positions, config), out) < 1e-5
