"""Two variants of ours' LLaMA-3-8B layer (moe_fwd's layer: q/k/v and gate/up as groups, the default
stacked layout), each captured in a CUDA graph and replayed in alternation with the base linears'
graph in one process: the ratio the layer targets name, for A and B side by side, without the clock
drift between separate runs.

    python benchmarks/ab_layer.py --env METEORA_SOME_TOGGLE       # A: VAR=0, B: VAR=1
    python benchmarks/ab_layer.py --wide-gate-up                  # A: B's columns apart, B: the default
    python benchmarks/ab_layer.py --left-gate                     # A: gate / up each its own copy of x
    python benchmarks/ab_layer.py --wide-linears o_proj           # B: o_proj as [W0 | B_all] too

--env names an environment variable that an experimental build of the op reads at each call (the
graphs are captured with it at 0 and at 1; both in the library's default layout); with --wide-gate-up,
A keeps every linear's B columns in a buffer of their own (gate / up stacked too, the layout before
2026-12-02) and B gives the same weights with gate_proj and up_proj in the [W0 | B_all] layout
(MeteoRALinear.wide_columns, today's default; unstacked). Prints, per routing and
T, each variant's time and its median per-round ratio to base, B / A per round (median and range),
whether B's outputs equal A's bit for bit, and (with nvidia-smi) each one's median SM clock while
it replayed: the bursts are short, so a variant that draws more power may show its cost only end
to end (benchmarks/e2e.py logs the clock too).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_clock import ClockLog  # noqa: E402
from benchmarks.moe_fwd import (  # noqa: E402
    LLAMA3_8B, capture, event_ms, given_inputs, layer_linears, left_first, make_inputs, parse_shapes, run_base,
    run_ours_layer)
from meteora.layer import column_layout  # noqa: E402


def wide_gate_up(linears, left: bool = True, names=frozenset()):
    """Copies of the linears with gate / up (d_out > d_in) and those in ``names`` as [W0 | B_all],
    unstacked (a group unstacks whole); with ``left``, the first of two adjacent such members of a
    group as [B_all | W0] (the library's layout: one copy of x for both)."""
    out = []
    for lin in linears:
        m = copy.copy(lin)
        if lin.d_out > lin.d_in or lin.name in names:
            m.w0_ours, m.b_ours = column_layout(lin.w0, lin.b, True)
            m.stacked = None
        out.append(m)
    by_name = {m.name: m for m in out}
    groups = {}
    for m in out:
        if getattr(m, "group", None):
            m.group = groups.setdefault(m.group[0].name, [by_name[g.name] for g in m.group])
    for members in groups.values():
        if any(m.stacked is None for m in members):
            for m in members:
                m.stacked = None
        if left:
            left_first(members)
    return out


def layer_setup():
    """(generator, LLaMA-3-8B layer shapes, a "hot" input direction per d_in) as the layer benchmarks
    here start from."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = parse_shapes(LLAMA3_8B)
    hot = {d: torch.randn(d, generator=gen, device="cuda") for d in {s[1] for s in shapes}}
    return gen, shapes, hot


def replay_alternated(graphs: dict, rounds: int):
    """Each graph replayed in bursts of 10, the graphs in turn (in reverse order every other round):
    ({name: us per replay, one per round}, ClockLog's summary: each one's SM clock and power while it
    replayed)."""
    torch.cuda.synchronize()
    times = {name: [] for name in graphs}
    order = list(graphs.items())

    def burst(graph):
        def run():
            for _ in range(10):
                graph.replay()
        return run

    with ClockLog(period_ms=20) as clocks:
        for i in range(rounds):
            for name, graph in (order if i % 2 == 0 else order[::-1]):
                with clocks.window(name):
                    times[name].append(event_ms(burst(graph)) / 10 * 1e3)
    return times, clocks.summary()


def round_ratios(times: dict, num: str, den: str) -> tuple[float, float, float]:
    """replay_alternated's times: num's over den's per round, (median, lowest, highest)."""
    r = sorted(n / d for n, d in zip(times[num], times[den]))
    return r[len(r) // 2], r[0], r[-1]


def layer_args(ap: argparse.ArgumentParser, tokens: str, routing: str) -> None:
    """--tokens, --routing and --rounds, as the alternating layer benchmarks take them."""
    ap.add_argument("--tokens", default=tokens)
    ap.add_argument("--routing", default=routing)
    ap.add_argument("--rounds", type=int, default=20, help="alternations (10 replays each per timing)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--env", help="environment variable the op reads: A with it at 0, B at 1")
    which.add_argument("--wide-gate-up", action="store_true",
                       help="A: every B as columns of their own, B: gate / up as [W0 | B_all] (the default)")
    which.add_argument("--wide-linears", help="B: these linears (comma list) as [W0 | B_all] too, whatever their "
                       "shape (MeteoRALinear.wide_columns = 'always'); A: the default")
    which.add_argument("--x-in-place", action="store_true",
                       help="B: gate / up's x given inside their [H_gate | x | H_up] buffer (linear_group_in, as "
                            "MeteoRAModel.set_norm_into_group feeds it): no copy of x; A: the default")
    which.add_argument("--left-gate", action="store_true",
                       help="A: gate / up as [W0 | B_all], each with its own copy of x; B: gate as [B_all | W0] "
                            "(the default: one [H_gate | x | H_up] for both)")
    layer_args(ap, "128,1024,4096", "uniform,concentrated")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_layer: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen, shapes, hot = layer_setup()
    var = args.env

    def setting(value: str) -> None:
        if var:
            os.environ[var] = value

    if var:
        layout_a, layout_b = f"{var}=0", f"{var}=1"
    elif args.wide_linears:
        layout_a, layout_b = "the default", f"the default, {args.wide_linears} as [W0 | B_all] too"
    elif args.x_in_place:
        layout_a, layout_b = "gate / up's x copied by the op", "gate / up's x given in [H_gate | x | H_up] (the library's default)"
    else:
        layout_a = "gate / up as [W0 | B_all], each its own x" if args.left_gate else "B columns apart, gate / up stacked"
        layout_b = "the default (gate as [B_all | W0], up as [W0 | B_all])"
    print(f"{torch.cuda.get_device_name()}; A: {layout_a}, B: {layout_b}")
    for routing in args.routing.split(","):
        columns = "narrow" if args.wide_gate_up or args.left_gate else "wide"
        linears = layer_linears(shapes, routing, gen, hot, columns=columns)
        variant_b = wide_gate_up(linears) if args.wide_gate_up or args.left_gate else linears
        if args.wide_linears:
            variant_b = wide_gate_up(linears, names=set(args.wide_linears.split(",")))
        if args.left_gate:
            linears = wide_gate_up(linears, left=False)
        with torch.no_grad():
            for tokens in [int(t) for t in args.tokens.split(",")]:
                xs = make_inputs(linears, tokens, routing, torch.bfloat16, gen, hot)
                x_cats = given_inputs(linears, xs) if args.x_in_place else None
                graphs = {"base": capture(lambda: [run_base(lin, xs[lin.d_in], 2) for lin in linears])}
                setting("0")
                out_a = run_ours_layer(linears, xs, 2)
                graphs["A"] = capture(lambda: run_ours_layer(linears, xs, 2))
                setting("1")
                out_b = run_ours_layer(variant_b, xs, 2, x_cats=x_cats)
                graphs["B"] = capture(lambda: run_ours_layer(variant_b, xs, 2, x_cats=x_cats))
                setting("0")
                same = all(torch.equal(a, b) for a, b in zip(out_a, out_b))
                times, c = replay_alternated(graphs, args.rounds)

                ra, rb, rab = (round_ratios(times, *pair) for pair in (("A", "base"), ("B", "base"), ("B", "A")))
                print(f"{routing:12} T={tokens:5}: base {statistics.median(times['base']):8.1f} us  "
                      f"A {statistics.median(times['A']):8.1f} x{ra[0]:.3f}  B {statistics.median(times['B']):8.1f} "
                      f"x{rb[0]:.3f}  B/A {rab[0]:.3f} [{rab[1]:.3f}-{rab[2]:.3f}]  B's outputs = A's: {same}"
                      + ("  SM MHz base / A / B " + " / ".join(f"{c[n]['clock_mhz']:.0f}" for n in ("base", "A", "B"))
                         if all(n in c for n in ("base", "A", "B")) else ""),
                      flush=True)
                del xs, graphs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
