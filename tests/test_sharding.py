"""Many devices: the partitioning rules of mla_decode, mla_prefill and LatentCache.append, and the
named layouts of flashmla_jax.sharding.

The multi-device checks live in tests/sharding_checks.py and run once, in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed when JAX starts, and this
process runs the rest of the suite on one CPU device); each test below asserts on one check's JSON line.
What they cover (implementation "xla": the jnp body inside the same partitioning wrappers as "triton"):
  * every decode layout (DP, TP, CP, DP x TP, DP x CP; contiguous and paged with per-device or replicated
    pools; S_q 1 and causal S_q 2) equals the unsharded result on random data with ragged and zero lengths,
    with outputs laid out as the layout says;
  * the compiled HLO has no all-gather of latent rows: `sharding_checks.latent_gathers` matches every
    `all-gather` / `all-gather-start` instruction whose result shape ends in 576 and holds >= N x 576
    elements (one whole cache sequence); for prefill, last dim d_qk and >= S x d_qk elements;
  * prefill gradients (and forward) under DP, TP, DP x TP (MHA and H_kv = 1) equal the unsharded ones;
  * the interpreted kernels under shard_map, and under plain sharded jit (correct, gathered to device 0);
  * ValueError for a mesh axis that does not divide its dimension, and for a paged pool sharded on D;
  * layer-stacked caches and FP8 caches (their layer index and per-layer scales reach every shard whole).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from flashmla_jax import sharding
from _util import subprocess_env
from sharding_checks import CHECKS

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results():
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = subprocess_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    by_name = {r["name"]: r for r in lines}
    if not by_name:
        pytest.fail(f"sharding_checks.py printed no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    by_name["_stderr"] = proc.stderr[-4000:]
    return by_name


@pytest.mark.parametrize("name", list(CHECKS))
def test_multi_device(results, name):
    result = results.get(name)
    assert result is not None, f"check {name} did not report (crashed?):\n{results['_stderr']}"
    assert result["ok"], json.dumps(result["detail"], indent=1, default=str)[:6000]


def test_layout_specs():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    layout = sharding.data_tensor_parallel(mesh)
    assert layout.q == P("data", None, "model", None) and layout.out == layout.q
    assert layout.kv_cache == P("data", None, None) and layout.paged_kv_cache == P("data", None, None)
    assert layout.cache_seqlens == P("data") and layout.block_table == P("data", None)
    assert layout.lse == P("data", None, "model")
    cp = sharding.data_context_parallel(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "seq")))
    assert cp.kv_cache == P("data", "seq", None) and cp.q == P("data", None, None, None)
    assert sharding.data_parallel(mesh, pool="replicated").paged_kv_cache == P(None, None, None)


@pytest.mark.parametrize("make, match", [
    (lambda m: sharding.DecodeLayout(m, batch=("data",), heads=("data",)), "one role"),
    (lambda m: sharding.tensor_parallel(m, axis="heads"), "not in the mesh"),
    (lambda m: sharding.data_parallel(m, pool="gathered"), "pool must be"),
])
def test_bad_layout_raises(make, match):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match=match):
        make(mesh)


def test_context_parallel_rejects_paged():
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    with pytest.raises(ValueError, match="contiguous kv_cache"):
        sharding.context_parallel(mesh).check((2, 1, 4, 576), (8, 16, 576), paged=True)


_EXIT_WITHOUT_READING = """
import jax, jax.numpy as jnp
from jax.sharding import Mesh
import flashmla_jax as fm
from flashmla_jax import sharding
layout = sharding.context_parallel(Mesh(jax.devices(), ("x",)), "x")
q = jax.device_put(jnp.ones((1, 1, 16, 576), jnp.float32), layout.sharding(layout.q))
kv = jax.device_put(jnp.ones((1, 256, 576), jnp.float32), layout.sharding(layout.kv_cache))
lens = jax.device_put(jnp.full((1,), 256, jnp.int32), layout.sharding(layout.cache_seqlens))
out = jax.jit(lambda q, kv, l: fm.mla_decode(q, kv, l, softmax_scale=0.05, implementation="interpret"))(q, kv, lens)
print("dispatched", flush=True)
"""


def test_interpreted_sharded_program_exits_without_reading_its_result():
    """A sequence-sharded interpreted decode on 8 host devices, in a script that exits while the program may
    still run: it exits cleanly (it used to hang 60 s in a collective, then abort with rc 134: the interpreter's
    host callback imported torch after Python's shutdown had begun, which raised)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_READING],
                          env=subprocess_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=50)
    assert proc.returncode == 0 and "dispatched" in proc.stdout, proc.stderr[-3000:]
