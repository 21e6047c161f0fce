"""Many-GPU decode benchmark (rows X-DP, X-CP, X-TP): plain `jax.jit(mla_decode)` over
inputs laid out by flashmla_jax.sharding, against the same call on one GPU.

    python benchmarks/benchmark_multi_gpu.py                   # every row, over 1 and 2 / 4 GPUs (what exists)
    python benchmarks/benchmark_multi_gpu.py --rows X-CP-256K  # a subset
    python benchmarks/benchmark_multi_gpu.py --smoke           # CPU: 8 host devices, implementation xla, tiny

Rows: X-DP-D1 (B128 N4096 H16), X-DP-D1-paged, X-DP-D2 (B64 N16384 H16) batch-sharded; X-CP-256K and
X-CP-1M (one sequence, H16) sequence-sharded; X-TP-D5 (B128 N4096 H128) head-sharded. bf16, S_q 1.
Per row and device count: wall time per call (`time_in_one_dispatch`: four calls on distinct inputs in one
jitted dispatch, host dispatch included) and GPU time from CUPTI (benchmarks/common.py `gpu_kernel_times`),
split by kernel name into attention (our Triton kernels), collective (NCCL) and other;
CUPTI sees the kernels of every GPU, so per-device time is the total over the number of devices.
Targets printed (not asserted): DP per-device GPU time <= 1.1 x one GPU's / n; CP wall speedup >= 1.7x on
2 GPUs and >= 3x on 4. Writes benchmarks/results/multi_gpu_<device>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import tempfile

if "--smoke" in sys.argv:                  # before jax starts: 8 CPU devices stand in for GPUs
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import flashmla_jax as fm  # noqa: E402
from flashmla_jax import sharding  # noqa: E402

D, D_V, PAGE = 576, 512, 64
SCALE = 192 ** -0.5


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    layout: str            # "dp" | "cp" | "tp"
    batch: int
    seqlen: int
    heads: int
    paged: bool = False
    devices: tuple = (2, 4)

    def smoke(self) -> "Row":
        return dataclasses.replace(self, batch=min(self.batch, 8), seqlen=min(self.seqlen // 16, 1024),
                                   heads=min(self.heads, 8))


ROWS = [
    Row("X-DP-D1", "dp", 128, 4096, 16),
    Row("X-DP-D1-paged", "dp", 128, 4096, 16, paged=True),
    Row("X-DP-D2", "dp", 64, 16384, 16),
    Row("X-CP-256K", "cp", 1, 262144, 16),
    Row("X-CP-1M", "cp", 1, 1048576, 16),
    Row("X-TP-D5", "tp", 128, 4096, 128, devices=(4,)),
]
COLLECTIVE_MARKERS = ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reducescatter",
                      "all_to_all", "alltoall", "collective")


def layout_for(row: Row, mesh: Mesh) -> sharding.DecodeLayout:
    axis = mesh.axis_names[0]
    return {"dp": lambda: sharding.data_parallel(mesh, axis), "cp": lambda: sharding.context_parallel(mesh, axis),
            "tp": lambda: sharding.tensor_parallel(mesh, axis)}[row.layout]()


def make_inputs(row: Row, layout: sharding.DecodeLayout, seed: int):
    """Random bf16 inputs generated directly in `layout` (no host copy of the cache)."""
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    put = lambda spec: layout.sharding(spec)
    q = jax.jit(lambda k: jax.random.normal(k, (row.batch, 1, row.heads, D), jnp.bfloat16),
                out_shardings=put(layout.q))(kq)
    lens = jax.device_put(jnp.full((row.batch,), row.seqlen, jnp.int32), put(layout.cache_seqlens))
    if not row.paged:
        kv = jax.jit(lambda k: jax.random.normal(k, (row.batch, row.seqlen, D), jnp.bfloat16),
                     out_shardings=put(layout.kv_cache))(kk)
        return q, kv, lens, None
    per = row.seqlen // PAGE
    kv = jax.jit(lambda k: jax.random.normal(k, (row.batch * per, PAGE, D), jnp.bfloat16),
                 out_shardings=put(layout.paged_kv_cache))(kk)
    # Pages shuffled within each device's pool slice (the per-device-pool layout's invariant).
    n_dev = layout.size(layout.batch)
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.permutation(np.arange(k * row.batch * per // n_dev, (k + 1) * row.batch * per // n_dev))
                            for k in range(n_dev)]).reshape(row.batch, per).astype(np.int32)
    return q, kv, lens, jax.device_put(jnp.asarray(table), put(layout.block_table))


def gpu_times(fn, args, n_dev: int) -> dict | None:
    """CUPTI kernel times of one call: total, per device, and the split by kernel kind; None off the GPU."""
    try:
        kernels = common.gpu_kernel_times(lambda: fn(*args))
    except Exception as e:                 # noqa: BLE001 - the wall time still stands
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    if kernels is None:
        return None
    kind = lambda name: ("collective" if any(m in name.lower() for m in COLLECTIVE_MARKERS)
                         else "attention" if "mla_decode" in name else "other")
    split = {"attention": 0.0, "collective": 0.0, "other": 0.0}
    for name, ms in kernels:
        split[kind(name)] += ms
    total = sum(split.values())
    return dict(total_ms=total, per_device_ms=total / n_dev, **{f"{k}_ms": v for k, v in split.items()},
                per_device_collective_ms=split["collective"] / n_dev,
                kernels=[(n, round(t, 5)) for n, t in kernels[:40]])


def time_in_one_dispatch(f, sets, repeats: int = 10) -> float:
    """Median seconds per call when the calls on all of `sets` (distinct inputs, so nothing is merged) run in
    one jitted dispatch, timed from the dispatch to the last output on every device. common.time_call's
    steady-state clock needs one GPU kept busy by its blocker, which does not hold with several devices
    (it read 1 us for a 4-GPU call); one dispatch per len(sets) calls keeps the host's share small."""
    many = jax.jit(lambda sets: [f(*s) for s in sets])
    jax.block_until_ready(many(sets))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(many(sets))
        samples.append((time.perf_counter() - t0) / len(sets))
    return statistics.median(samples)


