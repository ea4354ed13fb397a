"""Per-kernel CUDA times of one MeteoRA linear (ours) at a few shapes: where the time goes.

    python benchmarks/profile_kernels.py --tokens 1,4096 --shapes q:4096x4096,gate:4096x14336
    python benchmarks/profile_kernels.py --layer --tokens 1024    # one layer's graph replay, as a timeline

--layer captures ours and the base linears over the whole layer (moe_fwd's layer: q/k/v and gate/up
as groups, the stacked layout) in CUDA graphs and prints, for one replay of each, every kernel with its
stream, start and end (us from the replay's first kernel): what overlaps, what is exposed. With --trace
DIR it also writes the profiler's Chrome traces there; with --plot PNG it draws the timelines (a lane
per stream). --from-log draws them from printed logs instead, without a GPU:

    python benchmarks/profile_kernels.py --from-log a.log b.log:ours --match T=4096 --plot timeline.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_fwd import (  # noqa: E402
    LLAMA3_8B, Linear, capture, given_inputs, layer_linears, make_inputs, parse_shapes, run_base, run_ours,
    run_ours_layer)
from meteora._files import atomic_write  # noqa: E402


DEFAULT_SHAPES = "q:4096x4096,gate:4096x14336,down:14336x4096"


def kernel_rows(prof) -> list[tuple[float, float, int, str]]:
    """(start us, duration us, stream, name) of every GPU kernel / memcpy / memset the profiler saw."""
    rows = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            rows.append((ev.time_range.start, ev.time_range.elapsed_us(), getattr(ev, "device_resource_id", -1), ev.name))
    return sorted(rows)


def timeline(label: str, graph: torch.cuda.CUDAGraph):
    """One replay of ``graph`` as a kernel timeline, printed; returns (the profiler, for a Chrome
    trace, and the timeline's rows), or None when the profiler saw no kernel."""
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
    return prof, rows


_HEADER = re.compile(r"^== (?P<label>.+?): \d+ kernels")
_ROW = re.compile(r"^\s+(?P<start>-?[\d.]+)\s+(?P<end>-?[\d.]+)\s+(?P<dur>[\d.]+)\s+s(?P<stream>-?\d+)\s+(?P<name>.*)$")


def parse_timelines(text: str) -> list[tuple[str, list[tuple[float, float, int, str]]]]:
    """The timelines ``timeline`` printed: (label, [(start us, duration us, stream, name), ...])."""
    out = []
    for line in text.splitlines():
        if m := _HEADER.match(line):
            out.append((m["label"], []))
        elif out and (m := _ROW.match(line)):
            out[-1][1].append((float(m["start"]), float(m["dur"]), int(m["stream"]), m["name"].strip()))
    return out


def kernel_kind(name: str) -> str:
    """What a kernel is, for the picture's colours."""
    if "meteora" in name:
        return "meteora kernel (routing / selection / expand)"
    if "badd" in name:
        return "cuBLAS GEMM adding to its output (beta = 1)"
    if "splitKreduce" in name or "Memset" in name:
        return "split-K reduce, memset"
    return "cuBLAS GEMM (beta = 0)"


def lanes_of(rows) -> list[int]:
    """A lane per kernel, the lowest free at its start (a CUDA graph's replay spreads one stream's
    kernels over several internal streams, so lanes show what ran at once, not which stream)."""
    ends: list[float] = []
    lanes = []
    for start, dur, _, _ in rows:
        lane = next((i for i, end in enumerate(ends) if end <= start + 0.05), len(ends))
        if lane == len(ends):
            ends.append(0.0)
        ends[lane] = start + dur
        lanes.append(lane)
    return lanes


def plot_timelines(timelines, path: Path) -> None:
    """One panel per timeline, kernels as bars coloured by kernel_kind, in lanes (lanes_of); shared x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cuBLAS GEMM (beta = 0)": "#4c72b0", "cuBLAS GEMM adding to its output (beta = 1)": "#dd8452",
               "meteora kernel (routing / selection / expand)": "#55a868", "split-K reduce, memset": "#8c8c8c"}
    timelines = [(label, sorted(rows)) for label, rows in timelines]
    lanes = [lanes_of(rows) for _, rows in timelines]
    heights = [max(lane, default=0) + 1 for lane in lanes]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, 1.2 + 0.45 * sum(heights) + 0.35 * len(heights)),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (label, rows), lane_of in zip(axes[:, 0], timelines, lanes):
        t0 = rows[0][0] if rows else 0.0
        for (start, dur, _, name), lane in zip(rows, lane_of):
            ax.barh(lane, dur, left=start - t0, height=0.7, color=colours[kernel_kind(name)], edgecolor="white",
                    linewidth=0.3)
        end = max((r[0] + r[1] - t0 for r in rows), default=0.0)
        ax.set_yticks([])
        ax.set_ylim(max(lane_of, default=0) + 0.6, -0.6)
        ax.set_title(f"{label}: {end:.0f} us", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("us from the first kernel of the replay (kernels that ran at once in separate lanes)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def layer_timelines(args) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = parse_shapes(args.shapes if args.shapes != DEFAULT_SHAPES else LLAMA3_8B)
    hot = {d: torch.randn(d, generator=gen, device="cuda") for d in {s[1] for s in shapes}}
    linears = layer_linears(shapes, args.routing, gen, hot, args.experts, args.rank)
    trace = Path(args.trace) if args.trace else None
    if trace:
        trace.mkdir(parents=True, exist_ok=True)
    drawn = []
    with torch.no_grad():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            xs = make_inputs(linears, tokens, args.routing, torch.bfloat16, gen, hot)
            x_cats = given_inputs(linears, xs)  # gate / up's x where the library's norm writes it
            for label, fn in (("base", lambda: [run_base(l, xs[l.d_in], args.top_k) for l in linears]),
                              ("ours", lambda: run_ours_layer(linears, xs, args.top_k, x_cats=x_cats))):
                name = f"layer {label} T={tokens} ({args.routing})"
                seen = timeline(name, capture(fn))
                if seen is None:
                    continue
                prof, rows = seen
                drawn.append((name, rows))
                if trace:
                    prof.export_chrome_trace(str(trace / f"layer_{label}_T{tokens}.json"))
    if args.plot and drawn:
        plot_timelines(drawn, Path(args.plot))


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
    ap.add_argument("--plot", default=None, help="with --layer or --from-log: draw the timelines to this PNG")
    ap.add_argument("--from-log", nargs="+", default=None,
                    help="timelines printed by --layer: draw them (--plot); LOG:TEXT keeps that log's labels with TEXT")
    ap.add_argument("--match", default="", help="with --from-log: only the timelines whose label has this text")
    args = ap.parse_args(argv)
    if args.from_log:
        if not args.plot:
            ap.error("--from-log needs --plot")
        found = []
        for entry in args.from_log:  # LOG or LOG:TEXT (only that log's timelines whose label has TEXT)
            log, _, only = entry.partition(":") if not Path(entry).exists() else (entry, "", "")
            if not Path(log).exists():
                ap.error(f"--from-log {entry}: no file {log}")
            found += [(f"{Path(log).stem}: {label}", rows) for label, rows in parse_timelines(Path(log).read_text())
                      if args.match in label and only in label and rows]
        if not found:
            print(f"profile_kernels: no timeline{' with ' + repr(args.match) if args.match else ''} in "
                  f"{', '.join(args.from_log)}", file=sys.stderr)
            return 2
        plot_timelines(found, Path(args.plot))
        print(f"wrote {args.plot} ({len(found)} timelines)")
        return 0
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
