"""Hugging Face DeepSeek-V2/V3/V3.2 attention weights -> this library's stacked MLA parameters.

A DeepSeek checkpoint keeps each layer's attention under `model.layers.{i}.self_attn.` as torch Linear
weights, [out, in]:
  q_proj [H·(Dn+R), M]                  (q_lora_rank None, as DeepSeek-V2-Lite) or
  q_a_proj [Q, M], q_a_layernorm [Q], q_b_proj [H·(Dn+R), Q]
  kv_a_proj_with_mqa [C+R, M] (c_kv rows, then k_pe rows), kv_a_layernorm [C]
  kv_b_proj [H·(Dn+Dv), C] (per head: the Dn k_nope rows, then the Dv value rows)
  o_proj [M, H·Dv]
(each name + ".weight"), and for DeepSeek-V3.2 (config.has_indexer) the lightning indexer's, under `indexer.`:
  indexer.wq_b [H_I·D_I, Q], indexer.wk [D_I, M], indexer.k_norm (LayerNorm: .weight and .bias [D_I]),
  indexer.weights_proj [H_I, M]
read into index_wq_b [Q, H_I, D_I], index_wk [M, D_I], index_k_norm, index_k_norm_bias, index_weights_proj
[M, H_I]. `flashmla_jax.config.param_shapes` names the other side: each Linear is transposed and its head axis
split out (wq [M, H, Dn+R], wq_a [M, Q], q_norm [Q], wq_b [Q, H, Dn+R], wkv_a [M, C+R],
kv_norm [C], wkv_b [C, H, Dn+Dv], wo [H, Dv, M]), and `stack_params` puts the layers on a leading L axis,
the layout a model scanned over layers (`lax.scan`, `nnx.scan`) takes.

RoPE: this layer rotates interleaved pairs (x[2i], x[2i+1]). Checkpoints with `rope_interleave: true` (the
transformers default, and DeepSeek's own release) load as they are: transformers de-interleaves q_pe and
k_pe after the projection, the same permutation on both sides of every score. Checkpoints with
`rope_interleave: false` were trained with rotate_half RoPE, which rotates (x[i], x[i+R/2]) by inv_freq[i];
the loader permutes their rotary output rows so that new row j is old row `rope_permutation(R)[j]` =
[0, R/2, 1, R/2+1, …][j], i.e. the pair (i, i+R/2) lands on (2i, 2i+1). The rows permuted are the last R
rows of each head's Dn+R block of q_proj / q_b_proj (q_pe), and the last R rows of kv_a_proj_with_mqa
(k_pe); nothing else of the MLA carries RoPE. DeepSeek-V3.2's indexer turns half-split pairs (x[i], x[i+R/2]) of
its first R features (transformers and DeepSeek's code alike), which `flashmla_jax.indexer_math` computes as
such: its rows are never permuted. V3.2's MLA RoPE is always interleaved (transformers' V3.2 config has no
rope_interleave), so an indexer config with `rope_interleave: false` is refused.

FP8 checkpoints (DeepSeek-V3's release: float8_e4m3 weights with a float32 `weight_scale_inv` per
128 x 128 block) are dequantized to float32 while loading. Tensors are read with `safetensors`
(framework="numpy"); dtypes its NumPy loader lacks (bfloat16 on older versions, float8) are read from the
file's bytes as `ml_dtypes` arrays. The results are NumPy arrays (bfloat16 as ml_dtypes.bfloat16): put
them on a device with `jax.device_put` when you want them there.

This module needs the `safetensors` package (the `checkpoint` extra); `import flashmla_jax` does not.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flashmla_jax._extras import require
from flashmla_jax.config import MLAConfig, param_shapes

__all__ = ["HFCheckpointConfig", "read_hf_config", "hf_param_shapes", "rope_permutation",
           "mla_params_from_state_dict", "stack_params", "SafetensorsStateDict", "load_mla_stack"]

LAYER_PREFIX = "model.layers.{layer}.self_attn."
_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "indexer.wq_b",
            "indexer.wk", "indexer.weights_proj")
# Buffers some exports keep under self_attn; they are recomputed from the config, never loaded.
_IGNORED = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class HFCheckpointConfig:
    """What the loader needs from a DeepSeek `config.json`.

    config: the layer's MLAConfig (`MLAConfig.from_hf_config`); num_layers: num_hidden_layers (None if
    absent; DeepSeek-V3's files also hold an MTP layer past it, which is not loaded by default);
    rope_interleave: the transformers flag (default True); weight_block_size: (rows, cols) of the FP8
    scale blocks from `quantization_config`, (128, 128) when absent.
    """
    config: MLAConfig
    num_layers: int | None = None
    rope_interleave: bool = True
    weight_block_size: tuple[int, int] = (128, 128)


def read_hf_config(hf_config: Mapping[str, Any] | str | os.PathLike) -> HFCheckpointConfig:
    """A DeepSeek `config.json` (dict, path to the file, or path to its directory) -> HFCheckpointConfig."""
    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"hf_config: no config file at {str(p)!r}")
        with open(p) as f:
            hf_config = json.load(f)
    if not isinstance(hf_config, Mapping):
        raise TypeError(f"hf_config must be a dict or a path to config.json, got {type(hf_config).__name__}")
    interleave = hf_config.get("rope_interleave", True)
    if not isinstance(interleave, bool):
        raise ValueError(f"hf_config['rope_interleave'] must be true or false, got {interleave!r}")
    n = hf_config.get("num_hidden_layers")
    config = MLAConfig.from_hf_config(hf_config)
    if config.has_indexer and not interleave:
        raise ValueError("hf_config['rope_interleave'] = false with an indexer: DeepSeek-V3.2's MLA RoPE is "
                         "interleaved (transformers' V3.2 config has no such flag)")
    quant = hf_config.get("quantization_config") or {}
    block = tuple(int(b) for b in quant.get("weight_block_size", (128, 128)))
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"quantization_config['weight_block_size'] must be two positive ints, got {block}")
    return HFCheckpointConfig(config, None if n is None else int(n), interleave, block)


def hf_param_shapes(config: MLAConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name (under `model.layers.{i}.self_attn.`) -> its [out, in] shape for this config."""
    c = config
    h, qk, m = c.num_heads, c.qk_head_dim, c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank is None:
        shapes["q_proj.weight"] = (h * qk, m)
    else:
        shapes["q_a_proj.weight"] = (c.q_lora_rank, m)
        shapes["q_a_layernorm.weight"] = (c.q_lora_rank,)
        shapes["q_b_proj.weight"] = (h * qk, c.q_lora_rank)
    shapes["kv_a_proj_with_mqa.weight"] = (c.latent_dim, m)
    shapes["kv_a_layernorm.weight"] = (c.kv_lora_rank,)
    shapes["kv_b_proj.weight"] = (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    shapes["o_proj.weight"] = (m, h * c.v_head_dim)
    if c.has_indexer:
        hi, di = c.index_n_heads, c.index_head_dim
        shapes.update({"indexer.wq_b.weight": (hi * di, c.q_lora_rank), "indexer.wk.weight": (di, m),
                       "indexer.k_norm.weight": (di,), "indexer.k_norm.bias": (di,),
                       "indexer.weights_proj.weight": (hi, m)})
    return shapes


def rope_permutation(r: int) -> np.ndarray:
    """[R] int: [0, R/2, 1, R/2+1, …]. rotate_half features x[perm] are this layer's interleaved features.

    rotate_half RoPE turns the pair (x[i], x[i+R/2]) by inv_freq[i]; y = x[perm] puts that pair at
    (y[2i], y[2i+1]), which `flashmla_jax.flax.apply_rope` turns by the same inv_freq[i]. So
    apply_rope(x[..., perm]) == rotate_half_rope(x)[..., perm], and q·k is unchanged.
    """
    if not isinstance(r, (int, np.integer)) or r <= 0 or r % 2:
        raise ValueError(f"r must be a positive even int, got {r!r}")
    return np.arange(r).reshape(2, r // 2).T.reshape(-1)


# ---------------------------------------------------------------- one layer from a state dict

def _dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], key: str) -> np.ndarray:
    """w [out, in] float8, scale_inv [ceil(out/bo), ceil(in/bi)] -> float32 w · scale per block (DeepSeek)."""
    bo, bi = block
    want = (math.ceil(w.shape[0] / bo), math.ceil(w.shape[1] / bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{key}_scale_inv must have shape {want} for a {tuple(w.shape)} weight in "
                         f"{bo}x{bi} blocks, got {tuple(scale_inv.shape)}")
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bo, 0), bi, 1)[:w.shape[0], :w.shape[1]]
    return np.asarray(w, np.float32) * s


