"""Many-GPU decode benchmark (rows X-DP, X-CP, X-TP): plain `jax.jit(mla_decode)` over
inputs laid out by flashmla_jax.sharding, against the same call on one GPU.

    python benchmarks/benchmark_multi_gpu.py                   # every row, over 1 and 2 / 4 GPUs (what exists)
    python benchmarks/benchmark_multi_gpu.py --rows X-CP-256K  # a subset
    python benchmarks/benchmark_multi_gpu.py --smoke           # CPU: 8 host devices, implementation xla, tiny

Rows: X-DP-D1 (B128 N4096 H16), X-DP-D1-paged, X-DP-D2 (B64 N16384 H16) batch-sharded; X-CP-256K and
X-CP-1M (one sequence, H16) sequence-sharded; X-TP-D5 (B128 N4096 H128) head-sharded. bf16, S_q 1.
Per row and device count: wall time per call (`common.time_synced_dispatch`: four calls on distinct inputs in one
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
import sys
import tempfile

if "--smoke" in sys.argv:                  # before jax starts: 8 CPU devices stand in for GPUs
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import common  # noqa: E402  (first: it puts this checkout's flashmla_jax on the path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import flashmla_jax as fm  # noqa: E402
from flashmla_jax import sharding  # noqa: E402

D, D_V = 576, 512
SCALE = 192 ** -0.5


Row = common.Row
ROWS = common.MULTI_GPU_ROWS      # layout "dp" | "cp" | "tp", devices: the counts besides one


def smoke(row: Row) -> Row:
    return dataclasses.replace(row, batch=min(row.batch, 8), context=min(row.context // 16, 1024),
                               heads=min(row.heads, 8))


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
    lens = jax.device_put(jnp.full((row.batch,), row.context, jnp.int32), put(layout.cache_seqlens))
    if not row.paged:
        kv = jax.jit(lambda k: jax.random.normal(k, (row.batch, row.context, D), jnp.bfloat16),
                     out_shardings=put(layout.kv_cache))(kk)
        return q, kv, lens, None
    per = row.context // row.page_size
    kv = jax.jit(lambda k: jax.random.normal(k, (row.batch * per, row.page_size, D), jnp.bfloat16),
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
    split = common.kernel_groups(kernels, dict(collective=COLLECTIVE_MARKERS, attention=("mla_decode",)))
    total = split.pop("total")
    return dict(total_ms=total, per_device_ms=total / n_dev, **{f"{k}_ms": split[k] for k in ("attention",
                                                                                                "collective", "other")},
                per_device_collective_ms=split["collective"] / n_dev,
                kernels=[(n, round(t, 5)) for n, t in kernels[:40]])


def run_row(row: Row, impl: str | None, counts: list[int]) -> list[dict]:
    f = jax.jit(lambda q, kv, l, t: fm.mla_decode(q, kv, l, t, head_dim_v=D_V, softmax_scale=SCALE,
                                                  implementation=impl))
    results = []
    for n in counts:
        mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
        layout = layout_for(row, mesh)
        sets = [make_inputs(row, layout, seed) for seed in range(4)]
        wall = common.time_synced_dispatch(f, sets)
        hlo = f.lower(*sets[0]).compile().as_text()
        res = dict(row=row.name, layout=row.layout, devices=n, batch=row.batch, seqlen=row.context, heads=row.heads,
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
    """Wall speed-up over one device, per row and device count."""
    one = {r["row"]: r["wall_ms"] for r in results if r["devices"] == 1}
    values = {(r["row"], f"{r['devices']} device{'s' * (r['devices'] > 1)}"): one[r["row"]] / r["wall_ms"]
              for r in results if r["devices"] > 1}
    common.plot_bars([common.BarPanel(f"mla_decode under jit, sharded ({common.device_name()})",
                                      "speed-up over one device (wall)", values, reference=1.0)], path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", help="row names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: 8 host devices, xla, tiny sizes")
    parser.add_argument("--implementation", default=None, help="None: triton on a CUDA GPU, else xla")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results (smoke: a temp dir)")
    args = parser.parse_args(argv)
    impl = "xla" if args.smoke else args.implementation
    rows = common.select_rows(ROWS, args.rows)
    if args.smoke:
        rows = [smoke(r) for r in rows]
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
            g = r["gpu"]        # None without a GPU: no GPU part in the line
            gpu = "" if g is None else (
                f", GPU/device {g['per_device_ms']:.3f} ms (attention {g['attention_ms'] / r['devices']:.3f}, "
                f"collective {g['per_device_collective_ms']:.3f})" if "per_device_ms" in g else f", {g['error']}")
            extra = f" (one device's wall ms / this: {r['speedup_wall']:.2f}x)" if "speedup_wall" in r else ""
            target = f"  [{r['target']}: {'met' if r['target_met'] else 'MISSED'}]" if "target" in r else ""
            print(f"{r['row']:>14} {r['layout']} x{r['devices']}: wall {r['wall_ms']:.3f} ms{extra}{gpu}, "
                  f"all-gathers in HLO {r['hlo_all_gathers']}{target}", flush=True)
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="multi_gpu_smoke_") if args.smoke else common.RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    payload = dict(device=common.device_name(), device_count=available, implementation=impl or "default",
                   jax=jax.__version__, results=results)
    json_path = common.write_json("multi_gpu_smoke" if args.smoke else "multi_gpu", payload, out_dir)
    if results:
        plot(results, json_path.replace(".json", ".png"))
    print("wrote", json_path)


if __name__ == "__main__":
    main()
