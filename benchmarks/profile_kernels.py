"""Per-kernel CUDA times of one MeteoRA linear (ours) at a few shapes: where the time goes.

    python benchmarks/profile_kernels.py --tokens 1,4096 --shapes q:4096x4096,gate:4096x14336
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_fwd import Linear, make_inputs, parse_shapes, run_ours  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="q:4096x4096,gate:4096x14336,down:14336x4096")
    ap.add_argument("--tokens", default="1,4096")
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--backward", action="store_true", help="profile forward + backward")
    args = ap.parse_args(argv)
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
