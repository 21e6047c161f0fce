"""Helpers the tests share (imported as `from _util import ...`: pytest puts tests/ on sys.path, and
tests/sharding_checks.py runs from there). The GPU gate is tests/conftest.py's `gpu` mark.

The references, each checked against the one above it:
  1. float64 NumPy loops, one row at a time: the definitions (`decode_numpy` in test_decode.py,
     `prefill_numpy` in test_prefill.py, `sparse_numpy` in test_sparse.py; for FP8, bytes built by hand with
     ml_dtypes in test_fp8.py).
  2. flashmla_jax/reference.py, the jnp reference and the "xla" implementation: checked against 1 at
     small shapes (tier 1), including masks, empty rows and paging; FP8 caches through `dequantize_latent`.
  3. the Triton kernels: "interpret" on the CPU (tier 2, small shapes that reach every mask and schedule)
     and "triton" on the GPU (tier 3, `-m gpu`, full shapes), checked against 2 by `rel_err` bounds.
Everything else (the cache, the Flax layer, the partitioning rules, the checkpoint loader) is checked
against the ops, or against separately written forwards (test_checkpoint.py's float64 HF forward).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import jax
import numpy as np

import flashmla_jax
from flashmla_jax import reference


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf, so it never passes a bound."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(ref))):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def attend_numpy(keys, q, scale: float, head_dim_v: int):
    """float64 softmax attention of one query q [D] over keys [K, D] (K >= 1), V = keys[:, :head_dim_v]:
    (out [head_dim_v], lse, the largest scaled score). The loops of level 1 above are built on it."""
    scores = keys @ q * scale
    m = scores.max()
    p = np.exp(scores - m)
    return p @ keys[:, :head_dim_v] / p.sum(), m + np.log(p.sum()), m


def subprocess_env(**overrides: str) -> dict:
    """os.environ with `overrides`, and PYTHONPATH led by the flashmla_jax under test, so that a child
    Python imports this package and not whichever one is installed."""
    env = {**os.environ, **overrides}
    root = os.path.dirname(os.path.dirname(os.path.abspath(flashmla_jax.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_python(code: str) -> str:
    """Runs `code` in a fresh Python (subprocess_env) and returns its stdout; a failure shows its stderr."""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def xla_prefill_bodies(causal: bool = True) -> tuple[Callable, Callable]:
    """(forward, backward) with the prefill kernel launchers' signatures, computed by the jnp reference: the
    pure-JAX bodies the CPU tests run through `partition_prefill` with plan None (the rules are the same for
    the Triton kernels)."""

    def forward(q, k, v, segment_ids, scale, plan):
        del plan
        out, lse = reference.mla_prefill_reference(q, k, v, softmax_scale=scale, causal=causal,
                                                   segment_ids=segment_ids)
        return out, lse.transpose(0, 2, 1)

    def backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan):
        del out, lse
        _, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, segment_ids, scale, plan), q, k, v)
        return vjp((dout, dlse))

    return forward, backward
