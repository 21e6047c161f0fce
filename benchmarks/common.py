"""What every benchmark here shares: the device's name, the two measured ceilings, the timer, the
decode tile-config syntax of the profiling tools, and the % of ceiling bar plot."""
from __future__ import annotations

import functools
import json
import os
import re
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from flashmla_jax.ops.decode import DecodeTiles

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


DECODE_OPTIONS = ("unchain_scores", "split_masked", "late_row_sum")
DECODE_CONFIG_HELP = ("semicolon-separated BLOCK_M,BLOCK_N,warps,stages[,unchain,split,late] "
                      "(the last three 0/1, on for 64-row tiles when left out: ops/decode.py's DecodeTiles)")


def parse_decode_configs(text: str) -> list[DecodeTiles]:
    """"64,64,8,2,1,1,1;16,64,8,3" -> tiles for ops/decode.py's plan_decode (`tiles`)."""
    tiles = []
    for config in text.split(";"):
        values = [int(v) for v in config.split(",")]
        options = dict(zip(DECODE_OPTIONS, (bool(v) for v in values[4:])))
        tiles.append(DecodeTiles.with_defaults(*values[:4], **options))
    return tiles


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def time_call(fn: Callable, input_sets: Sequence[tuple], repeats: int = 20, calls_per_repeat: int = 10,
              warmup: int = 3) -> float:
    """Median seconds per call of the jitted `fn`, rotating over `input_sets` (so that inputs larger
    than L2 are read from memory each time).

    Each repeat first enqueues a few milliseconds of unrelated GPU work, then calls_per_repeat + 1
    calls, and times from the end of the first call to the end of the last. The GPU is busy for the
    whole interval (the host has enqueued everything while the blocker ran), so the host's dispatch
    latency is not counted: the steady state of a decode loop. Without a GPU there is no blocker and
    the first call's end starts the clock all the same."""
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    blocker = _gpu_blocker()
    samples = []
    for r in range(repeats):
        if blocker is not None:
            blocker()
        outs = [fn(*input_sets[(r * calls_per_repeat + i) % len(input_sets)]) for i in range(calls_per_repeat + 1)]
        jax.block_until_ready(outs[0])
        t0 = time.perf_counter()
        jax.block_until_ready(outs[-1])
        samples.append((time.perf_counter() - t0) / calls_per_repeat)
    return statistics.median(samples)


@functools.lru_cache(maxsize=1)
def _gpu_blocker() -> Callable | None:
    """A callable that enqueues ~5 ms of GPU work (200 chained 2048^2 bf16 products) and returns at once;
    None without a GPU."""
    if jax.devices()[0].platform != "gpu":
        return None
    x = jnp.full((2048, 2048), 1 / 2048, jnp.bfloat16)       # y @ x keeps y at its scale
    chain = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, y: y @ x, x))
    jax.block_until_ready(chain(x))
    return lambda: chain(x)


def time_call_in_one_dispatch(fn: Callable, input_sets: Sequence[tuple], **kwargs) -> float:
    """Seconds per call of `fn` when all of `input_sets` run inside one jitted dispatch, as in a decode
    loop under jit. On the H100 and H200 hosts one dispatch costs 28-40 us of host time, more than a short
    decode step takes the GPU. Each set must differ (no common subexpressions to merge), so the calls
    read memory and not L2."""
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    return time_call(many, [(list(input_sets),)], **kwargs) / len(input_sets)


