"""The paper's quality claims at small scale (issue 6): per-task adapters, one mixed-task LoRA, MeteoRA
gates, then MeteoRA vs oracle adapters vs base vs mixed LoRA, and composite-3 / composite-5.

    python benchmarks/quality.py pack --out .whl/cache        # here: converted BIG-bench rows, capped
    METEORA_CACHE=... python benchmarks/quality.py run --out runs/quality   # on the GPU box

``pack`` writes <out>/data/bigbench/<task>/{train,test}.jsonl for the tasks (from the local BIG-bench
cache), capped so that they travel to the GPU box with the model (a call carries 64 MiB). ``run``
chains the library's own commands (python -m meteora.train adapters / all, python -m meteora.eval)
and writes <out>/quality.md with the wall time of every stage and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meteora import data  # noqa: E402

# 16 offline tasks: the five of composite-3/5 first, then short-prompt tasks of the suite.
TASKS = ["logical_deduction", "question_selection", "strategyqa", "abstract_narrative_understanding",
         "goal_step_wikihow", "object_counting", "cs_algorithms", "winowhy", "unit_conversion",
         "elementary_math_qa", "epistemic_reasoning", "formal_fallacies_syllogisms_negation",
         "reasoning_about_colored_objects", "tracking_shuffled_objects", "disfl_qa", "language_identification"]


def pack(args) -> None:
    out = Path(args.out) / "data" / "bigbench"
    total = 0
    for name in args.tasks.split(","):
        task = data.bigbench_task(name)
        folder = out / name
        data.write_jsonl(folder / "test.jsonl", task.test[: args.test_rows])
        data.write_jsonl(folder / "train.jsonl", task.train[: args.train_rows])
        size = sum(f.stat().st_size for f in folder.iterdir())
        total += size
        print(f"{name:45s} {min(len(task.train), args.train_rows):6d} train {min(len(task.test), args.test_rows):5d} "
              f"test {size / 2**20:6.2f} MiB")
    print(f"total {total / 2**20:.1f} MiB in {out}")


def _timed(out: Path, stage: str, work, done_before: bool = False) -> None:
    """Run one stage and add its wall time to <out>/times.json (stages may run in separate calls;
    a stage whose results were already there keeps the time it took then)."""
    started = time.perf_counter()
    work()
    path = out / "times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    if not (done_before and stage in times):
        times[stage] = time.perf_counter() - started
    path.write_text(json.dumps(times, indent=2))
    print(f"quality: {stage} {times[stage]:.0f} s", flush=True)


TOKENIZER_FILES = ("tokenizer", "special_tokens", "added_tokens", "vocab", "merges", "chat_template")


def inst_base(base: str, folder: Path) -> str:
    """A base-model folder whose tokenizer has no chat template, so that meteora.train.format_prompt
    wraps every prompt as ``[INST] ... [/INST]``: 3 tokens before the question that every task
    shares, against the chat template's 8 (docs/results.md, reading 1). The weights are linked, not
    copied; the folder is made once (in a temporary folder, then renamed)."""
    from meteora.base import DEFAULT_MODEL, default_model_dir, load_tokenizer

    if not (folder / "config.json").is_file():
        source = Path(default_model_dir() if base == DEFAULT_MODEL else base)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in source.iterdir():
            if f.is_file() and not f.name.startswith(TOKENIZER_FILES):
                os.symlink(f.resolve(), tmp / f.name)
        tokenizer = load_tokenizer(base)
        tokenizer.chat_template = None
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    return str(folder.resolve())


def run(args) -> None:
    from meteora import eval as meteora_eval
    from meteora import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = out / "adapters"
    tasks = args.tasks.split(",")
    base = inst_base(args.base, out / "base_inst") if args.prompt_format == "inst" else args.base
    data_dir = ["--data-dir", args.data_dir] if args.data_dir else []
    common = ["--base", base, "--adapters-dir", str(adapters), "--max-length", str(args.max_length),
              "--batch-size", str(args.batch_size), "--seed", str(args.seed), *data_dir]
    rows = ["--rows-per-task", str(args.rows_per_task)]
    joint = ["--joint-adapters"] if args.joint_adapters else []

    # Adapter folders that exist are kept (train skips them): a second call goes on from here.
    _timed(out, "per-task adapters", lambda: train.main(
        ["adapters", "--tasks", ",".join(tasks), "--adapter-steps", str(args.adapter_steps), *common, *rows, *joint]),
        done_before=all((adapters / t).is_dir() for t in tasks))
    # As many rows as all per-task adapters together: adapter steps x tasks x batch size. With
    # --train-loras MeteoRA's LoRAs also learn from the gate stage's rows (steps x batch size, its
    # composite rows among them): the mixed LoRA ("mixed_matched") gets the same rows on top.
    mixed_batch = args.mixed_batch_size or args.batch_size
    mixed_rows = args.adapter_steps * len(tasks) * args.batch_size + (args.steps * args.batch_size if args.train_loras else 0)
    mixed_steps = args.mixed_steps or max(1, mixed_rows // mixed_batch)
    mixed = [*common, "--batch-size", str(mixed_batch),  # the later --batch-size wins
             *(["--composite-rows", str(args.composite_rows)] if args.train_loras else [])]
    mixed_name = "mixed_matched" if args.train_loras else "mixed"
    if not args.no_mixed:
        _timed(out, "mixed-task LoRA", lambda: train.main(
            ["adapters", "--tasks", f"{mixed_name}=" + "+".join(tasks), "--adapter-steps", str(mixed_steps),
             "--rows-per-task", str(args.rows_per_task * len(tasks)), *mixed]),
            done_before=(adapters / mixed_name).is_dir())
    if args.stop_after == "adapters":
        return

    ckpt = out / "meteora"  # a checkpoint with its report is kept (a third call evaluates it)
    # The per-task oracle: the checkpoint's experts forced, or after --train-loras the adapters they came from.
    oracle = ["--baseline", f"adapter={adapters}" if args.train_loras else "adapter"]
    mixed_baseline = [] if args.no_mixed else ["--baseline", f"mixed={adapters / mixed_name}"]
    gates_done = (ckpt / "report.json").is_file()
    _timed(out, "gates (+ gate accuracy)", lambda: None if gates_done else train.main(
        ["all", "--tasks", ",".join(tasks), "--out", str(ckpt), "--steps", str(args.steps), "--lr", str(args.lr),
         "--eval-rows", str(args.limit), "--composite-rows", str(args.composite_rows), *common, *rows,
         *(["--train-loras", "--lora-lr", str(args.lora_lr)] if args.train_loras else ["--no-train-loras"]),
         "--local-gate-loss" if args.local_gate_loss else "--no-local-gate-loss"]),  # this flow's own defaults
        done_before=gates_done)
    if args.stop_after == "gates":
        return
    composite = ",".join(c for c in args.composite.split(",")  # composite-n whose tasks are all here
                         if c == "own" or (c and all(t in tasks for t in data.composite_task_names(int(c)))))
    evaluation = ["--model", str(ckpt), "--limit", str(args.limit), "--composite", composite,
                  "--composite-samples", str(args.composite_samples), "--composite-decoding", args.composite_decoding,
                  *data_dir]

    def evaluated(name: str, argv: list[str], folder: str) -> None:  # once: a later call keeps what is there
        done = (out / folder / "summary.json").is_file()
        _timed(out, name, lambda: None if done else meteora_eval.main([*evaluation, "--out", str(out / folder), *argv]),
               done_before=done)

    if not args.skip_eval:
        evaluated("evaluation", [*oracle, "--baseline", "base", *mixed_baseline], "eval")
    if composite and not args.skip_eval and not (out / "eval" / "routing.png").is_file():
        _timed(out, "routing picture", lambda: meteora_eval.main(
            ["--model", str(ckpt), "--out", str(out / "eval"), "--show-composite", composite.split(",")[0],
             "--composite-samples", "1", *data_dir]))
    if args.stop_after == "eval":
        return
    if args.matched_oracle:  # per-task adapters that saw as many of their task's rows as MeteoRA's experts did
        matched = out / "adapters_matched"
        extra = -(-args.steps // len(tasks))  # the gate stage's rows, one task's share, in adapter steps
        _timed(out, "matched per-task adapters", lambda: train.main(
            ["adapters", "--tasks", ",".join(tasks), "--adapter-steps", str(args.adapter_steps + extra), *common,
             "--adapters-dir", str(matched), *rows, *joint]),
            done_before=all((matched / t).is_dir() for t in tasks))
        evaluated("evaluation, matched oracle", ["--composite", "", "--baseline", f"adapter={matched}"], "eval_matched")
    for k in args.also_top_k:  # the same checkpoint with other routing, MeteoRA only
        evaluated(f"evaluation, top-{k}", ["--top-k", str(k), "--baseline", "none"], f"eval_top{k}")
    chosen = None
    if args.select_top_k:  # MeteoRA's k chosen on held-out test rows, then evaluated on the test rows
        held_out = ["--baseline", "none", "--composite", "", "--offset", str(args.limit), "--limit", str(args.select_rows)]
        means = {}
        for k in args.select_top_k:
            evaluated(f"selection, top-{k}", ["--top-k", str(k), *held_out], f"select_top{k}")
            means[k] = meteora_eval.mean_scores(json.loads((out / f"select_top{k}" / "summary.json").read_text()))["meteora"]
        chosen = max(means, key=lambda k: (means[k], -k))  # a tie goes to fewer experts per token
        (out / "selection.json").write_text(json.dumps({"held_out_rows": [args.limit, args.limit + args.select_rows],
                                                         "mean_by_top_k": means, "chosen": chosen}, indent=2))
        evaluated(f"evaluation, top-{chosen}", ["--top-k", str(chosen), "--baseline", "none"], f"eval_top{chosen}")
    windowed = [] if args.vote_window is None else ["--baseline", f"prompt-vote={args.vote_window}"]
    if args.prompt_vote:  # MeteoRA whose gates first vote one adapter per prompt (MeteoRAModel.vote_prompts)
        evaluated("evaluation, prompt vote", ["--baseline", "prompt-vote", *windowed], "eval_vote")
    if args.composite_check:  # composite-n alone, at TASKS.md's sample count, numbered decoding
        systems = [*(["--baseline", "none"] if args.composite_lean else oracle),  # adapter: each answer line on its own
                   *([] if args.composite_no_base else ["--baseline", "base"]), *mixed_baseline,
                   *(["--baseline", "prompt-vote"] if args.prompt_vote else []), *windowed]
        evaluated(f"composite-n, {args.composite_check} prompts",
                  ["--limit", "0", "--composite-samples", str(args.composite_check), "--composite-decoding", "numbered",
                   *([] if args.composite_lean else ["--line-vote", "--segment-oracle"]),
                   "--batch-size", str(args.composite_batch_size), *systems], "eval_composite")
    if args.ablate_routing:  # the task's adapter on the prompt / on the answer, the gates on the rest
        evaluated("evaluation, routing ablation", ["--composite", "", "--baseline", "adapter",
                                                   "--baseline", "prompt-adapter", "--baseline", "answer-adapter"],
                  "eval_phase")

    times = json.loads((out / "times.json").read_text())
    report = json.loads((ckpt / "report.json").read_text())
    lines = ["# MeteoRA quality at small scale", "", f"Command: `python benchmarks/quality.py run {' '.join(sys.argv[2:])}`",
             "", "| stage | wall time |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} s |" for k, v in times.items()]
    lines += ["", "Gate accuracy on test rows (top-1 of every gate = the task's adapter), over all tokens, over "
              "the positions that generate the answer and over the chat template's tokens before the question "
              f"(the same for every task: chance is 1/{len(tasks)}):", "",
              "| task | all tokens | answer | template |", "|---|---:|---:|---:|"]
    answer, head = report.get("gate_accuracy_answer", {}), report.get("gate_accuracy_template", {})
    pct = lambda d, k: f"{d[k]:.1%}" if k in d else "-"  # noqa: E731
    lines += [f"| {k} | {v:.1%} | {pct(answer, k)} | {pct(head, k)} |" for k, v in report["gate_accuracy"].items()]
    if (out / "eval" / "results.md").is_file():
        lines += ["", (out / "eval" / "results.md").read_text()]
    for k in args.also_top_k:
        lines += ["", f"## MeteoRA with top-{k} routing (the same checkpoint)", "",
                  (out / f"eval_top{k}" / "results.md").read_text()]
    if chosen is not None:
        selection = json.loads((out / "selection.json").read_text())
        first, last = selection["held_out_rows"]
        lines += ["", f"## MeteoRA's top-k chosen on held-out test rows {first + 1}-{last} of each task", "",
                  "| top-k | mean on the held-out rows |", "|---:|---:|"]
        lines += [f"| {k}{' (chosen)' if int(k) == chosen else ''} | {v:.3f} |" for k, v in selection["mean_by_top_k"].items()]
        if chosen not in args.also_top_k:
            lines += ["", f"On the test rows (the same checkpoint, top-{chosen}):", "",
                      (out / f"eval_top{chosen}" / "results.md").read_text()]
    if args.matched_oracle:
        lines += ["", "## MeteoRA against per-task adapters trained on as many of their task's rows as its experts saw "
                  "(adapters_matched/: the adapter steps plus one task's share of the gate stage's rows)", "",
                  (out / "eval_matched" / "results.md").read_text()]
    if args.prompt_vote:
        lines += ["", "## MeteoRA with the prompt's adapter voted by its gates (prompt-vote: one forward over the prompt, "
                  "each row's prompt then on the adapter its gates picked first most often; the gates route the "
                  "generated tokens; no task label)", "", (out / "eval_vote" / "results.md").read_text()]
    if args.composite_check:
        lines += ["", f"## Composite-n on {args.composite_check} prompts (numbered decoding; paired bootstrap over "
                  "the prompts)", "", (out / "eval_composite" / "results.md").read_text()]
    if args.ablate_routing:
        lines += ["", "## Routing ablation: the task's adapter on the prompt (prompt-adapter) or on the generated "
                  "tokens (answer-adapter), the gates on the rest", "", (out / "eval_phase" / "results.md").read_text()]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="capped converted task rows to carry to the GPU box")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--train-rows", type=int, default=600)
    p.add_argument("--test-rows", type=int, default=100)
    p = sub.add_parser("run", help="adapters, mixed LoRA, gates, evaluation")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--data-dir")
    p.add_argument("--base", default="smollm2")
    p.add_argument("--adapter-steps", type=int, default=60)
    p.add_argument("--mixed-steps", type=int, default=0,
                   help="default: as many rows as the per-task adapters together (adapter steps x tasks x batch size "
                        "/ mixed batch size)")
    p.add_argument("--mixed-batch-size", type=int, default=0, help="rows per step of the mixed LoRA (default: --batch-size)")
    p.add_argument("--no-mixed", action="store_true",
                   help="leave out the mixed-task LoRA (a gate experiment that evaluates MeteoRA only)")
    p.add_argument("--joint-adapters", action="store_true",
                   help="train the per-task adapters side by side in one model (meteora.train --joint-adapters)")
    p.add_argument("--steps", type=int, default=100, help="gate training steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--composite-rows", type=int, default=0, help="composite rows in the gate data (meteora.train)")
    p.add_argument("--train-loras", action="store_true",
                   help="train MeteoRA's LoRA experts with the gates (meteora.train --train-loras, the authors' "
                        "script); the oracle is then the per-task adapters as trained, and the mixed LoRA "
                        "(adapters/mixed_matched) learns from the gate stage's rows too, composite rows included")
    p.add_argument("--local-gate-loss", action="store_true",
                   help="the gate cross-entropy trains each gate alone (meteora.train --local-gate-loss): with "
                        "--train-loras the experts learn from the LM loss only")
    p.add_argument("--lora-lr", type=float, default=5e-4,
                   help="the LoRA experts' learning rate with --train-loras (the authors' script: 5e-4)")
    p.add_argument("--seed", type=int, default=0,
                   help="meteora.train's seed for every training (adapters, mixed LoRA, gates): the flow is "
                        "deterministic on one machine, so another training of it needs another seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows-per-task", type=int, default=600)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--limit", type=int, default=64, help="test rows per task in the evaluation")
    p.add_argument("--composite", default="3,5")
    p.add_argument("--composite-samples", type=int, default=64)
    p.add_argument("--composite-decoding", default="numbered,free")
    p.add_argument("--also-top-k", type=lambda v: [int(k) for k in v.split(",") if k], default=[],
                   help="comma list of k: evaluate MeteoRA again with top-k routing (eval_top<k>/)")
    p.add_argument("--prompt-format", choices=["chat", "inst"], default="chat",
                   help="chat: the base model's chat template (8 tokens before every question for SmolLM2); inst: "
                        "[INST] ... [/INST] (3), through a base folder whose tokenizer has no template (<out>/base_inst)")
    p.add_argument("--skip-eval", action="store_true",
                   help="leave out the main evaluation (four systems, composite-n) and its routing picture: for a "
                        "rerun that only adds --also-top-k / --ablate-routing to results already published")
    p.add_argument("--select-top-k", type=lambda v: [int(k) for k in v.split(",") if k], default=[],
                   help="comma list of k: choose MeteoRA's top-k among these on held-out test rows (the --select-rows "
                        "after the first --limit of each task), then evaluate the chosen k on the test rows (eval_top<k>/)")
    p.add_argument("--select-rows", type=int, default=36, help="held-out test rows per task for --select-top-k")
    p.add_argument("--prompt-vote", action="store_true",
                   help="evaluate MeteoRA with MeteoRAModel.vote_prompts beside MeteoRA itself (eval_vote/): the "
                        "gates vote one adapter for each whole prompt, the generated tokens are routed as usual")
    p.add_argument("--vote-window", type=int, help="with --prompt-vote or --composite-check: also vote each prompt "
                   "token's adapter among the W tokens before and after it (a composite prompt keeps its switches)")
    p.add_argument("--composite-check", type=int, default=0, metavar="N",
                   help="evaluate composite-n (--composite) alone on N prompts (TASKS.md: 200), numbered decoding: "
                        "MeteoRA, MeteoRA under --line-vote, each line on its own adapter, every token on its segment's "
                        "adapter (--segment-oracle), base, the mixed LoRA and, with "
                        "--prompt-vote / --vote-window, the vote "
                        "(eval_composite/, with the paired bootstrap of every sum)")
    p.add_argument("--composite-no-base", action="store_true",
                   help="leave the base model out of --composite-check (its sums are published; fits the call)")
    p.add_argument("--composite-lean", action="store_true",
                   help="--composite-check with MeteoRA and the mixed LoRA (and base) only: no per-line adapter, "
                        "line-vote or segment oracle (about half the time)")
    p.add_argument("--matched-oracle", action="store_true",
                   help="with --train-loras: also train per-task adapters for --adapter-steps plus one task's share "
                        "of the gate stage's steps (adapters_matched/) and evaluate MeteoRA against them "
                        "(eval_matched/): an oracle that saw as many rows as MeteoRA's experts")
    p.add_argument("--composite-batch-size", type=int, default=40, help="prompts per generation batch in --composite-check")
    p.add_argument("--ablate-routing", action="store_true",
                   help="evaluate MeteoRA against its adapters forced on the prompt only / the answer only "
                        "(eval_phase/: where the gap to the adapters comes from)")
    p.add_argument("--stop-after", choices=["adapters", "gates", "eval", "all"], default="all",
                   help="adapters: train the per-task and mixed adapters only; gates: and the gates; eval: and the "
                        "main evaluation (a later call goes on from what is there)")
    args = parser.parse_args()
    if args.command == "run" and args.matched_oracle and not args.train_loras:
        parser.error("--matched-oracle needs --train-loras (without it MeteoRA's experts are the adapters as trained)")
    pack(args) if args.command == "pack" else run(args)


if __name__ == "__main__":
    main()
