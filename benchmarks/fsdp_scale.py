"""Gate training on 1..G GPUs with FSDP2 (issue 8): per-GPU peak memory and step time, the checkpoint
written on G processes loaded in one, and a kill -9 of one rank resumed.

    python benchmarks/fsdp_scale.py make --out runs/fsdp            # random LLaMA (1.1B by default),
                                                                     # 28 random rank-8 adapters, 28 tasks
    python benchmarks/fsdp_scale.py run --dir runs/fsdp --gpus 1,2   # torchrun per G, then load + kill tests

The base weights, adapters and task rows are random (speed and memory do not depend on the values);
the tokenizer is SmolLM2's (``--tokenizer``: a folder; default the embedded model's). Results go to
<dir>/fsdp.json and <dir>/fsdp.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make(args) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    from meteora import data
    from meteora.base import default_model_dir

    out = Path(args.out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or default_model_dir())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                                      tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    shapes = {name: (mod.in_features, mod.out_features) for name, mod in model.model.layers[0].named_modules()
              if name.rsplit(".", 1)[-1] in LINEARS}
    del model
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    for a in range(args.adapters):
        folder = out / "adapters" / f"task{a:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for layer in range(args.layers):
            for name, (d_in, d_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{name}"
                state[f"{key}.lora_A.weight"] = (torch.randn(args.rank, d_in, generator=gen) / d_in ** 0.5).to(torch.bfloat16)
                state[f"{key}.lora_B.weight"] = (torch.randn(d_out, args.rank, generator=gen) * 0.01).to(torch.bfloat16)
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(LINEARS), "task_type": "CAUSAL_LM"}))
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(40)]
        rows = [{"prompt": f"task {a}: " + " ".join(rng.choices(words, k=args.prompt_words)),
                 "response": " ".join(rng.choices(words, k=args.response_words))} for _ in range(args.rows)]
        data.write_jsonl(out / "tasks" / f"task{a:02d}" / "train.jsonl", rows[: -args.rows // 10])
        data.write_jsonl(out / "tasks" / f"task{a:02d}" / "test.jsonl", rows[-args.rows // 10:])
    info = {"parameters": params, "config": config.to_dict(), "adapters": args.adapters, "rank": args.rank}
    (out / "made.json").write_text(json.dumps(info, indent=2, default=str))
    print(f"base: {params / 1e9:.2f} B parameters, {args.adapters} adapters of rank {args.rank} -> {out}")


def _cmd(args, gpus: int, out: Path, steps: int, *extra) -> list[str]:
    root = Path(args.dir)
    names = sorted(p.name for p in (root / "adapters").iterdir())
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "meteora.train", "gates", "--base", str(root / "base"), "--data-dir", str(root / "tasks"),
            "--tasks", ",".join(names), *[f"--adapter={n}={root / 'adapters' / n}" for n in names],
            "--out", str(out), "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--device", args.device, "--quiet", "--lr", "1e-3",
            *(["--grad-checkpointing"] if args.grad_checkpointing else []), *(["--dtype", args.dtype]), *extra]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(args) -> None:
    root = Path(args.dir)
    results = {"runs": {}, "device": args.device}
    for gpus in [int(g) for g in args.gpus.split(",")]:
        out = root / f"run_g{gpus}"
        started = time.perf_counter()
        done = subprocess.run(_cmd(args, gpus, out, args.steps, "--checkpoint-every", "0"), env=_env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:])
            raise SystemExit(f"fsdp_scale: the {gpus}-process run failed")
        log = _log(out)
        timed = [h["seconds"] for h in log[args.warmup:]] or [h["seconds"] for h in log]
        results["runs"][gpus] = {"wall_s": round(time.perf_counter() - started, 1),
                                 "step_s_median": statistics.median(timed),
                                 "peak_gib": max((h.get("peak_gib", 0.0) for h in log), default=0.0),
                                 "rows_per_step": args.batch_size * gpus, "last": log[-1]}
        print(f"G={gpus}: {results['runs'][gpus]}", flush=True)
    # The checkpoint written by the most processes loads in this one.
    import meteora

    most = max(int(g) for g in args.gpus.split(","))
    model = meteora.load(root / f"run_g{most}", base_model=meteora.load_base_model(root / "base")[0])
    results["loads_in_one_process"] = {"from": most, "adapters": len(model.adapter_names)}
    del model
    if most >= 2:
        results["kill"] = kill_test(args, most)
    (root / "fsdp.json").write_text(json.dumps(results, indent=2))
    lines = [f"FSDP2 gate training, {args.device}, batch {args.batch_size} rows x {args.max_length} tokens per "
             f"process, {args.dtype}, grad checkpointing {args.grad_checkpointing}", "",
             "| processes | step (median) | peak memory per process | wall |", "|---:|---:|---:|---:|"]
    for g, r in results["runs"].items():
        lines.append(f"| {g} | {r['step_s_median']:.3f} s | {r['peak_gib']:.2f} GiB | {r['wall_s']:.0f} s |")
    if "kill" in results:
        k = results["kill"]
        lines += ["", f"kill -9 of rank 1 at step {k['killed_after']}, resumed from step {k['resumed_from']}: "
                  f"final loss {k['resumed_final']:.4f} vs {k['reference_final']:.4f} uninterrupted"]
    (root / "fsdp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def kill_test(args, gpus: int) -> dict:
    """Run with checkpoints, kill -9 the rank-1 worker mid-run, resume; compare with an uninterrupted run."""
    root = Path(args.dir)
    steps = args.kill_steps
    reference = root / "kill_reference"
    subprocess.run(_cmd(args, gpus, reference, steps, "--checkpoint-every", "4"), env=_env(), check=True,
                   capture_output=True)
    cut = root / "kill_cut"
    proc = subprocess.Popen(_cmd(args, gpus, cut, steps, "--checkpoint-every", "4"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = cut / "train_log.jsonl"
    while proc.poll() is None and not (log_file.is_file() and len(log_file.read_text().splitlines()) >= 6):
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, rank=1)
    killed_after = len(log_file.read_text().splitlines())
    os.kill(victim, signal.SIGKILL)
    proc.wait()
    import torch

    resumed_from = torch.load(cut / "checkpoint" / "train_state.pt", weights_only=False)["step"]
    subprocess.run(_cmd(args, gpus, cut, steps, "--checkpoint-every", "4", "--resume"), env=_env(), check=True,
                   capture_output=True)
    a, b = _log(reference), _log(cut)
    return {"killed_after": killed_after, "resumed_from": resumed_from, "torchrun_exit": proc.returncode,
            "reference_final": a[-1]["loss"], "resumed_final": b[-1]["loss"],
            "max_rel_diff": max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)),
            "steps": len(b)}


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"meteora.train" in cmdline and f"RANK={rank}".encode() in env and b"LOCAL_RANK" in b"".join(env):
            return int(entry.name)
    raise RuntimeError(f"no worker with RANK={rank} under torchrun {parent}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded SmolLM2's)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--adapters", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--response-words", type=int, default=40)
    p = sub.add_parser("run")
    p.add_argument("--dir", required=True)
    p.add_argument("--gpus", default="1,2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--kill-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args()
    make(args) if args.command == "make" else run(args)


if __name__ == "__main__":
    main()