def measure_read_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a streaming read: a float32 sum over a `gib` GiB bf16 array (read once, tiny write)."""
    n = int(gib * 2 ** 30) // 2
    xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.bfloat16) for i in range(2)]
    read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    return n * 2 / time_call(read, [(x,) for x in xs], repeats=10, calls_per_repeat=5)


def measure_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product with float32 accumulation, on random data."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n ** 3 / time_call(mm, [(a, b), (b, a)], repeats=10, calls_per_repeat=5)


def merged_rows(name: str, payload: dict) -> dict:
    """payload with the results of the existing {name}_<device>.json whose rows it does not measure again (runs
    of one benchmark split over several calls; each row keeps the ceilings of its own run: `run_ceilings`)."""
    path = os.path.join(RESULTS_DIR, f"{name}_{device_slug()}.json")
    if not os.path.exists(path):
        return payload
    with open(path) as f:
        old = json.load(f)
    fresh = {r["row"] for r in payload["results"]}
    kept = [r for r in old["results"] if r["row"] not in fresh]
    ceilings = dict(read_bandwidth_tb_s=old.get("read_bandwidth_tb_s"), matmul_tflop_s=old.get("matmul_tflop_s"))
    for r in kept:
        r.setdefault("run_ceilings", ceilings)
    return dict(payload, results=kept + payload["results"])


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}_{device_slug()}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def gpu_kernel_times(run: Callable[[], object]) -> list[tuple[str, float]] | None:
    """[(kernel name, ms)] of every GPU kernel that `run()` launches, from CUPTI; None without a GPU.

    The same CUPTI path as `jax.experimental.mosaic.gpu.profiler.measure`, driven around one call of a
    closure: `measure` runs its function twice on the same arguments, which a step that donates its cache
    cannot do. `run` is called once untimed (warm-up) and once under CUPTI."""
    if jax.devices()[0].platform != "gpu":
        return None
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

    jax.block_until_ready(run())
    ext = mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        jax.block_until_ready(run())
    finally:
        timings = ext._cupti_get_timings(True)
    return list(timings or [])


def plain_jnp_decode(q: jax.Array, kv: jax.Array, cache_seqlens: jax.Array, softmax_scale: float,
                     head_dim_v: int = 512) -> jax.Array:
    """The absorbed decode a JAX user writes by hand: two einsums and a masked softmax.

    q [B, S_q, H, D], kv [B, N, D] (a paged cache gathered first), cache_seqlens [B] -> [B, S_q, H, head_dim_v].
    Causal as `mla_decode`. Unlike the NaN-safe reference it trusts the cache past each length to hold
    finite numbers (it masks scores, not the cache) and does not guard rows with no visible key: one pass
    over the cache for the scores and one for the output, as fast as plain XLA gets."""
    n, s_q = kv.shape[1], q.shape[1]
    scores = jnp.einsum("bshd,bnd->bshn", q, kv, preferred_element_type=jnp.float32) * softmax_scale
    limit = cache_seqlens[:, None] - s_q + 1 + jnp.arange(s_q)[None, :]                 # [B, S_q]
    scores = jnp.where(jnp.arange(n)[None, None, None, :] < limit[:, :, None, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    return jnp.einsum("bshn,bnd->bshd", p, kv[..., :head_dim_v], preferred_element_type=jnp.float32).astype(q.dtype)


def plot_pct_of_ceiling(results: list[dict], path: str, title: str) -> None:
    """A PNG bar chart of each result's % of the binding ceiling, grouped by "row", one bar per "implementation":
    "gpu_pct_of_ceiling" (kernel GPU time) where any result has it, else "pct_of_ceiling" (wall time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["row"] for r in results))
    impls = list(dict.fromkeys(r["implementation"] for r in results))
    gpu = any(r.get("gpu_pct_of_ceiling") is not None for r in results)
    key = "gpu_pct_of_ceiling" if gpu else "pct_of_ceiling"
    fig, ax = plt.subplots(figsize=(max(9, 0.9 * len(names) * len(impls) / 2), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r[key] or 0 for r in results if r["row"] == n and r["implementation"] == impl), 0)
                for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=impl)
    ax.set_xticks(np.arange(len(names)) + width * (len(impls) - 1) / 2, names, rotation=30, ha="right")
    ax.set_ylabel("% of the binding ceiling" + (" (kernel GPU time)" if gpu else " (wall time)"))
    ax.set_title(title)
    ax.axhline(100, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
