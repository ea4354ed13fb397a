"""The expand folded into the base GEMM along K, against today's second GEMM, in plain torch (cuBLAS):

    base      y = x W0^T
    current   y = x W0^T, then y += H B_all^T in place (a second GEMM, a second pass over y)
    concat    y = [x | H] [W0 | B_all]^T: one GEMM with K = d + N r, the weight stored side by side
              (W0 a strided view of it, so the base model loses nothing), the input copied into a
              wide buffer first (timed with the copy, and without it: when the op before writes there)
    pair      gate and up sharing one wide input [H_g | x | H_u]: gate reads columns [0, N r + d),
              up reads [N r, N r + d + N r); one copy of x for both

Each row is the median of several CUDA-graph replays (bf16, H uniform top-k routing as route_select
writes it). No extension needed: this decides whether the kernels should write H beside x.

    python benchmarks/concat_k.py --out benchmarks/results/latest_concat_k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_fwd import capture, median_ms  # noqa: E402


def timed(fn, replays: int = 20) -> float:
    """Median microseconds of one call of fn, from replays of a CUDA graph of ``replays`` calls."""
    graph = capture(lambda: [fn() for _ in range(replays)])
    return median_ms(graph.replay) * 1000 / replays


def routing(tokens: int, experts: int, top_k: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.rand(tokens, experts, generator=gen).argsort(1)[:, :top_k]
    dense = torch.zeros(tokens, experts, rank)
    dense.scatter_(1, idx.unsqueeze(2).expand(-1, -1, rank), torch.randn(tokens, top_k, rank, generator=gen) * 0.3)
    return dense.reshape(tokens, experts * rank)


def one_linear(t: int, d: int, f: int, nr: int, top: tuple, gen, dev, dt) -> dict:
    x = torch.randn(t, d, generator=gen).to(dev, dt)
    h = routing(t, nr // top[1], top[0], top[1], gen).to(dev, dt)
    wc = (torch.randn(f, d + nr, generator=gen) * d**-0.5).to(dev, dt)
    w0, b = wc[:, :d], wc[:, d:]
    w0c, bc = w0.contiguous(), b.contiguous()
    xc = torch.cat([x, h], 1)
    y = torch.empty(t, f, device=dev, dtype=dt)

    def current():
        torch.mm(x, w0c.t(), out=y)
        y.addmm_(h, bc.t())

    def concat_copy():
        xc[:, :d].copy_(x)
        torch.mm(xc, wc.t(), out=y)

    row = {
        "base": timed(lambda: torch.mm(x, w0c.t(), out=y)),
        "base_strided_w0": timed(lambda: torch.mm(x, w0.t(), out=y)),
        "current": timed(current),
        "concat": timed(lambda: torch.mm(xc, wc.t(), out=y)),
        "concat_with_copy": timed(concat_copy),
    }
    ref = (x.float() @ w0c.float().t() + h.float() @ bc.float().t())
    current()
    row["err_current"] = (y.float() - ref).abs().max().item()
    torch.mm(xc, wc.t(), out=y)
    row["err_concat"] = (y.float() - ref).abs().max().item()
    return row


def gate_up_pair(t: int, d: int, f: int, nr: int, top: tuple, gen, dev, dt) -> dict:
    x = torch.randn(t, d, generator=gen).to(dev, dt)
    hg, hu = (routing(t, nr // top[1], top[0], top[1], gen).to(dev, dt) for _ in range(2))
    wg = (torch.randn(f, nr + d, generator=gen) * d**-0.5).to(dev, dt)   # [B_g | W0_g]
    wu = (torch.randn(f, d + nr, generator=gen) * d**-0.5).to(dev, dt)   # [W0_u | B_u]
    wg0, bg, wu0, bu = wg[:, nr:].contiguous(), wg[:, :nr].contiguous(), wu[:, :d].contiguous(), wu[:, d:].contiguous()
    wide = torch.cat([hg, x, hu], 1)
    g, u = torch.empty(t, f, device=dev, dtype=dt), torch.empty(t, f, device=dev, dtype=dt)

    def base():
        torch.mm(x, wg0.t(), out=g)
        torch.mm(x, wu0.t(), out=u)

    def current():
        torch.mm(x, wg0.t(), out=g)
        g.addmm_(hg, bg.t())
        torch.mm(x, wu0.t(), out=u)
        u.addmm_(hu, bu.t())

    def shared(copy: bool):
        def fn():
            if copy:
                wide[:, nr:nr + d].copy_(x)
            torch.mm(wide[:, :nr + d], wg.t(), out=g)
            torch.mm(wide[:, nr:], wu.t(), out=u)
        return fn

    row = {"base": timed(base), "current": timed(current), "concat": timed(shared(False)),
           "concat_with_copy": timed(shared(True))}
    current()
    ref = torch.cat([g, u], 1).float()
    wide[:, nr:nr + d].zero_()
    shared(True)()
    row["err_concat"] = (torch.cat([g, u], 1).float() - ref).abs().max().item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,1024,4096")
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/latest_concat_k")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("concat_k.py: needs a CUDA device")
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    nr, top = args.experts * args.rank, (args.top_k, args.rank)
    shapes = {"q/o 4096->4096": (4096, 4096), "k/v 4096->1024": (4096, 1024),
              "gate/up 4096->14336": (4096, 14336), "down 14336->4096": (14336, 4096)}
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "experts": args.experts,
           "rank": args.rank, "top_k": args.top_k, "linears": {}, "gate_up_pair": {}}
    lines = ["| linear | T | base us | strided W0 | current (2 GEMMs) | concat | concat + copy of x |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t in (int(s) for s in args.tokens.split(",")):
        for name, (d, f) in shapes.items():
            row = one_linear(t, d, f, nr, top, gen, dev, dt)
            out["linears"].setdefault(name, {})[t] = row
            b = row["base"]
            lines.append(f"| {name} | {t} | {b:.1f} | x{row['base_strided_w0'] / b:.3f} | x{row['current'] / b:.3f} | "
                         f"x{row['concat'] / b:.3f} | x{row['concat_with_copy'] / b:.3f} |")
            print(lines[-1], f"err current {row['err_current']:.3g} concat {row['err_concat']:.3g}", flush=True)
        row = gate_up_pair(t, 4096, 14336, nr, top, gen, dev, dt)
        out["gate_up_pair"][t] = row
        b = row["base"]
        lines.append(f"| gate + up sharing [H_g, x, H_u] | {t} | {b:.1f} | | x{row['current'] / b:.3f} | "
                     f"x{row['concat'] / b:.3f} | x{row['concat_with_copy'] / b:.3f} |")
        print(lines[-1], flush=True)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "concat_k.json").write_text(json.dumps(out, indent=1))
    (path / "concat_k.md").write_text(f"{out['device']}, torch {out['torch']}, N = {args.experts}, r = {args.rank}, "
                                      f"top-{args.top_k}, bf16, CUDA-graph replay medians\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path}/concat_k.json, concat_k.md")


if __name__ == "__main__":
    main()
