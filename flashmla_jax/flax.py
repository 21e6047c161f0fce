"""DeepSeek-V2/V3 Multi-head Latent Attention as a Flax (nnx) layer, with matrix absorption for decode.

Shapes: B batch, S new tokens per call, H heads, C = kv_lora_rank (512), R = qk_rope_head_dim (64),
Dn = qk_nope_head_dim (128), Dv = v_head_dim (128), M = hidden size; one token's latent is [c_kv ; k_pe],
C + R = 576 numbers for all heads together.

Two ways to attend, one set of weights:
- non-absorbed (no cache, or a cache known to be empty): k_nope_h = c_kv · W_UK_h, v_h = c_kv · W_UV_h,
  k_h = [k_nope_h ; k_pe], ordinary causal multi-head attention through `flashmla_jax.mla_prefill`;
- absorbed (a `LatentCache`): q̃_h = [q_nope_h · W_UK_hᵀ ; q_pe_h] (C + R), attention against the cached
  latents through `flashmla_jax.mla_decode` (one shared KV head, V = its first C columns), and the latent
  output o_lat_h (C) is mapped back with W_UV_h.
W_UK and W_UV are slices of the `wkv_b` parameter taken inside the traced function: nothing is precomputed
in Python and nothing has to be refreshed when the parameters change.

The public pieces: `MultiHeadLatentAttention` (the nnx module), `mla_attention` (the same layer as a pure
function of a parameter dict, for Linen, Equinox or plain JAX), `MLAConfig` / `YarnScaling` (its
hyperparameters), `init_params`, and the absorption helpers `absorb_query` / `absorb_output`.

RoPE convention: interleaved pairs, as DeepSeek's own inference code. Within the R rotary features, the
pair (x[2i], x[2i+1]) is rotated by the angle position · inv_freq[i], and the result keeps that layout.
The Hugging Face DeepSeek code for interleaved checkpoints (`rope_interleave: true`, the default and what
DeepSeek publishes) rotates the same pairs and then stores them de-interleaved; the two differ only by one
fixed permutation of the R features applied to both q_pe and k_pe, which leaves every score unchanged, so
those checkpoints load as they are. `rope_interleave: false` checkpoints rotate the pairs (x[i], x[i+R/2])
instead; `flashmla_jax.checkpoint` permutes their rotary weight rows ([0, R/2, 1, R/2+1, …]) when it loads
them. (Only the k_pe part of this layer's cache is in the interleaved layout.)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashmla_jax import _checks
from flashmla_jax.cache import LatentCache
from flashmla_jax.ops.decode import mla_decode
from flashmla_jax.ops.prefill import mla_prefill

__all__ = ["MLAConfig", "YarnScaling", "MultiHeadLatentAttention", "mla_attention", "init_params",
           "param_shapes", "absorb_query", "absorb_output", "split_wkv_b", "apply_rope", "rms_norm",
           "project_queries", "project_latent", "attend_expanded", "attend_absorbed"]


# ---------------------------------------------------------------- hyperparameters

def _yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's YaRN attention factor: 0.1 · mscale · ln(factor) + 1 when factor > 1, else 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension, with the keys of DeepSeek's `rope_scaling` config.

    factor: context extension factor (DeepSeek-V3: 40); original_max_position_embeddings: the pretraining
    context (4096); beta_fast / beta_slow: rotations that bound the frequency ramp (32 / 1); mscale and
    mscale_all_dim: attention-temperature knobs. The softmax scale gets mscale(factor, mscale_all_dim)²;
    cos and sin get mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for DeepSeek-V2/V3).
    """
    factor: float
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"rope_scaling['factor'] must be > 0, got {self.factor!r}")
        if not self.original_max_position_embeddings > 0:
            raise ValueError("rope_scaling['original_max_position_embeddings'] must be > 0, got "
                             f"{self.original_max_position_embeddings!r}")
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"rope_scaling needs beta_fast > beta_slow > 0, got {self.beta_fast!r}, "
                             f"{self.beta_slow!r}")

    @classmethod
    def from_config(cls, rope_scaling: Mapping[str, Any]) -> "YarnScaling":
        """A DeepSeek/Hugging Face `rope_scaling` dict, or transformers v5's `rope_parameters` -> YarnScaling.

        "type" / "rope_type" must be "yarn" when present. A `rope_theta` key (v5 keeps the RoPE base in this
        dict) is ignored here: the base is `MLAConfig.rope_theta`, and `MLAConfig` checks that the two agree.
        transformers' `truncate` key is accepted only as True (this layer floors/ceils the correction range,
        as DeepSeek does). Any other key outside the dataclass fields is an error.
        """
        if not isinstance(rope_scaling, Mapping):
            raise TypeError(f"rope_scaling must be None, a dict or a YarnScaling, got {type(rope_scaling).__name__}")
        d = dict(rope_scaling)
        d.pop("rope_theta", None)
        if not d.pop("truncate", True):
            raise ValueError("rope_scaling['truncate'] = False is not supported (DeepSeek's YaRN truncates)")
        kinds = {d.pop("type", "yarn"), d.pop("rope_type", "yarn")}
        if kinds != {"yarn"}:
            kind = sorted(kinds - {"yarn"})[0]
            raise ValueError(f"rope_scaling type must be 'yarn' (DeepSeek's), got {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"rope_scaling has unknown keys {unknown}; known: {sorted(names)}")
        if "factor" not in d:
            raise ValueError("rope_scaling needs a 'factor'")
        return cls(**{k: (int(v) if k == "original_max_position_embeddings" else float(v)) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Hyperparameters of one MLA layer (names as DeepSeek's config; hashable, so usable as a static arg).

    hidden_size M; num_heads H; q_lora_rank: rank of the query LoRA (DeepSeek-V3: 1536), or None for a
    direct query projection (V2-Lite); kv_lora_rank C (512); qk_nope_head_dim Dn (128); qk_rope_head_dim R
    (64, even); v_head_dim Dv (128); rope_theta: RoPE base; rope_scaling: None, a YarnScaling, or
    DeepSeek's `rope_scaling` dict (or transformers v5's `rope_parameters`: rope_type "default" means None,
    and a `rope_theta` inside it must equal rope_theta); rms_norm_eps: epsilon of the latents' RMSNorms.
    `MLAConfig.from_hf_config` reads a DeepSeek `config.json`.
    """
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            _checks.integer(name, getattr(self, name), lo=1)
        _checks.optional_integer("q_lora_rank", self.q_lora_rank, lo=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        rs = self.rope_scaling
        if isinstance(rs, Mapping):
            # A v5 `rope_parameters` dict carries the base too: two different bases would be silently lost.
            if "rope_theta" in rs and float(rs["rope_theta"]) != float(self.rope_theta):
                raise ValueError(f"rope_scaling['rope_theta'] = {rs['rope_theta']!r} differs from rope_theta = "
                                 f"{self.rope_theta!r}")
            if rs.get("rope_type", rs.get("type")) == "default":
                extra = sorted(set(rs) - {"rope_type", "type", "rope_theta"})
                if extra:
                    raise ValueError(f"rope_scaling of rope_type 'default' has unexpected keys {extra}")
                rs = None
            object.__setattr__(self, "rope_scaling", rs)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            object.__setattr__(self, "rope_scaling", YarnScaling.from_config(self.rope_scaling))

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any] | str | os.PathLike) -> "MLAConfig":
        """The attention hyperparameters of a DeepSeek-V2/V3 `config.json` (a dict, or a path to the file).

        Reads hidden_size, num_attention_heads, q_lora_rank (null: V2-Lite's direct query projection),
        kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim (all required), rms_norm_eps (1e-6) and
        the RoPE settings in either transformers layout: v4's top-level `rope_theta` + `rope_scaling`, or v5's
        `rope_parameters` (rope_theta inside, rope_type "default" or "yarn" with the YaRN keys). A YaRN dict
        without original_max_position_embeddings gets max_position_embeddings, as transformers does. Other
        keys (MoE, vocab, num_hidden_layers, rope_interleave) are not this layer's: `flashmla_jax.checkpoint`
        reads the last two. Raises ValueError naming a missing or inconsistent key.
        """
        if isinstance(hf_config, (str, os.PathLike)):
            with open(hf_config) as f:
                hf_config = json.load(f)
        if not isinstance(hf_config, Mapping):
            raise TypeError(f"hf_config must be a dict or a path to config.json, got {type(hf_config).__name__}")
        required = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim")
        missing = [k for k in required if hf_config.get(k) is None]
        if missing:
            raise ValueError(f"hf_config lacks {missing} (needed for an MLA layer)")
        if hf_config.get("attention_bias"):
            raise ValueError("hf_config has attention_bias = true; this layer's projections have no biases")
        rope = hf_config.get("rope_parameters")
        if rope is None:
            rope = hf_config.get("rope_scaling")
        rope = dict(rope or {})
        theta = rope.pop("rope_theta", None)
        top_theta = hf_config.get("rope_theta")
        if theta is not None and top_theta is not None and float(theta) != float(top_theta):
            raise ValueError(f"hf_config's rope_theta {top_theta!r} and rope_parameters['rope_theta'] {theta!r} differ")
        theta = float(theta if theta is not None else top_theta if top_theta is not None else 10000.0)
        if not rope:
            rope = None   # rope_type "default" dicts are left to __post_init__, which checks their keys
        elif (rope.get("rope_type", rope.get("type")) != "default" and "original_max_position_embeddings" not in rope
              and hf_config.get("max_position_embeddings")):
            rope["original_max_position_embeddings"] = hf_config["max_position_embeddings"]
        return cls(hidden_size=int(hf_config["hidden_size"]), num_heads=int(hf_config["num_attention_heads"]),
                   q_lora_rank=None if hf_config.get("q_lora_rank") is None else int(hf_config["q_lora_rank"]),
                   kv_lora_rank=int(hf_config["kv_lora_rank"]), qk_nope_head_dim=int(hf_config["qk_nope_head_dim"]),
                   qk_rope_head_dim=int(hf_config["qk_rope_head_dim"]), v_head_dim=int(hf_config["v_head_dim"]),
                   rope_theta=theta, rope_scaling=rope, rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)))

    @property
    def qk_head_dim(self) -> int:
        """Dn + R (192): the width of a non-absorbed query/key head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """C + R (576): numbers cached per token, for all heads together."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1 / sqrt(Dn + R), times YaRN's mscale(factor, mscale_all_dim)² (DeepSeek's rule)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = _yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def rope_inv_freq(self) -> np.ndarray:
        """[R / 2] float64 inverse frequencies, YaRN-blended when rope_scaling is set.

        Plain RoPE: theta^(-2i/R). YaRN: frequencies that turn more than beta_fast times over the original
        context are kept, those that turn fewer than beta_slow times are divided by `factor`, and a linear
        ramp over the pair index blends the two in between.
        """
        r = self.qk_rope_head_dim
        base = float(self.rope_theta)
        extrapolated = base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
        ys = self.rope_scaling
        if ys is None:
            return extrapolated

        def pair_index_for(rotations: float) -> float:
            # The pair index whose wavelength fits `rotations` times into the original context.
            return r * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(pair_index_for(ys.beta_fast)), 0)
        high = min(math.ceil(pair_index_for(ys.beta_slow)), r - 1)
        high = high if high > low else low + 1e-3
        ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # 1: interpolate
        return extrapolated * (1.0 - ramp) + (extrapolated / ys.factor) * ramp

    @property
    def rope_magnitude(self) -> float:
        """The factor on cos and sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1 without YaRN."""
        ys = self.rope_scaling
        if ys is None:
            return 1.0
        return _yarn_mscale(ys.factor, ys.mscale) / _yarn_mscale(ys.factor, ys.mscale_all_dim)


# ---------------------------------------------------------------- parameters

def param_shapes(config: MLAConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (M hidden, H heads, Q = q_lora_rank, C, R, Dn, Dv as above).

    wq [M, H, Dn+R] (q_lora_rank None) or wq_a [M, Q], q_norm [Q], wq_b [Q, H, Dn+R];
    wkv_a [M, C+R] (the latent c_kv, then k_pe); kv_norm [C]; wkv_b [C, H, Dn+Dv] (W_UK, then W_UV);
    wo [H, Dv, M]. From a Hugging Face checkpoint: each `*_proj.weight` transposed and reshaped to these
    shapes (wkv_b = kv_b_proj.weight.T.reshape(C, H, Dn+Dv)), norms as they are.
    """
    c = config
    shapes: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank is None:
        shapes["wq"] = (c.hidden_size, c.num_heads, c.qk_head_dim)
    else:
        shapes["wq_a"] = (c.hidden_size, c.q_lora_rank)
        shapes["q_norm"] = (c.q_lora_rank,)
        shapes["wq_b"] = (c.q_lora_rank, c.num_heads, c.qk_head_dim)
    shapes["wkv_a"] = (c.hidden_size, c.latent_dim)
    shapes["kv_norm"] = (c.kv_lora_rank,)
    shapes["wkv_b"] = (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
    shapes["wo"] = (c.num_heads, c.v_head_dim, c.hidden_size)
    return shapes


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(config: MLAConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Fresh parameters (shapes as `param_shapes`): projections ~ N(0, 1/fan_in), norm weights 1. Jitted."""
    shapes = param_shapes(config)
    keys = jax.random.split(key, len(shapes))
    params = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("_norm"):
            params[name] = jnp.ones(shape, dtype)
        else:
            fan_in = shape[0] if name != "wo" else shape[0] * shape[1]
            params[name] = (jax.random.normal(k, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)
    return params


def _check_params(params: Mapping[str, jax.Array], config: MLAConfig):
    expected = param_shapes(config)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params must have exactly the keys {sorted(expected)} for this config; "
                         f"missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape}, got {tuple(params[name].shape)}")


# ---------------------------------------------------------------- pure building blocks

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32. x [..., K], weight [K] -> [..., K] in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, magnitude: float = 1.0) -> jax.Array:
    """Interleaved RoPE: the pair (x[2i], x[2i+1]) is rotated by positions · inv_freq[i].

    x: [B, S, ..., R] (any number of axes between S and R, e.g. heads); positions: [B, S] integer;
    inv_freq: [R / 2]; magnitude multiplies cos and sin (YaRN's mscale ratio). Returns x's shape and dtype;
    angles and the rotation are float32.
    """
    b, s, r = x.shape[0], x.shape[1], x.shape[-1]
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)   # [B, S, R/2]
    angle = angle.reshape((b, s) + (1,) * (x.ndim - 3) + (r // 2,))
    cos, sin = jnp.cos(angle) * magnitude, jnp.sin(angle) * magnitude
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (r // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def split_wkv_b(wkv_b: jax.Array, qk_nope_head_dim: int) -> tuple[jax.Array, jax.Array]:
    """wkv_b [C, H, Dn+Dv] -> (w_uk [C, H, Dn], w_uv [C, H, Dv]): slices, traced with the caller."""
    return wkv_b[..., :qk_nope_head_dim], wkv_b[..., qk_nope_head_dim:]


def absorb_query(q_nope: jax.Array, q_pe: jax.Array, w_uk: jax.Array) -> jax.Array:
    """Folds W_UK into the query: q̃_h = [q_nope_h · W_UK_hᵀ ; q_pe_h].

    q_nope: [B, S, H, Dn]; q_pe: [B, S, H, R] (RoPE applied); w_uk: [C, H, Dn].
    Returns [B, S, H, C + R] (576 for DeepSeek) in the promoted dtype of q_nope and w_uk, accumulated in
    float32; q̃_h · [c_kv ; k_pe] equals q_h · k_h of the non-absorbed form.
    """
    if q_nope.ndim != 4 or q_pe.ndim != 4 or q_nope.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"q_nope [B, S, H, Dn] and q_pe [B, S, H, R] must agree on B, S, H; got "
                         f"{q_nope.shape} and {q_pe.shape}")
    if w_uk.ndim != 3 or w_uk.shape[1:] != q_nope.shape[2:]:
        raise ValueError(f"w_uk must be [C, H={q_nope.shape[2]}, Dn={q_nope.shape[3]}], got {w_uk.shape}")
    dtype = jnp.result_type(q_nope, w_uk)
    q_lat = jnp.einsum("bshn,chn->bshc", q_nope, w_uk, preferred_element_type=jnp.float32)
    return jnp.concatenate([q_lat.astype(dtype), q_pe.astype(dtype)], axis=-1)


def absorb_output(o_latent: jax.Array, w_uv: jax.Array) -> jax.Array:
    """Applies W_UV to the attention output in latent space: out_h = o_lat_h · W_UV_h.

    o_latent: [B, S, H, C] (softmax · c_kv, as `mla_decode` returns with head_dim_v = C); w_uv: [C, H, Dv].
    Returns [B, S, H, Dv] in the promoted dtype of o_latent and w_uv, accumulated in float32.
    """
    if o_latent.ndim != 4 or w_uv.ndim != 3 or w_uv.shape[:2] != (o_latent.shape[3], o_latent.shape[2]):
        raise ValueError(f"o_latent [B, S, H, C] and w_uv [C, H, Dv] do not match: {o_latent.shape}, {w_uv.shape}")
    out = jnp.einsum("bshc,chv->bshv", o_latent, w_uv, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(o_latent, w_uv))


def project_queries(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
                    config: MLAConfig) -> tuple[jax.Array, jax.Array]:
    """x [B, S, M], positions [B, S] -> (q_nope [B, S, H, Dn], q_pe [B, S, H, R] with RoPE), x's dtype."""
    if config.q_lora_rank is None:
        q = jnp.einsum("bsm,mhd->bshd", x, params["wq"])
    else:
        q_a = rms_norm(x @ params["wq_a"], params["q_norm"], config.rms_norm_eps)
        q = jnp.einsum("bsq,qhd->bshd", q_a, params["wq_b"])
    q_nope, q_pe = q[..., :config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]
    return q_nope, apply_rope(q_pe, positions, config.rope_inv_freq(), config.rope_magnitude)


def project_latent(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
                   config: MLAConfig) -> jax.Array:
    """x [B, S, M], positions [B, S] -> the per-token latent [B, S, C + R] = [RMSNorm(c_kv) ; RoPE(k_pe)].

    This is exactly what the cache stores (576 numbers per token for DeepSeek), in x's dtype.
    """
    kv_a = x @ params["wkv_a"]
    c_kv = rms_norm(kv_a[..., :config.kv_lora_rank], params["kv_norm"], config.rms_norm_eps)
    k_pe = apply_rope(kv_a[..., config.kv_lora_rank:], positions, config.rope_inv_freq(), config.rope_magnitude)
    return jnp.concatenate([c_kv, k_pe], axis=-1)


def attend_expanded(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, latent: jax.Array,
                    config: MLAConfig, implementation: str | None = None) -> jax.Array:
    """Non-absorbed causal self-attention over the S tokens of this call (through `mla_prefill`).

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; latent [B, S, C + R] (from `project_latent`).
    k_h = [c_kv · W_UK_h ; k_pe] [B, S, H, Dn+R] (k_pe repeated over heads), v_h = c_kv · W_UV_h
    [B, S, H, Dv]. Returns [B, S, H, Dv] in q_nope's dtype.
    """
    b, s, h, _ = q_nope.shape
    w_uk, w_uv = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    c_kv, k_pe = latent[..., :config.kv_lora_rank], latent[..., config.kv_lora_rank:]
    dtype = q_nope.dtype
    k_nope = jnp.einsum("bsc,chn->bshn", c_kv, w_uk, preferred_element_type=jnp.float32).astype(dtype)
    v = jnp.einsum("bsc,chv->bshv", c_kv, w_uv, preferred_element_type=jnp.float32).astype(dtype)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :].astype(dtype), (b, s, h, config.qk_rope_head_dim))
    q = jnp.concatenate([q_nope, q_pe.astype(dtype)], axis=-1)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    return mla_prefill(q, k, v, causal=True, softmax_scale=config.softmax_scale, implementation=implementation)


def attend_absorbed(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, kv_cache: jax.Array,
                    cache_seqlens: jax.Array, block_table: jax.Array | None, config: MLAConfig,
                    implementation: str | None = None, layer: int | jax.Array | None = None,
                    kv_format: str | None = None, kv_scale: jax.Array | None = None) -> jax.Array:
    """Absorbed attention of S new queries against a latent cache that already holds their latents.

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; kv_cache [B, N, C+R] or pages [P, page_size, C+R] with
    block_table [B, max_blocks] int32; cache_seqlens [B] int32, the S new tokens included (query i sees
    keys < seqlen - S + i + 1). The absorbed query is cast to the cache's dtype for `mla_decode`, or to
    bfloat16 for an FP8 cache (kv_format, kv_scale as in `mla_decode`: kv_cache then holds uint8 bytes).
    layer: None, or the layer of a stacked kv_cache [L, ...] (read in place; see `mla_decode`).
    Returns [B, S, H, Dv] in q_nope's dtype.
    """
    w_uk, w_uv = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    q_abs = absorb_query(q_nope, q_pe, w_uk).astype(kv_cache.dtype if kv_format is None else jnp.bfloat16)
    o_lat = mla_decode(q_abs, kv_cache, cache_seqlens, block_table, head_dim_v=config.kv_lora_rank,
                       softmax_scale=config.softmax_scale, causal=True, implementation=implementation, layer=layer,
                       kv_format=kv_format, kv_scale=kv_scale)
    return absorb_output(o_lat, w_uv.astype(q_nope.dtype)).astype(q_nope.dtype)


# ---------------------------------------------------------------- the layer as a function

def _check_call(x, positions, cache, config: MLAConfig, cache_empty: bool, implementation):
    if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x must be [B, S, hidden_size={config.hidden_size}], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got {x.dtype}")
    if not hasattr(positions, "shape") or tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"positions must be [B, S] = {tuple(x.shape[:2])}, got "
                         f"{getattr(positions, 'shape', type(positions).__name__)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array (int32), got {positions.dtype}")
    _checks.implementation(implementation)
    if cache is None:
        if cache_empty:
            raise ValueError("cache_empty=True needs a cache")
        return
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache must be a flashmla_jax.LatentCache (or None), got {type(cache).__name__}")
    seqlens = cache.seqlens
    if cache.dim != config.latent_dim:
        raise ValueError(f"cache latent width {cache.dim} must be kv_lora_rank + qk_rope_head_dim = "
                         f"{config.latent_dim}")
    if seqlens.ndim < 1 or seqlens.shape[-1] != x.shape[0]:
        raise ValueError(f"cache holds {seqlens.shape[-1] if seqlens.ndim else '?'} sequences but x has batch "
                         f"{x.shape[0]}")
    if cache_empty and not isinstance(seqlens, jax.core.Tracer) and bool(np.any(np.asarray(seqlens) != 0)):
        raise ValueError("cache_empty=True but the cache already holds tokens")


def mla_attention(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array, cache=None, *,
                  config: MLAConfig, cache_empty: bool = False, dtype=None,
                  implementation: str | None = None, layer: int | jax.Array | None = None):
    """DeepSeek-V2/V3 MLA as a pure function: the whole layer, projections included.

    Args:
      params: dict of arrays with the shapes of `param_shapes(config)` (make one with `init_params`).
      x: [B, S, M] hidden states of S new tokens per sequence.
      positions: [B, S] integer positions of those tokens (RoPE). With a cache they are normally
        cache.seqlens[:, None] + arange(S); the layer does not check this.
      cache: None, or a `flashmla_jax.LatentCache` of width C + R.
        None: causal self-attention among the S tokens through `mla_prefill` (non-absorbed).
        A cache: the S latents [B, S, C+R] are appended (at each sequence's length), then the S queries
        attend, absorbed, through `mla_decode` to everything cached, causally among themselves.
      config: an MLAConfig (static).
      cache_empty: a static promise that every sequence in `cache` is empty before this call (a prompt's
        prefill): the latents are still appended, but attention runs non-absorbed through `mla_prefill`
        over the S tokens, which costs (Dn+R+Dv) instead of (2C+R) FLOPs per key and head. The tokens
        attend to the latents as rounded to the cache's dtype, exactly as later decode steps see them.
      dtype: computation dtype (x and params are cast to it); None means x's dtype.
      implementation: passed to `mla_prefill` / `mla_decode`: "triton", "xla", "interpret" or None (the
        default for the device).
      layer: with a layer-stacked cache (`LatentCache.create(num_layers=L)`), this layer's index: a Python
        int or a traced int32 scalar (e.g. the step of a `lax.scan` / `nnx.scan` over stacked layers).
        The latents go into that layer's rows and attention reads them in place. None otherwise.

    Returns:
      (y [B, S, M] in the computation dtype, the cache with S more tokens per sequence, or None).
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    _check_params(params, config)
    _check_call(x, positions, cache, config, cache_empty, implementation)
    dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
    x = x.astype(dtype)
    params = {k: jnp.asarray(v).astype(dtype) for k, v in params.items()}

    q_nope, q_pe = project_queries(params, x, positions, config)
    latent = project_latent(params, x, positions, config)
    if cache is None:
        o = attend_expanded(params, q_nope, q_pe, latent, config, implementation)
    else:
        cache = cache.append(latent, layer=layer)       # cast to the cache's dtype, or quantized (FP8)
        if cache_empty:
            o = attend_expanded(params, q_nope, q_pe, cache.as_stored(latent, layer), config, implementation)
        else:
            o = attend_absorbed(params, q_nope, q_pe, cache.kv, cache.lengths(layer), cache.block_table, config,
                                implementation, layer=layer, kv_format=cache.kv_format, kv_scale=cache.kv_scale)
    y = jnp.einsum("bshv,hvm->bsm", o.astype(dtype), params["wo"], preferred_element_type=jnp.float32)
    return y.astype(dtype), cache


# ---------------------------------------------------------------- the nnx module

class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V2/V3 Multi-head Latent Attention (flax.nnx); `mla_attention` does the work.

    Hyperparameters as `MLAConfig` (hidden_size, num_heads, q_lora_rank=None for V2-Lite style, kv_lora_rank
    512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, rope_theta, rope_scaling: DeepSeek's
    YaRN dict, rms_norm_eps). dtype: computation dtype (None: the input's); param_dtype: storage dtype of
    the parameters; implementation: passed to the attention ops ("triton", "xla", "interpret", None).
    Parameters are nnx.Param attributes named as in `param_shapes`.

    `layer(x [B, S, M], positions [B, S] int32, cache=None, cache_empty=False, layer=None)` -> (y [B, S, M],
    cache); see `mla_attention` for what a cache changes, and `layer` (a stacked cache's layer index).

    A model of L layers is scanned with stacked parameters (built with `nnx.vmap`) and one stacked cache:

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs): return MultiHeadLatentAttention(hidden_size, num_heads, ..., rngs=rngs)
        stack = make(nnx.Rngs(0))
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(attn, carry):
            x, cache, i = carry
            y, cache = attn(x, positions, cache, layer=i)
            return x + y, cache, i + 1
        x, cache, _ = run(stack, (x, cache, jnp.int32(0)))

    Compile that step with `flashmla_jax.scanned_step.jit_scanned_step` (jax.jit with
    SCANNED_STEP_COMPILER_OPTIONS, for this executable only): XLA's default GPU compile copies every layer's
    weights out of the stacks on every step; with the options its GEMMs read them in place (cuBLAS instead
    of XLA's Triton GEMMs; see the README's "Inside a model"):

        graphdef, state = nnx.split(stack)
        step = jit_scanned_step(
            lambda state, x, cache: run(nnx.merge(graphdef, state), (x, cache, jnp.int32(0)))[:2],
            donate_argnums=2)
        x, cache = step(state, x, cache)
    """

    def __init__(self, hidden_size: int, num_heads: int, *, q_lora_rank: int | None = None,
                 kv_lora_rank: int = 512, qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128, rope_theta: float = 10000.0,
                 rope_scaling: Mapping[str, Any] | YarnScaling | None = None, rms_norm_eps: float = 1e-6,
                 dtype=None, param_dtype=jnp.float32, implementation: str | None = None, rngs: nnx.Rngs):
        _checks.implementation(implementation)
        self.config = MLAConfig(hidden_size=hidden_size, num_heads=num_heads, q_lora_rank=q_lora_rank,
                                kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                                qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_theta=rope_theta,
                                rope_scaling=rope_scaling, rms_norm_eps=rms_norm_eps)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = implementation
        self._param_names = tuple(param_shapes(self.config))
        for name, value in init_params(self.config, rngs.params(), param_dtype).items():
            setattr(self, name, nnx.Param(value))

    def params_dict(self) -> dict[str, jax.Array]:
        """The current parameter values, as the dict `mla_attention` takes."""
        return {name: getattr(self, name)[...] for name in self._param_names}

    def __call__(self, x: jax.Array, positions: jax.Array, cache=None, *, cache_empty: bool = False,
                 layer: int | jax.Array | None = None):
        """x [B, S, M], positions [B, S] int32, cache None | LatentCache, layer (stacked cache) ->
        (y [B, S, M], cache)."""
        return mla_attention(self.params_dict(), x, positions, cache, config=self.config, cache_empty=cache_empty,
                             dtype=self.dtype, implementation=self.implementation, layer=layer)
