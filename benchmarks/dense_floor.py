"""The floor of a dense mixture of LoRA experts on one LLaMA-3-8B layer: only the cuBLAS GEMMs that
any design which computes every expert's shrink and expand densely must run, with no routing kernel,
no selection, no side stream and no waiting, replayed in alternation with the base linears and with
ours (moe_fwd's layer, the library's default) in one process.

    python benchmarks/dense_floor.py --tokens 1024,4096

Two forms of that work per layer (N experts of rank r, top-k; the expand's left operand H (T, N r)
is given, random, outside the timed graph):

* concat: per group of linears that read one input (q/k/v, gate/up; o and down alone) one routing
  GEMM x [gate; A_all]^T (N + N r columns per member, padded to 8, bf16 out: less traffic than the
  fp32 logits the op needs), then per linear one GEMM [x | H] [W0 | B_all]^T: the expand inside the
  base GEMM along K, no second pass over the output;
* stacked: per group one GEMM of x with [W0s; gates; A_alls] (the shrink as extra output columns of
  the base GEMM, bf16 out), then per linear the expand out += H B_all^T (a second pass over out).

Both leave out work the op must do (routing kernels, writing H), so each is a lower bound for the
design it stands for: a layer of that design cannot run faster than its floor here. Prints each
one's median per-round ratio to base, ours' beside them, and the SM clock while each replayed (the
H200 runs its 700 W cap at these sizes: time follows energy there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ab_layer import layer_args, layer_setup, replay_alternated, round_ratios  # noqa: E402
from benchmarks.moe_fwd import (  # noqa: E402
    capture, given_inputs, layer_linears, make_inputs, run_base, run_ours_layer)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def up8(n: int) -> int:
    return (n + 7) // 8 * 8


def dense_work(linears, xs, gen):
    """The two floor layers' closures over weights and inputs made here (random: only the shapes
    matter for time)."""
    by_name = {lin.name: lin for lin in linears}
    x0 = next(iter(xs.values()))
    dev, dt = x0.device, x0.dtype
    concat, stacked = [], []
    for names in GROUPS:
        members = [by_name[n] for n in names if n in by_name]
        if not members:
            continue
        d_in = members[0].d_in
        x = xs[d_in]
        tokens = x.shape[0]
        rows = sum(up8(m.gate.shape[0] + m.a.shape[0] * m.a.shape[1]) for m in members)
        routing = torch.randn(rows, d_in, generator=gen, device=dev).to(dt) * d_in ** -0.5
        stack = torch.randn(rows + sum(m.d_out for m in members), d_in, generator=gen, device=dev).to(dt) * d_in ** -0.5
        parts = []
        for m in members:
            nr = m.a.shape[0] * m.a.shape[1]
            xh = torch.empty(tokens, d_in + nr, dtype=dt, device=dev)
            xh[:, :d_in] = x
            xh[:, d_in:] = torch.randn(tokens, nr, generator=gen, device=dev).to(dt) * 0.1
            wb = torch.randn(m.d_out, d_in + nr, generator=gen, device=dev).to(dt) * d_in ** -0.5
            parts.append((xh, wb, xh[:, d_in:], wb[:, d_in:], m.d_out))
        concat.append((x, routing, parts))
        stacked.append((x, stack, parts))

    def run_concat():
        for x, routing, parts in concat:
            F.linear(x, routing)
            for xh, wb, _, _, _ in parts:
                F.linear(xh, wb)

    def run_stacked():
        for x, stack, parts in stacked:
            y = F.linear(x, stack)
            col = 0
            for _, _, h, b, d_out in parts:
                y[:, col:col + d_out].addmm_(h, b.t())  # out (a strided view of y) += H B_all^T
                col += d_out

    return run_concat, run_stacked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    layer_args(ap, "1024,4096", "uniform")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("dense_floor: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen, shapes, hot = layer_setup()
    print(f"{torch.cuda.get_device_name()}; N = 28, r = 8, top-2, bf16; ratios: median of {args.rounds} rounds "
          "alternated with base")
    for routing in args.routing.split(","):
        linears = layer_linears(shapes, routing, gen, hot)
        with torch.no_grad():
            for tokens in [int(t) for t in args.tokens.split(",")]:
                xs = make_inputs(linears, tokens, routing, torch.bfloat16, gen, hot)
                x_cats = given_inputs(linears, xs)
                run_concat, run_stacked = dense_work(linears, xs, gen)
                graphs = {
                    "base": capture(lambda: [run_base(lin, xs[lin.d_in], 2) for lin in linears]),
                    "ours": capture(lambda: run_ours_layer(linears, xs, 2, x_cats=x_cats)),
                    "concat": capture(run_concat),
                    "stacked": capture(run_stacked),
                }
                times, c = replay_alternated(graphs, args.rounds)
                cells = []
                for name in ("ours", "concat", "stacked"):
                    cells.append(f"{name} {statistics.median(times[name]):8.1f} us "
                                 f"x{round_ratios(times, name, 'base')[0]:.3f}")
                clock = " / ".join(f"{c[n]['clock_mhz']:.0f}" for n in graphs if n in c)
                print(f"{routing:12} T={tokens:5}: base {statistics.median(times['base']):8.1f} us  " + "  ".join(cells)
                      + (f"  SM MHz base / ours / concat / stacked {clock}" if clock else ""), flush=True)
                del xs, graphs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
