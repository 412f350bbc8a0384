"""``normkit bench --device cuda`` one op and shape at a time, under a deadline (gpu_check.sh's stage 2).

A device lease is short: this runs the same measurement as ``normkit bench`` (``normkit.bench.run_bench``)
per (op, shape), prints each row as it lands, appends it to ``OUT/NAME_rows.jsonl``, and starts no new
case after ``--deadline`` seconds, so a cut-short run still leaves every finished row and the table
(``OUT/bench_cuda.md``, and ``.json`` with ``--json``).

    PYTHONPATH=src python benchmarks/gpu_bench.py --out gpu-out --deadline 200
"""

from __future__ import annotations

import argparse
import json
import os
import time

from normkit import bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--deadline", type=float, default=200.0, help="seconds after which no new case starts")
    p.add_argument("--ops", default="group_norm,proxy,batch_norm,layer_norm_2d,instance_norm,layer_norm over")
    p.add_argument("--shapes", default="")
    p.add_argument("--backends", default="auto,triton")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--min-time", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--name", default="bench_cuda")
    p.add_argument("--device", default="cuda", help="cpu: a local dry run of this script")
    p.add_argument("--json", action="store_true", help="also write the whole run as NAME.json")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s] or bench.CUDA_SHAPES
    t0 = time.perf_counter()
    data: dict = {}
    rows: list[dict] = []
    for op in a.ops.split(","):
        for shape in shapes:
            if time.perf_counter() - t0 > a.deadline:
                print(f"deadline: skipped {op} {shape}", flush=True)
                continue
            cfg = bench.BenchConfig(
                device=a.device,
                shapes=[shape],
                dtypes=a.dtypes.split(","),
                ops=[op],
                backends=a.backends.split(","),
                repeats=a.repeats,
                min_time=a.min_time,
                compile=a.compile,
                e2e=False,
                quiet=True,
            )
            t = time.perf_counter()
            _, data = bench.run_bench(cfg)
            with open(os.path.join(a.out, f"{a.name}_rows.jsonl"), "a") as f:
                for r in data["ops"]:
                    f.write(json.dumps(r) + "\n")
                    vs = " ".join(f"{k} {v:.2f}" for k, v in r["vs_native"].items() if v is not None)
                    pk = " ".join(f"{k} {v:.0f}%" for k, v in r["pct_peak"].items() if v is not None)
                    print(
                        f"{r['op'][:14]:14s} {str(tuple(r['shape'])):18s} {r['layout']:4s} {r['dtype']} "
                        f"{r['pass']:6s} native {r['ms']['native']:.3f} ms | vs native: {vs} | peak: {pk}",
                        flush=True,
                    )
            rows += data["ops"]
            print(f"-- {op} {shape}: {time.perf_counter() - t:.1f} s", flush=True)
    data["ops"] = rows
    data["wall_s"] = time.perf_counter() - t0
    md = bench.format_markdown(data)
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(md + "\n")
    if a.json:  # (the rows are in the .jsonl already; a device lease returns at most 8 files)
        bench.write_json(data, os.path.join(a.out, f"{a.name}.json"))
    print(f"{len(rows)} rows in {data['wall_s']:.0f} s on {data.get('device')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
