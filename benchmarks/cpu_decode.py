"""Greedy decoding speed on the CPU: the embedded SmolLM2-135M alone and with MeteoRA experts.

    python benchmarks/cpu_decode.py                       # 4 random rank-8 adapters on all 7 linears
    python benchmarks/cpu_decode.py --adapters DIR        # the PEFT adapters in DIR's subfolders

Both sides decode the same prompt with the same number of new tokens through Hugging Face
`generate` (KV cache, eager); the best of --repeats runs is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meteora.adapters import TARGET_MODULES  # noqa: E402
from meteora.base import cache_dir, load_base_model  # noqa: E402
from meteora.demo import make_random_adapter  # noqa: E402
from meteora.model import from_adapters  # noqa: E402


def ms_per_token(model, ids, new_tokens: int, repeats: int, pad_id: int) -> float:
    def once() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad_id)
        return time.perf_counter() - started

    once()  # warm-up
    return min(once() for _ in range(repeats)) / new_tokens * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=Path, default=None, help="folder of PEFT adapter folders (default: random)")
    ap.add_argument("--experts", type=int, default=4, help="random adapters to make without --adapters")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok = load_base_model()
    if args.adapters is not None:
        paths = {p.name: p for p in sorted(args.adapters.iterdir()) if (p / "adapter_config.json").is_file()}
        if not paths:
            print(f"cpu_decode: --adapters {args.adapters}: no adapter_config.json in its subfolders", file=sys.stderr)
            return 2
    else:
        root = cache_dir() / "bench-adapters"
        paths = {}
        for i in range(args.experts):
            path = root / f"random_r{args.rank}_{i}"
            if not (path / "adapter_config.json").is_file():
                make_random_adapter(base, path, args.rank, 2 * args.rank, TARGET_MODULES, seed=i + 1)
            paths[path.name] = path
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three planets of the solar system."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    pad = tok.pad_token_id
    base_ms = ms_per_token(base, ids, args.new_tokens, args.repeats, pad)
    model = from_adapters(base, paths).eval()  # patches `base` in place
    ours_ms = ms_per_token(model, ids, args.new_tokens, args.repeats, pad)
    result = dict(threads=torch.get_num_threads(), adapters=len(paths), linears=len(model.meteora_layers()),
                  prompt_tokens=int(ids.shape[1]), new_tokens=args.new_tokens, base_ms_per_token=base_ms,
                  meteora_ms_per_token=ours_ms, ratio=ours_ms / base_ms)
    print(f"SmolLM2-135M on {result['threads']} CPU threads, {len(paths)} adapters in {result['linears']} linears: "
          f"base {base_ms:.1f} ms/token, meteora {ours_ms:.1f} ms/token ({ours_ms / base_ms:.2f}x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