def run_row(row: Row, impl: str | None, counts: list[int]) -> list[dict]:
    f = jax.jit(lambda q, kv, l, t: fm.mla_decode(q, kv, l, t, head_dim_v=D_V, softmax_scale=SCALE,
                                                  implementation=impl))
    results = []
    for n in counts:
        mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
        layout = layout_for(row, mesh)
        sets = [make_inputs(row, layout, seed) for seed in range(4)]
        wall = time_in_one_dispatch(f, sets)
        hlo = f.lower(*sets[0]).compile().as_text()
        res = dict(row=row.name, layout=row.layout, devices=n, batch=row.batch, seqlen=row.seqlen, heads=row.heads,
                   paged=row.paged, wall_ms=wall * 1e3, gpu=gpu_times(f, sets[0], n),
                   hlo_all_gathers=hlo.count(" all-gather(") + hlo.count(" all-gather-start("))
        results.append(res)
        del sets
    base = results[0]
    for r in results[1:]:
        n = r["devices"]
        r["speedup_wall"] = base["wall_ms"] / r["wall_ms"]
        g, g1 = r["gpu"], base["gpu"]
        if g and g1 and "per_device_ms" in g and "per_device_ms" in g1:
            r["speedup_gpu"] = g1["per_device_ms"] / g["per_device_ms"]
        if row.layout == "dp" and g and g1 and "per_device_ms" in g and "per_device_ms" in g1:
            r["target"] = f"per-device GPU <= 1.1 x {g1['per_device_ms']:.3f} / {n} ms"
            r["target_met"] = g["per_device_ms"] <= 1.1 * g1["per_device_ms"] / n
        elif row.layout == "cp":
            need = {2: 1.7, 4: 3.0}.get(n)
            if need:
                r["target"] = f"wall speedup >= {need}x"
                r["target_met"] = r["speedup_wall"] >= need
    return results


def plot(results: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r["row"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    counts = sorted({r["devices"] for r in results})
    width = 0.8 / len(counts)
    for i, n in enumerate(counts):
        ys = []
        for name in rows:
            base = next(r for r in results if r["row"] == name and r["devices"] == 1)
            hit = [r for r in results if r["row"] == name and r["devices"] == n]
            ys.append(base["wall_ms"] / hit[0]["wall_ms"] if hit else 0.0)
        ax.bar(np.arange(len(rows)) + i * width, ys, width, label=f"{n} device{'s' * (n > 1)}")
    ax.set_xticks(np.arange(len(rows)) + width * (len(counts) - 1) / 2, rows, rotation=20)
    ax.set_ylabel("speed-up over one device (wall)")
    ax.set_title(f"mla_decode under jit, sharded ({common.device_name()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", help="row names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: 8 host devices, xla, tiny sizes")
    parser.add_argument("--implementation", default=None, help="None: triton on a CUDA GPU, else xla")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results (smoke: a temp dir)")
    args = parser.parse_args(argv)
    impl = "xla" if args.smoke else args.implementation
    rows = [r for r in ROWS if not args.rows or r.name in args.rows]
    if args.smoke:
        rows = [r.smoke() for r in rows]
    available = len(jax.devices())
    print(f"{common.device_name()} x {available}, implementation {impl or 'default'}")
    results = []
    for row in rows:
        counts = [1] + [n for n in row.devices if n <= available]
        if len(counts) == 1:
            print(f"{row.name}: needs {row.devices} devices, {available} present; skipped")
            continue
        for r in run_row(row, impl, counts):
            results.append(r)
            g = r["gpu"] or {}
            gpu = (f"GPU/device {g['per_device_ms']:.3f} ms (attention {g['attention_ms'] / r['devices']:.3f}, "
                   f"collective {g['per_device_collective_ms']:.3f})" if "per_device_ms" in g else
                   (g.get("error", "GPU time: n/a")))
            extra = f" speed-up {r['speedup_wall']:.2f}x" if "speedup_wall" in r else ""
            target = f"  [{r['target']}: {'met' if r['target_met'] else 'MISSED'}]" if "target" in r else ""
            print(f"{r['row']:>14} {r['layout']} x{r['devices']}: wall {r['wall_ms']:.3f} ms{extra}, {gpu}, "
                  f"all-gathers in HLO {r['hlo_all_gathers']}{target}", flush=True)
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="multi_gpu_smoke_") if args.smoke else common.RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    name = f"multi_gpu_{'smoke_' if args.smoke else ''}{common.device_slug()}"
    payload = dict(device=common.device_name(), device_count=available, implementation=impl or "default",
                   jax=jax.__version__, results=results)
    import json
    json_path = os.path.join(out_dir, name + ".json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    if results:
        plot(results, os.path.join(out_dir, name + ".png"))
    print("wrote", json_path)


if __name__ == "__main__":
    main()