def mla_params_from_state_dict(state_dict: Mapping[str, Any], config: MLAConfig, layer: int, *,
                               rope_interleave: bool = True, prefix: str = LAYER_PREFIX,
                               weight_block_size: tuple[int, int] = (128, 128),
                               dtype=None) -> dict[str, np.ndarray]:
    """One layer's parameters (the names and shapes of `param_shapes(config)`) from a HF-layout mapping.

    state_dict: any mapping name -> array-like (NumPy, torch via np.asarray, a `SafetensorsStateDict`);
    only the keys under `prefix.format(layer=layer)` are read, and every key there must be one this config
    expects (a `.weight` per module above; `.weight_scale_inv` beside FP8 Linear weights). rope_interleave:
    the checkpoint's flag; False permutes the MLA's rotary rows (module docstring; refused with an indexer,
    whose rows are never permuted). dtype: the result's dtype;
    None keeps the stored one (FP8 weights are dequantized to float32 either way).
    Raises ValueError naming a missing or unexpected key or a wrong shape.
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    if not isinstance(rope_interleave, (bool, np.bool_)):
        raise TypeError(f"rope_interleave must be a bool, got {rope_interleave!r}")
    if config.has_indexer and not rope_interleave:
        raise ValueError("rope_interleave=False with an indexer: DeepSeek-V3.2's MLA RoPE is interleaved")
    pre = prefix.format(layer=layer)
    shapes = hf_param_shapes(config)
    allowed = set(shapes) | {n.replace(".weight", ".weight_scale_inv") for n in shapes
                             if n.removesuffix(".weight") in _LINEARS}
    present = {k[len(pre):] for k in state_dict.keys() if k.startswith(pre)}
    missing = sorted(set(shapes) - present)
    if missing:
        raise ValueError(f"state_dict lacks {[pre + k for k in missing]} (layer {layer}, q_lora_rank="
                         f"{config.q_lora_rank})")
    unexpected = sorted(present - allowed - set(_IGNORED))
    if unexpected:
        hint = ("; indexer weights: a DeepSeek-V3.2 checkpoint needs a config with index_topk"
                if not config.has_indexer and any(k.startswith("indexer.") for k in unexpected) else "")
        raise ValueError(f"state_dict has unexpected keys {[pre + k for k in unexpected]} for this config "
                         f"(q_lora_rank={config.q_lora_rank}; this layer has no biases{hint})")

    def get(name: str) -> np.ndarray:
        key = pre + name
        w = np.asarray(state_dict[key])
        if tuple(w.shape) != shapes[name]:
            raise ValueError(f"{key} must have shape {shapes[name]} (torch [out, in]), got {tuple(w.shape)}")
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"      # a norm's bias has none
        if scale_name in present:
            w = _dequantize_fp8(w, np.asarray(state_dict[pre + scale_name]), weight_block_size, key)
        elif w.dtype.itemsize == 1 and w.dtype.kind not in "iub":
            raise ValueError(f"{key} is {w.dtype} without a {scale_name} to dequantize it")
        return w

    c = config
    h, dn, r, kv = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    out: dict[str, np.ndarray] = {}
    if c.q_lora_rank is None:
        out["wq"] = get("q_proj.weight").T.reshape(c.hidden_size, h, dn + r)
    else:
        out["wq_a"] = get("q_a_proj.weight").T
        out["q_norm"] = get("q_a_layernorm.weight")
        out["wq_b"] = get("q_b_proj.weight").T.reshape(c.q_lora_rank, h, dn + r)
    out["wkv_a"] = get("kv_a_proj_with_mqa.weight").T
    out["kv_norm"] = get("kv_a_layernorm.weight")
    out["wkv_b"] = get("kv_b_proj.weight").T.reshape(kv, h, dn + c.v_head_dim)
    out["wo"] = get("o_proj.weight").T.reshape(h, c.v_head_dim, c.hidden_size)
    if c.has_indexer:
        out["index_wq_b"] = get("indexer.wq_b.weight").T.reshape(c.q_lora_rank, c.index_n_heads, c.index_head_dim)
        out["index_wk"] = get("indexer.wk.weight").T
        out["index_k_norm"] = get("indexer.k_norm.weight")
        out["index_k_norm_bias"] = get("indexer.k_norm.bias")
        out["index_weights_proj"] = get("indexer.weights_proj.weight").T
    if not rope_interleave:
        # rotate_half weights -> interleaved: new rotary column j is old rotary column perm[j], in q_pe of
        # every head and in k_pe (our layout is [in, out], so the HF rows are the last axis here).
        perm = rope_permutation(r)
        wq = "wq" if c.q_lora_rank is None else "wq_b"
        out[wq] = np.concatenate([out[wq][..., :dn], out[wq][..., dn + perm]], axis=-1)
        out["wkv_a"] = np.concatenate([out["wkv_a"][:, :kv], out["wkv_a"][:, kv + perm]], axis=-1)
    expected = param_shapes(config)
    return {name: np.ascontiguousarray(out[name] if dtype is None else out[name].astype(dtype))
            for name in expected}


def stack_params(layers: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """[{name: [...]}] * L -> {name: [L, ...]}: the stacked parameters of a model scanned over layers.

    Every dict must have the same names, shapes and dtypes (ValueError naming the first that differs).
    NumPy in, NumPy out; anything else goes through np.asarray (jax.Array included: stack those with
    `jax.tree.map(lambda *a: jnp.stack(a), *layers)` to stay on the device).
    """
    if isinstance(layers, Mapping) or not isinstance(layers, Sequence) or not layers:
        raise ValueError("layers must be a non-empty sequence of parameter dicts")
    first = layers[0]
    for i, d in enumerate(layers):
        if not isinstance(d, Mapping):
            raise TypeError(f"layers[{i}] must be a dict of arrays, got {type(d).__name__}")
        if set(d) != set(first):
            raise ValueError(f"layers[{i}] has keys {sorted(d)}, layers[0] has {sorted(first)}")
        for k in first:
            a, b = np.asarray(d[k]), np.asarray(first[k])
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"layers[{i}][{k!r}] is {a.dtype}{list(a.shape)}, layers[0][{k!r}] is "
                                 f"{b.dtype}{list(b.shape)}")
    return {k: np.stack([np.asarray(d[k]) for d in layers]) for k in first}


# ---------------------------------------------------------------- safetensors files

def _raw_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes
    return {"BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
            "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F16": np.dtype(np.float16),
            "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}


def _read_header(file: Path) -> tuple[int, dict]:
    """The safetensors header: (byte offset of the data, {name: {dtype, shape, data_offsets}})."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _read_raw(file: Path, name: str) -> np.ndarray:
    """One tensor read from the file's bytes (little-endian, as safetensors stores every dtype)."""
    start, header = _read_header(file)
    info = header[name]
    dtypes = _raw_dtypes()
    if info["dtype"] not in dtypes:
        raise ValueError(f"{name} in {file} has dtype {info['dtype']}, which the loader cannot read")
    dt = dtypes[info["dtype"]].newbyteorder("<")
    lo, hi = info["data_offsets"]
    count = (hi - lo) // dt.itemsize
    with open(file, "rb") as f:
        arr = np.fromfile(f, dtype=dt, count=count, offset=start + lo)
    return arr.astype(dt.newbyteorder("=")).reshape(info["shape"])


