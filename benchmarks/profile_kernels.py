"""Per-kernel CUDA times of one MeteoRA linear (ours) at a few shapes: where the time goes.

    python benchmarks/profile_kernels.py --tokens 1,4096 --shapes q:4096x4096,gate:4096x14336
    python benchmarks/profile_kernels.py --layer --tokens 1024    # one layer's graph replay, as a timeline

--layer captures ours and the base linears over the whole layer (moe_fwd's layer: q/k/v and gate/up
as groups, the stacked layout) in CUDA graphs and prints, for one replay of each, every kernel with its
stream, start and end (us from the replay's first kernel): what overlaps, what is exposed. With --trace
DIR it also writes the profiler's Chrome traces there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_fwd import (  # noqa: E402
    LLAMA3_8B, Linear, capture, make_inputs, pack_groups, parse_shapes, run_base, run_ours, run_ours_layer, stack_layout)


DEFAULT_SHAPES = "q:4096x4096,gate:4096x14336,down:14336x4096"


def kernel_rows(prof) -> list[tuple[float, float, int, str]]:
    """(start us, duration us, stream, name) of every GPU kernel / memcpy / memset the profiler saw."""
    rows = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            rows.append((ev.time_range.start, ev.time_range.elapsed_us(), getattr(ev, "device_resource_id", -1), ev.name))
    return sorted(rows)


def timeline(label: str, graph: torch.cuda.CUDAGraph):
    """One replay of ``graph`` as a kernel timeline (the profiler returned for a Chrome trace)."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    if not rows:
        print(f"== {label}: the profiler saw no kernels inside the graph")
        return None
    t0 = rows[0][0]
    end = max(r[0] + r[1] for r in rows) - t0
    streams = sorted({r[2] for r in rows})
    busy = {s: sum(r[1] for r in rows if r[2] == s) for s in streams}
    print(f"== {label}: {len(rows)} kernels, {end:.1f} us first start to last end; busy per stream "
          + ", ".join(f"{s}: {b:.1f} us" for s, b in busy.items()))
    for start, dur, stream, name in rows:
        print(f"  {start - t0:8.1f} {start - t0 + dur:8.1f} {dur:7.1f}  s{stream:<3} {name[:90]}")
    return prof


def layer_timelines(args) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = parse_shapes(args.shapes if args.shapes != DEFAULT_SHAPES else LLAMA3_8B)
    hot = {d: torch.randn(d, generator=gen, device="cuda") for d in {s[1] for s in shapes}}
    hot_unit = {d: v / v.norm() * 3.0 for d, v in hot.items()} if args.routing == "concentrated" else None
    linears = [Linear(n, di, do, args.experts, args.rank, torch.bfloat16, gen, hot_unit[di] if hot_unit else None)
               for n, di, do in shapes]
    pack_groups(linears)
    stack_layout(linears)
    trace = Path(args.trace) if args.trace else None
    if trace:
        trace.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            xs = make_inputs(linears, tokens, args.routing, torch.bfloat16, gen, hot)
            for label, fn in (("base", lambda: [run_base(l, xs[l.d_in], args.top_k) for l in linears]),
                              ("ours", lambda: run_ours_layer(linears, xs, args.top_k))):
                prof = timeline(f"layer {label} T={tokens} ({args.routing})", capture(fn))
                if trace and prof is not None:
                    prof.export_chrome_trace(str(trace / f"layer_{label}_T{tokens}.json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="(with --layer the default is LLaMA-3-8B's layer)")
    ap.add_argument("--tokens", default="1,4096")
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--backward", action="store_true", help="profile forward + backward")
    ap.add_argument("--layer", action="store_true", help="timelines of one layer's graph replay, ours and base")
    ap.add_argument("--trace", default=None, help="with --layer: write Chrome traces to this folder")
    args = ap.parse_args(argv)
    if args.layer:
        layer_timelines(args)
        return 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, d_in, d_out in parse_shapes(args.shapes):
        lin = Linear(name, d_in, d_out, args.experts, args.rank, torch.bfloat16, gen, None)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            x = make_inputs([lin], tokens, args.routing, torch.bfloat16, gen, {d_in: torch.randn(d_in, device="cuda")})[d_in]
            if args.backward:
                for t in (lin.gate, lin.a, lin.b):
                    t.requires_grad_(True)
                x.requires_grad_(True)
                fn = lambda: run_ours(lin, x, args.top_k).float().sum().backward()  # noqa: E731
            else:
                fn = lambda: run_ours(lin, x, args.top_k)  # noqa: E731
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            print(f"== {name} {d_in}x{d_out} T={tokens} (10 calls)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
            for t in (lin.gate, lin.a, lin.b):
                t.requires_grad_(False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
