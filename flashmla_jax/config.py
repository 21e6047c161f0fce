"""The hyperparameters of a DeepSeek-V2/V3/V3.2 MLA layer: `MLAConfig`, `YarnScaling` and `param_shapes`.

Plain Python and NumPy (no Flax): `flashmla_jax.checkpoint` reads a config with them, and `flashmla_jax.flax`
(which re-exports all three) builds the layer from them. Shapes: M hidden size, H heads, Q = q_lora_rank,
C = kv_lora_rank (512), R = qk_rope_head_dim (64), Dn = qk_nope_head_dim (128), Dv = v_head_dim (128);
DeepSeek-V3.2's lightning indexer: H_I = index_n_heads (64), D_I = index_head_dim (128).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from flashmla_jax import _checks

__all__ = ["MLAConfig", "YarnScaling", "param_shapes", "INDEXER_PARAMS", "INDEX_PARAM_PREFIX", "indexer_param_shapes"]

INDEXER_PARAMS = ("wq_b", "wk", "k_norm", "k_norm_bias", "weights_proj")
INDEX_PARAM_PREFIX = "index_"     # the indexer's parameters in a layer's dict: index_wq_b, index_wk, ...


def indexer_param_shapes(hidden_size: int, q_lora_rank: int, n_heads: int = 64, head_dim: int = 128) -> dict:
    """Name -> shape of the lightning indexer's parameters (Hugging Face Linear weights transposed):
    wq_b [Q, H_I, D_I], wk [M, D_I], k_norm [D_I], k_norm_bias [D_I], weights_proj [M, H_I]."""
    return {"wq_b": (q_lora_rank, n_heads, head_dim), "wk": (hidden_size, head_dim), "k_norm": (head_dim,),
            "k_norm_bias": (head_dim,), "weights_proj": (hidden_size, n_heads)}


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
    DeepSeek-V3.2 (DeepSeek Sparse Attention): index_topk, the tokens each query attends to (2048), chosen by a
    lightning indexer of index_n_heads heads (64) of index_head_dim features (128, >= R: its half-split RoPE turns
    the first R); the indexer's queries come from the query latent, so it needs q_lora_rank. index_topk None or 0
    (the default): no indexer, a V2/V3 layer (index_n_heads and index_head_dim must then be None).
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
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None

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
        self._check_indexer()

    def _check_indexer(self):
        if not _checks.optional_integer("index_topk", self.index_topk, lo=0):
            if self.index_n_heads is not None or self.index_head_dim is not None:
                raise ValueError("index_n_heads and index_head_dim need index_topk >= 1 (index_topk None or 0 means "
                                 "no indexer)")
            object.__setattr__(self, "index_topk", None)
            return
        if self.index_n_heads is None or self.index_head_dim is None:
            raise ValueError(f"index_topk={self.index_topk} needs index_n_heads and index_head_dim (DeepSeek-V3.2: "
                             "64 and 128)")
        _checks.integer("index_n_heads", self.index_n_heads, lo=1)
        _checks.integer("index_head_dim (its RoPE turns the first qk_rope_head_dim features)", self.index_head_dim,
                        lo=self.qk_rope_head_dim)
        if self.q_lora_rank is None:
            raise ValueError("an indexer (index_topk) needs q_lora_rank: its queries come from the query latent")

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any] | str | os.PathLike) -> "MLAConfig":
        """The attention hyperparameters of a DeepSeek-V2/V3 `config.json` (a dict, or a path to the file).

        Reads hidden_size, num_attention_heads, q_lora_rank (null: V2-Lite's direct query projection),
        kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim (all required), rms_norm_eps (1e-6) and
        the RoPE settings in either transformers layout: v4's top-level `rope_theta` + `rope_scaling`, or v5's
        `rope_parameters` (rope_theta inside, rope_type "default" or "yarn" with the YaRN keys). A YaRN dict
        without original_max_position_embeddings gets max_position_embeddings, as transformers does. Other
        keys (MoE, vocab, num_hidden_layers, rope_interleave) are not this layer's: `flashmla_jax.checkpoint`
        reads the last two. DeepSeek-V3.2 (`model_type` "deepseek_v32", or any config with an `index_topk`):
        index_topk, index_n_heads and index_head_dim, with transformers' defaults 2048, 64 and 128 for a missing
        one; another model_type with an indexer (GLM-MoE-DSA's indexer turns interleaved pairs) is refused.
        Raises ValueError naming a missing or inconsistent key.
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
        return cls(**_hf_indexer_fields(hf_config),
                   hidden_size=int(hf_config["hidden_size"]), num_heads=int(hf_config["num_attention_heads"]),
                   q_lora_rank=None if hf_config.get("q_lora_rank") is None else int(hf_config["q_lora_rank"]),
                   kv_lora_rank=int(hf_config["kv_lora_rank"]), qk_nope_head_dim=int(hf_config["qk_nope_head_dim"]),
                   qk_rope_head_dim=int(hf_config["qk_rope_head_dim"]), v_head_dim=int(hf_config["v_head_dim"]),
                   rope_theta=theta, rope_scaling=rope, rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)))

    @property
    def has_indexer(self) -> bool:
        """True for a DeepSeek-V3.2 layer (index_topk set): attention over each query's top-k tokens."""
        return self.index_topk is not None

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


def _hf_indexer_fields(hf_config: Mapping[str, Any]) -> dict:
    """MLAConfig's index_* fields from a config.json (see `MLAConfig.from_hf_config`); {} without an indexer."""
    model_type = hf_config.get("model_type")
    if hf_config.get("index_topk") is None and model_type != "deepseek_v32":
        return {}
    if model_type not in (None, "deepseek_v32"):
        raise ValueError(f"hf_config has an indexer (index_topk) but model_type {model_type!r}: this layer implements "
                         "DeepSeek-V3.2's ('deepseek_v32')")
    topk = int(hf_config.get("index_topk", 2048))
    if topk == 0:
        return {}
    return dict(index_topk=topk, index_n_heads=int(hf_config.get("index_n_heads", 64)),
                index_head_dim=int(hf_config.get("index_head_dim", 128)))


def param_shapes(config: MLAConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (M hidden, H heads, Q = q_lora_rank, C, R, Dn, Dv as above).

    wq [M, H, Dn+R] (q_lora_rank None) or wq_a [M, Q], q_norm [Q], wq_b [Q, H, Dn+R];
    wkv_a [M, C+R] (the latent c_kv, then k_pe); kv_norm [C]; wkv_b [C, H, Dn+Dv] (W_UK, then W_UV);
    wo [H, Dv, M]. With an indexer (config.has_indexer), its parameters too (`indexer_param_shapes`), named
    with the prefix "index_": index_wq_b [Q, H_I, D_I], index_wk [M, D_I], index_k_norm [D_I],
    index_k_norm_bias [D_I], index_weights_proj [M, H_I]. From a Hugging Face checkpoint: each `*_proj.weight`
    (and `indexer.*.weight`) transposed and reshaped to these shapes (wkv_b = kv_b_proj.weight.T.reshape(C, H,
    Dn+Dv)), norms and their biases as they are.
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
    if c.has_indexer:
        index = indexer_param_shapes(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim)
        shapes.update({INDEX_PARAM_PREFIX + name: shape for name, shape in index.items()})
    return shapes