class SafetensorsStateDict(Mapping):
    """A read-only, lazy name -> np.ndarray mapping over a Hugging Face safetensors checkpoint.

    path: a directory with `model.safetensors.index.json` (a sharded set: its weight_map says which file
    holds each name), or with `model.safetensors`, or with other *.safetensors files (their headers are
    read); or one .safetensors file; or the index file itself. A tensor is read from disk on each access.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            single = p / "model.safetensors"
            if index.is_file():
                p = index
            elif single.is_file():
                p = single
            else:
                files = sorted(p.glob("*.safetensors"))
                if not files:
                    raise ValueError(f"path {str(path)!r} holds no model.safetensors, "
                                     "model.safetensors.index.json or *.safetensors file")
                self._where = {k: f for f in files for k in _read_header(f)[1]}
                return
        if not p.is_file():
            raise ValueError(f"path {str(path)!r} does not exist")
        if p.name.endswith(".json"):
            with open(p) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ValueError(f"{p} has no 'weight_map' dict (not a safetensors index)")
            self._where = {k: p.parent / v for k, v in weight_map.items()}
        else:
            self._where = {k: p for k in _read_header(p)[1]}

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._where[name]   # KeyError for an unknown name, as a dict
        if not file.is_file():
            raise ValueError(f"{name} is mapped to {file}, which does not exist")
        safe_open = require("safetensors", "flashmla_jax.checkpoint").safe_open
        try:
            with safe_open(str(file), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception:   # noqa: BLE001 — old safetensors lack bfloat16, current ones float8: read the bytes
            return _read_raw(file, name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _layers_present(keys) -> int:
    """1 + the largest i with a `model.layers.{i}.self_attn.` key (0 if none)."""
    pattern = re.compile(r"model\.layers\.(\d+)\.self_attn\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def load_mla_stack(path: str | os.PathLike, config: MLAConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   *, layers: Sequence[int] | None = None, dtype=None,
                   rope_interleave: bool | None = None) -> tuple[MLAConfig, dict[str, np.ndarray]]:
    """Loads every (or the chosen) layer's attention from a safetensors checkpoint, stacked over layers.

    Args:
      path: a checkpoint directory (see `SafetensorsStateDict`), a .safetensors file or an index file.
      config: None reads `config.json` beside the weights; or a config dict / path (`read_hf_config`); or
        an MLAConfig (then rope_interleave defaults to True, transformers' default, and the layer count to
        what the files hold).
      layers: the layer indices to load, in order (default: range(num_hidden_layers)).
      dtype: the parameters' dtype (e.g. jnp.bfloat16); None keeps the stored dtype (FP8 -> float32).
      rope_interleave: overrides the config's flag (False is refused for a DeepSeek-V3.2 config).

    Returns:
      (MLAConfig, {name: np.ndarray [L, ...]}) with the names of `param_shapes(config)`, e.g. wkv_b
      [L, C, H, Dn+Dv]; `params_i = {k: v[i] for k, v in params.items()}` is one layer for `mla_attention`.
    """
    sd = SafetensorsStateDict(path)
    if isinstance(config, MLAConfig):
        info = HFCheckpointConfig(config)
    elif config is None:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        if not (base / "config.json").is_file():
            raise ValueError(f"config is None but there is no config.json in {str(base)!r}; pass config=")
        info = read_hf_config(base / "config.json")
    else:
        info = read_hf_config(config)
    interleave = info.rope_interleave if rope_interleave is None else rope_interleave
    if layers is None:
        n = info.num_layers if info.num_layers is not None else _layers_present(sd.keys())
        if n == 0:
            raise ValueError(f"no 'model.layers.{{i}}.self_attn.' weights found under {str(path)!r}")
        layers = range(n)
    layers = list(layers)
    if not layers or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in layers):
        raise ValueError(f"layers must be a non-empty sequence of non-negative ints, got {layers!r}")
    per_layer = [mla_params_from_state_dict(sd, info.config, i, rope_interleave=interleave,
                                            weight_block_size=info.weight_block_size, dtype=dtype)
                 for i in layers]
    return info.config, stack_params(per_layer)
