"""``python -m meteora.eval``: score a MeteoRA checkpoint on its tasks (and composite-n), against the
per-task adapters (oracle), the base model and a mixed-task LoRA; draw the routing.

    python -m meteora.eval                                   # runs/default on its own tasks
    python -m meteora.eval --model CKPT --tasks a,b --baseline adapter --baseline base
    python -m meteora.eval --model CKPT --baseline mixed=DIR --composite 3
    python -m meteora.eval --model CKPT --show "Q: How many legs do 3 cats have?"
    python -m meteora.eval --rescore CKPT/eval              # the composite intervals again, from samples

Writes, in --out (default CKPT/eval): samples.jsonl (every generation), summary.json, results.md
(task x system, with means; composite-n per sub-task and their sum), and with --show routing.html,
routing.png and usage.png.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import data as data_mod
from . import metrics, viz
from ._files import atomic_write as _atomic_write
from .model import CheckpointError, LabelHook, MeteoRAModel, PrefillHook, PromptVote, load
from .train import (RUN_NAME, collate, composite_spans, composite_tokens, encode_composite, experts_trained, format_prompt,
                    read_run, span_labels, stop_tokens)

log = logging.getLogger("meteora")

# Long-answer tasks get more new tokens.
LONG_METRICS = ("bleu", "bleu_rouge", "strategyqa")


def max_new_tokens(task: str, args) -> int:
    return args.max_new_tokens_long if data_mod.TASK_METRICS.get(task) in LONG_METRICS else args.max_new_tokens


@contextlib.contextmanager
def _left_padding(tokenizer):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _greedy(model, tokenizer, texts: Sequence[str], new_tokens: int, stop: list[int], device) -> list[str]:
    """One batch of already formatted texts (left-padded): the decoded new tokens of each."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], new_tokens: int, batch_size: int,
             device: torch.device, progress=None) -> list[str]:
    """Greedy generation, batched with left padding; the decoded new tokens of every prompt."""
    stop = stop_tokens(model, tokenizer)
    outputs = []
    with _left_padding(tokenizer):
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            outputs += _greedy(model, tokenizer, texts, new_tokens, stop, device)
            if progress is not None:
                progress.update(len(texts))
    return [o.strip() for o in outputs]


@torch.no_grad()
def generate_numbered(model, tokenizer, prompts: Sequence[str], tokens_per_answer: Sequence[int], batch_size: int,
                      device: torch.device, progress=None, before_line=None,
                      line_adapters: Sequence[Sequence[int]] | None = None,
                      segments: "Segments | None" = None) -> list[str]:
    """Composite-n answers in one growing generation, with the harness writing the numbers: the
    reply opens with ``1.``, the model's answer (its leading space included, as the training rows
    tokenize it) runs to its first line end (or stop token), then ``\n2.`` is appended and the model
    goes on from everything so far, and so on for every
    sub-question. Every system gets the same markers, so the model must still route (switch
    adapters) from the context alone; without them a small model trained on single questions
    answers once and stops. ``before_line(i)``, if given, is called before the i-th answers are
    generated (1-based; e.g. to force the i-th sub-task's adapter); ``line_adapters[p][i - 1]``, if
    given, is the adapter forced for prompt p's i-th line (-1: the gates route it), the prompts of a
    batch that share one generated together; ``segments``, if given, routes every token by its
    segment (``Segments``). Returns ``1. a\n2. b...`` per prompt."""
    stop = stop_tokens(model, tokenizer)
    replies = []
    with _left_padding(tokenizer):
        for start in range(0, len(prompts), batch_size):
            heads = [format_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            done = [""] * len(heads)
            for i, new_tokens in enumerate(tokens_per_answer, 1):
                if before_line is not None:
                    before_line(i)
                # "i." without the space: the model writes " answer" as in training ("1. The" is "1", ".",
                # " The"; a prompt that ends in a space leaves a lone " " token no training row has).
                texts = [h + d + f"{i}." for h, d in zip(heads, done)]
                if segments is not None:
                    with segments.routing(model, tokenizer, texts, heads, start, i):
                        answers = _greedy(model, tokenizer, texts, new_tokens, stop, device)
                elif line_adapters is None:
                    answers = _greedy(model, tokenizer, texts, new_tokens, stop, device)
                else:
                    answers = [""] * len(texts)
                    chosen = [int(line_adapters[start + j][i - 1]) for j in range(len(texts))]
                    for adapter in sorted(set(chosen)):
                        which = [j for j, c in enumerate(chosen) if c == adapter]
                        model.force_adapter(None if adapter < 0 else adapter)
                        try:
                            got = _greedy(model, tokenizer, [texts[j] for j in which], new_tokens, stop, device)
                        finally:
                            model.force_adapter(None)
                        for j, answer in zip(which, got):
                            answers[j] = answer
                done = [d + f"{i}. " + _first_line(a) + "\n" for d, a in zip(done, answers)]
            replies += [d.rstrip("\n") for d in done]
            if progress is not None:
                progress.update(len(heads))
    return replies


class Segments:
    """Every token of a numbered composite generation on its own segment's adapter (``--segment-oracle``;
    task labels used): sub-question j's tokens and answer line j's (its number included) on sub-task
    j's adapter, the rest of the context (instructions, few-shot prefix, chat template) and the line
    being generated on the current line's. Perfect token-level routing at the granularity of the
    segments, which the per-line oracle (one adapter for each line's whole forward) is not.
    ``spans[p]``: prompt p's (start, end, adapter) question spans in its formatted prompt
    (``train.composite_spans``); ``line_adapters[i - 1]``: line i's adapter."""

    def __init__(self, spans: Sequence[Sequence[tuple[int, int, int]]], line_adapters: Sequence[int]):
        self.spans, self.line_adapters = spans, list(line_adapters)

    def labels(self, tokenizer, text: str, head: str, spans: Sequence[tuple[int, int, int]], line: int) -> list[int]:
        """Each token's adapter in ``text`` (``head``, the formatted prompt, then the numbered lines so
        far and ``"{line}."``), from its first character's segment."""
        lines, at = [], len(head)  # the numbered lines so far: line j to its line end, on line j's adapter
        for j, piece in enumerate(text[len(head):].split("\n")[:-1]):
            lines.append((at, at + len(piece) + 1, self.line_adapters[j]))
            at += len(piece) + 1
        return [label for _, _, label in span_labels(tokenizer, text, [*spans, *lines], self.line_adapters[line - 1])]

    @contextlib.contextmanager
    def routing(self, model: MeteoRAModel, tokenizer, texts: Sequence[str], heads: Sequence[str], first: int, line: int):
        """While the block runs: the prefill of ``texts`` (left-padded, prompts ``first`` on) by the
        tokens' segments, every decode step on line ``line``'s adapter."""
        rows = [self.labels(tokenizer, t, h, self.spans[first + j], line) for j, (t, h) in enumerate(zip(texts, heads))]
        width = max(map(len, rows))
        prefill = torch.tensor([[-1] * (width - len(r)) + r for r in rows])
        hook = _LabelHook(model, prefill, self.line_adapters[line - 1])
        hook.install()
        try:
            yield
        finally:
            hook.release()


class _LabelHook(LabelHook):
    """Route the forward over ``prefill``'s width by its labels, every one-token forward to ``decode``."""

    def __init__(self, model: MeteoRAModel, prefill: torch.Tensor, decode: int):
        super().__init__(model)
        self.prefill, self.decode = prefill, decode

    def _pre(self, module, args, kwargs):
        ids = self.input_ids(args, kwargs)
        if ids.shape[1] == 1:
            self._route(torch.full_like(ids, self.decode))
        elif ids.shape == self.prefill.shape:
            self._route(self.prefill.to(ids.device))
        else:
            raise RuntimeError(f"meteora: segment routing expected a prefill of {tuple(self.prefill.shape)} tokens "
                               f"or one-token steps, got input_ids {tuple(ids.shape)}")


def segments_for(model: MeteoRAModel, tokenizer, tasks, rows: Sequence[dict]) -> Segments:
    """``Segments`` of composite rows whose sub-tasks are ``tasks`` (in line order)."""
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError("--segment-oracle needs a fast tokenizer (character offsets of the tokens); "
                              f"{type(tokenizer).__name__} is not one")
    index = {name: model.adapter_index(name) for name in model.adapter_names}
    return Segments([composite_spans(r, index, format_prompt(tokenizer, r["prompt"])) for r in rows],
                    [index[t.name] for t in tasks])


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


class System:
    """One way of answering: the MeteoRA model, one task's own adapter, the base, a mixed LoRA.

    ``force(task)`` (None: the system routes by itself) sets the model up for one task's rows and
    ``release()`` undoes it; systems that use the task's label (``labelled``) skip the composite
    prompts, which mix tasks, except with numbered decoding when they can take a label per answer
    line (``per_line``: each line's whole forward, prompt and earlier lines included, forced to its
    own sub-task: what routing could reach at best when it picks one adapter per answer line)."""

    def __init__(self, name: str, model, force=None, release=None, labelled: bool | None = None,
                 per_line: bool = False):
        self.name, self.model, self.force, self._release = name, model, force, release
        self.labelled = force is not None if labelled is None else labelled
        self.per_line = per_line

    def prepare(self, task: str) -> None:
        if self.force is not None:
            self.force(task)

    def release(self) -> None:
        if self._release is not None:
            self._release()


class PhaseForce(PrefillHook):
    """The task's own adapter in one phase of a generation, the gates in the other (a routing
    ablation): ``phase="prompt"`` forces the forwards over more than one token (the prompt's
    prefill) and lets the gates route the one-token decode steps; ``phase="answer"`` the reverse.
    Together with the oracle and MeteoRA itself they split MeteoRA's gap to its adapters into what
    the prompt's routing costs (the hidden states every answer token attends to) and what the
    answer's routing costs."""

    def __init__(self, model: MeteoRAModel, phase: str):
        if phase not in ("prompt", "answer"):
            raise ValueError(f"phase must be prompt or answer, not {phase!r}")
        super().__init__(model)
        self.phase, self.task = phase, None

    def _pre(self, module, args, kwargs):
        ids = self.input_ids(args, kwargs)
        prefill = ids is not None and ids.shape[1] > 1
        self.model.force_adapter(self.task if prefill == (self.phase == "prompt") else None)

    def force(self, task: str) -> None:
        self.task = task
        self.install()

    def release(self) -> None:
        super().release()
        self.task = None
        self.model.force_adapter(None)


def per_task_adapters(paths: dict[str, Path], where: str, model: MeteoRAModel, fresh_base) -> MeteoRAModel:
    """The PEFT adapters ``paths`` ({task: folder}) of the checkpoint's tasks, embedded as experts of
    a fresh base model (to be forced one at a time): the per-task oracle of a checkpoint whose experts
    were trained further (``meteora.train --train-loras``). ``where`` names their origin in the error."""
    from .model import from_adapters

    folders = {n: Path(paths[n]) for n in model.adapter_names if n in paths}
    missing = [n for n in model.adapter_names if n not in folders or not (folders[n] / "adapter_config.json").is_file()]
    if missing:
        raise CheckpointError(f"{where}: no PEFT adapter folder for {', '.join(missing)}")
    return from_adapters(fresh_base(), folders, top_k=1).eval()


def trained_experts_sources(ckpt) -> dict | None:
    """{task: PEFT folder} the checkpoint's experts started from, when its train_run.json says that
    they were trained further (``--train-loras``); None for a gates-only checkpoint (its experts
    are the adapters, so forcing one is the oracle) or one without train_run.json."""
    run = read_run(ckpt)
    return dict(run.get("adapters") or {}) if experts_trained(run) else None


def build_systems(args, model: MeteoRAModel, tokenizer, device) -> list[System]:
    from .base import load_base_model

    def fresh_base():  # the checkpoint's base model again, in its dtype, without MeteoRA
        return load_base_model(model.base_model_id, dtype=next(model.parameters()).dtype, device=device)[0].eval()

    def forced(name: str, experts: MeteoRAModel) -> System:  # one expert of ``experts`` at a time: the row's task's
        return System(name, experts, force=experts.force_adapter, release=lambda: experts.force_adapter(None),
                      per_line=True)

    systems = [System("meteora", model)]
    specs = ["adapter", "base"] if args.baseline is None else [b for b in args.baseline if b != "none"]
    for spec in specs:
        kind, _, path = spec.partition("=")
        if kind == "adapter":  # each task's own adapter alone: MeteoRA with every other expert masked
            if path:
                experts = per_task_adapters({n: Path(path) / n for n in model.adapter_names},
                                            f"--baseline adapter={path}", model, fresh_base)
            # the experts moved (--train-loras): the oracle is what they started from
            elif (sources := trained_experts_sources(args.model)) is not None:
                log.info("adapter: the checkpoint's experts were trained (--train-loras); the oracle is the "
                         "adapters they started from (train_run.json; --baseline adapter=DIR for others)")
                experts = per_task_adapters(sources, f"adapter: the checkpoint's experts were trained (--train-loras) "
                                            f"and the adapters its {RUN_NAME} names are gone (give --baseline "
                                            "adapter=DIR or experts)", model, fresh_base)
            else:
                experts = model
            systems.append(forced("adapter", experts))
        elif kind == "experts":  # the checkpoint's own experts, forced one at a time (after --train-loras: as trained)
            systems.append(forced("experts", model))
        elif kind in ("prompt-adapter", "answer-adapter"):  # the adapter in one phase, the gates in the other
            phase = PhaseForce(model, kind.partition("-")[0])
            systems.append(System(kind, model, force=phase.force, release=phase.release))
        elif kind == "prompt-vote":  # the gates vote the prompt's adapter (no label): row-wide, or =W tokens around
            try:
                window = int(path) if path else None
                vote = PromptVote(model, window)
            except ValueError:
                raise CheckpointError(f"--baseline {spec!r}: prompt-vote=W takes a window of W >= 0 tokens") from None
            systems.append(System(kind if window is None else f"prompt-vote({window})", model, force=vote.install,
                                  release=vote.release, labelled=False))
        elif kind == "base":
            systems.append(System("base", fresh_base()))
        elif kind == "mixed":
            if not path:
                raise CheckpointError("--baseline mixed=DIR needs the folder of a PEFT adapter trained on the task mix")
            from peft import PeftModel

            systems.append(System("mixed", PeftModel.from_pretrained(fresh_base(), path).eval()))
        else:
            raise CheckpointError(f"--baseline {spec!r}: expected adapter[=DIR], experts, base, mixed=DIR, prompt-adapter, "
                                  "answer-adapter or prompt-vote[=W]")
        if [s.name for s in systems].count(systems[-1].name) > 1:
            raise CheckpointError(f"--baseline {spec!r}: a second '{systems[-1].name}' system (give it once)")
    return systems


def load_checkpoint(args) -> tuple[MeteoRAModel, object, torch.device]:
    """The checkpoint --model on --device (bf16 on a GPU), its base model's tokenizer, the device."""
    from .base import load_tokenizer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(Path(args.model), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    if args.top_k is not None or args.temperature is not None:
        try:  # another k / temperature than the checkpoint was trained with, for every gate
            model.set_routing(args.top_k, args.temperature)
        except ValueError as err:
            raise CheckpointError(f"--top-k / --temperature for {args.model}: {err}") from None
    return model, load_tokenizer(model.base_model_id), device


def evaluate(args) -> dict:
    from tqdm.auto import tqdm

    ckpt = Path(args.model)
    model, tokenizer, device = load_checkpoint(args)
    specs = task_specs(args, ckpt, model)
    tasks = data_mod.load_tasks(specs, args.data_dir)
    for task in tasks:
        if task.name not in model.adapter_names:
            raise CheckpointError(f"task '{task.name}' has no adapter in {ckpt} (adapters: {', '.join(model.adapter_names)})")
    out = Path(args.out) if args.out else ckpt / "eval"
    out.mkdir(parents=True, exist_ok=True)
    systems = build_systems(args, model, tokenizer, device)
    composites = composite_sets(args, model, tasks)
    if args.limit == 0 and not composites:
        raise CheckpointError("--limit 0 scores composite-n prompts only, and --composite names none: nothing to evaluate")
    offset = args.offset
    total = len(systems) * sum(len(t.test[offset: offset + args.limit]) for t in tasks) + args.composite_samples * (sum(
        not s.labelled or (s.per_line and c[3] == "numbered") for s in systems for c in composites)
        + sum(c[3] == "numbered" for c in composites) * (bool(args.line_vote) + bool(args.segment_oracle)))
    rows, table, comp_table, comp_parts, line_vote = [], {}, {}, {}, {}
    started = time.perf_counter()
    with tqdm(total=total, desc="eval", disable=args.quiet, dynamic_ncols=True) as bar:
        for system in systems:
            for task in tasks:
                test = task.test[offset: offset + args.limit]
                if not test:  # --limit 0: composite-n only
                    continue
                system.prepare(task.name)
                outputs = generate(system.model, tokenizer, [r["prompt"] for r in test], max_new_tokens(task.name, args),
                                   args.batch_size, device, bar)
                system.release()
                scores = metrics.score(task.metric, outputs, [r["response"] for r in test])
                table.setdefault(task.name, {})[system.name] = scores
                rows += [{"system": system.name, "task": task.name, "prompt": r["prompt"], "reference": r["response"],
                          "output": o} for r, o in zip(test, outputs)]
            for label, comp_tasks, comp_rows, decoding in composites:
                if system.labelled and not (system.per_line and decoding == "numbered"):
                    continue  # composite prompts mix tasks: there is no single "own adapter" to force
                prompts = [r["prompt"] for r in comp_rows]
                per_line = (lambda i, _t=comp_tasks, _s=system: _s.prepare(_t[i - 1].name)) if system.labelled else None
                if per_line is None:
                    system.prepare(label)  # (a system without labels: its routing mode, e.g. prompt-vote)
                if decoding == "numbered":
                    outputs = generate_numbered(system.model, tokenizer, prompts,
                                                [max_new_tokens(t.name, args) for t in comp_tasks],
                                                args.batch_size, device, bar, before_line=per_line)
                else:
                    budget = sum(max_new_tokens(t.name, args) for t in comp_tasks) + 4 * len(comp_tasks)  # + "i. "
                    outputs = generate(system.model, tokenizer, prompts, budget, args.batch_size, device, bar)
                system.release()
                runs = [(system.name, outputs)]
                if system.name == "meteora" and decoding == "numbered":  # MeteoRA's other numbered modes
                    numbered = functools.partial(generate_numbered, model, tokenizer, prompts,
                                                 [max_new_tokens(t.name, args) for t in comp_tasks], args.batch_size,
                                                 device, bar)
                    if args.line_vote:
                        votes = question_votes(model, tokenizer, comp_rows, device)
                        own = [model.adapter_index(t.name) if t.name in model.adapter_names else -2 for t in comp_tasks]
                        hits = [v == o for vs in votes for v, o in zip(vs, own)]
                        line_vote[label] = sum(hits) / len(hits) if hits else None
                        runs.append(("line-vote", numbered(line_adapters=votes)))
                    if args.segment_oracle:
                        runs.append(("segment", numbered(segments=segments_for(model, tokenizer, comp_tasks, comp_rows))))
                for name, got in runs:
                    parts = comp_parts.setdefault(label, {})[name] = composite_parts(comp_tasks, comp_rows, got)
                    comp_table.setdefault(label, {})[name] = _composite_scores(comp_tasks, parts)
                    rows += [{"system": name, "task": label, "prompt": r["prompt"], "reference": r["response"],
                              "output": o} for r, o in zip(comp_rows, got)]
    comp_routing = {}  # the gates on each composite's prompts (the same rows for either decoding)
    for label, comp_tasks, comp_rows, _ in composites:
        key = label.split(" (")[0]
        if key not in comp_routing:
            comp_routing[key] = composite_routing(model, tokenizer, comp_tasks, comp_rows, device, args.batch_size)
    summary = {"checkpoint": str(ckpt), "device": str(device), "systems": [s.name for s in systems],
               "routing": {"top_k": model.top_k, "temperature": model.temperature},
               "tasks": table, "composite": comp_table, "composite_routing": comp_routing, "line_vote_accuracy": line_vote,
               "limit": args.limit, "offset": offset,
               "seconds": round(time.perf_counter() - started, 1)}
    if args.bootstrap:
        summary["bootstrap"] = bootstrap([r for r in rows if r["task"] in table], summary["systems"], args.bootstrap)
        summary["composite_bootstrap"] = composite_bootstrap(comp_parts, args.bootstrap)
    summary["same_output_as_meteora"] = same_outputs([r for r in rows if r["task"] in table], summary["systems"])
    data_mod.write_jsonl(out / "samples.jsonl", rows)
    _atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    markdown = results_markdown(summary)
    _atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    if not args.quiet:
        print("\n" + markdown)
    return summary


def task_specs(args, ckpt: Path, model: MeteoRAModel) -> list[str]:
    if args.tasks:
        return [s for s in args.tasks.split(",") if s.strip()]
    run_file = ckpt / RUN_NAME
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        args.data_dir = args.data_dir or run.get("data_dir")
        specs = []
        for t in run.get("tasks", []):
            source = t["source"]
            specs.append(source.split(":", 1)[1] if source.startswith("bigbench:") else f"{t['name']}={source}")
        return specs
    return list(model.adapter_names)


def composite_sets(args, model: MeteoRAModel, tasks) -> list[tuple[str, list, list[dict], str]]:
    """(label, tasks, rows, decoding) for every --composite value: 3, 5, 10 (TASKS.md's lists,
    offline substitutes) or "own" (the evaluated tasks in order), once per --composite-decoding
    (numbered: the harness writes "i."; free: one plain generation)."""
    decodings = [d.strip() for d in args.composite_decoding.split(",") if d.strip()]
    for d in decodings:
        if d not in ("numbered", "free"):
            raise CheckpointError(f"--composite-decoding {d!r}: expected numbered and/or free")
    sets = []
    by_name = {t.name: t for t in tasks}
    for value in [v for v in (args.composite or "").split(",") if v.strip()]:
        if value == "own":
            chosen = list(tasks)
        else:
            names = data_mod.composite_task_names(int(value))
            missing = [n for n in names if n not in model.adapter_names]
            if missing:
                raise CheckpointError(f"composite-{value} needs adapters for {', '.join(missing)}")
            chosen = [by_name.get(n) or data_mod.load_task(n, args.data_dir) for n in names]
        if len(chosen) < 2:
            continue
        rows = data_mod.build_composite(chosen, samples=args.composite_samples)
        label = f"composite-{len(chosen) if value == 'own' else value}"
        sets += [(label + ("" if d == "numbered" else f" ({d})"), chosen, rows, d) for d in decodings]
    return sets


@torch.no_grad()
def question_votes(model: MeteoRAModel, tokenizer, rows: Sequence[dict], device: torch.device) -> list[list[int]]:
    """Per composite row, per sub-question i: the adapter that MeteoRA's gates pick as their top-1 most
    often over question i's tokens (one forward over the prompt; -1 if the question has no token).
    The rows' question boundaries are used, not their task labels: ``--line-vote`` then answers
    line i on that adapter (``generate_numbered(line_adapters=...)``)."""
    out = []
    for row in rows:
        position = {name: i for i, name in enumerate(row["tasks"])}  # "labels" = the question's number
        prompt, _ = composite_tokens(tokenizer, row, position)
        ids = torch.tensor([[t for t, _ in prompt]], device=device)
        question = torch.tensor([q for _, q in prompt], device=device)
        votes = model.top1_votes(ids)[0]  # (S, N)
        out.append([int(votes[question == i].sum(0).argmax()) if bool((question == i).any()) else -1
                    for i in range(len(row["tasks"]))])
    return out


@torch.no_grad()
def composite_routing(model: MeteoRAModel, tokenizer, tasks, rows: Sequence[dict], device: torch.device,
                      batch_size: int) -> dict[str, dict[str, float | None]]:
    """MeteoRA's gates on composite prompts, teacher-forced over each prompt and its reference
    answers (``train.encode_composite`` labels sub-question i and answer line i with task i):
    {"question" | "answer": {sub-task: the share of (gate, token) pairs whose top-1 is its adapter
    over its question's / its answer line's tokens (None: no such token)}}. Whether the routing
    switches where the tasks do, apart from whether the base model can answer."""
    from .loss import gate_hits

    index = {name: i for i, name in enumerate(model.adapter_names)}
    examples = [encode_composite(tokenizer, r, index, max_length=1 << 20, group=0) for r in rows]
    hits = {(t.name, part): [0, 0] for t in tasks for part in ("question", "answer")}  # gates right, gates
    model.record_routing(True)
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id, device)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            right, counted = gate_hits(model, batch["task_labels"])
            labels = batch["task_labels"].reshape(-1).to(right.device)
            response = (batch["labels"] != -100).reshape(-1).to(right.device)
            for t in tasks:
                own = labels == index[t.name]
                for part, where in (("question", own & ~response), ("answer", own & response)):
                    hits[(t.name, part)][0] += int(right[where].sum())
                    hits[(t.name, part)][1] += int(counted[where].sum())
    finally:
        model.record_routing(False)
    return {part: {t.name: hits[(t.name, part)][0] / hits[(t.name, part)][1] if hits[(t.name, part)][1] else None
                   for t in tasks} for part in ("question", "answer")}


def composite_parts(tasks, rows: Sequence[dict], outputs: Sequence[str]) -> list[tuple[str, list[str], list[str]]]:
    """Per sub-task of a composite-n: (its metric, the i-th numbered answers, their references)."""
    split = [data_mod.split_composite_answer(o, len(tasks)) for o in outputs]
    return [(task.metric, [s[i] for s in split], [r["answers"][i] for r in rows]) for i, task in enumerate(tasks)]


def score_composite(tasks, rows: Sequence[dict], outputs: Sequence[str]) -> dict:
    """Per sub-task score (its own metric on the i-th numbered answer), their sum, and the share of
    sub-questions the model attempted (a non-empty numbered answer)."""
    return _composite_scores(tasks, composite_parts(tasks, rows, outputs))


def _composite_scores(tasks, parts: list[tuple[str, list[str], list[str]]]) -> dict:
    """score_composite from the composite's parts (composite_parts)."""
    result = {task.name: metrics.score(metric, outs, refs)["score"] for task, (metric, outs, refs) in zip(tasks, parts)}
    result["sum"] = sum(result.values())
    answers = [a for _, outs, _ in parts for a in outs]
    result["attempted"] = sum(bool(a) for a in answers) / max(1, len(answers))
    return result


def _resampled(metric: str, outputs: Sequence[str], references: Sequence[str], picks, prompts=None):
    """A metric's headline on each row of ``picks`` (an array of row-index resamples)."""
    import numpy as np

    if metric in metrics.CORPUS_METRICS:
        return np.array([metrics.corpus_bleu([outputs[i] for i in idx], [references[i] for i in idx]) / 100
                         for idx in picks])
    return np.asarray(metrics.row_hits(metric, outputs, references, prompts), dtype=float)[picks].mean(axis=1)


def _intervals(values, systems: Sequence[str], key: str) -> dict:
    """From per-resample values (row 0: the full sample; one column per system): each system's value
    with its 95% interval under ``key``, and MeteoRA's ratio to and difference from every other
    system with theirs (the ratio is None where the other system scores 0 on the full sample)."""
    import numpy as np

    def interval(v) -> list[float]:  # the full sample's value, then the resamples' 95% interval
        return [float(v[0]), *np.percentile(v[1:], [2.5, 97.5]).tolist()]

    result = {key: {s: interval(values[:, j]) for j, s in enumerate(systems)}}
    if "meteora" in systems:
        m = systems.index("meteora")
        for j, other in enumerate(systems):
            if j == m:
                continue
            ratio = np.divide(values[:, m], values[:, j], out=np.full(len(values), np.nan), where=values[:, j] > 0)
            diff = values[:, m] - values[:, j]
            ratio_ci = [None] * 3 if np.isnan(ratio[0]) else \
                [float(ratio[0]), *np.nanpercentile(ratio[1:], [2.5, 97.5]).tolist()]
            result.setdefault("meteora_vs", {})[other] = {"ratio": ratio_ci, "difference": interval(diff)}
    if "mixed" in systems:  # every other system against the mixed-task LoRA (issue 6's composite baseline)
        m = systems.index("mixed")
        for j, other in enumerate(systems):
            if j != m and other != "meteora":
                result.setdefault("vs_mixed", {})[other] = {"difference": interval(values[:, j] - values[:, m])}
    return result


def bootstrap(rows: Sequence[dict], systems: Sequence[str], resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean score over tasks: each resample draws every task's test rows with
    replacement (the same rows for every system) and rescores them. Returns, per system, the mean
    and its 95% interval, and for MeteoRA the 95% intervals of its ratio to each other system's mean
    and of the difference. ``rows``: samples.jsonl rows of single tasks (not composite-n), in the
    same order for every system; tasks that some system lacks are left out."""
    import numpy as np

    by_task: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {}).setdefault(r["system"], []).append(r)
    tasks = [t for t, got in by_task.items() if all(len(got.get(s, [])) == len(got[systems[0]]) for s in systems)]
    if not tasks:
        return {}
    rng = np.random.default_rng(seed)
    means = np.zeros((resamples + 1, len(systems)))  # row 0: the full sample
    for task in tasks:
        metric = data_mod.TASK_METRICS.get(task, "contained")
        n = len(by_task[task][systems[0]])
        picks = np.vstack([np.arange(n), rng.integers(0, n, size=(resamples, n))])
        for j, system in enumerate(systems):
            got = by_task[task][system]
            means[:, j] += _resampled(metric, [r["output"] for r in got], [r["reference"] for r in got], picks,
                                      [r.get("prompt", "") for r in got])
    means /= len(tasks)
    return {"resamples": resamples, "tasks": len(tasks), **_intervals(means, list(systems), "mean")}


def composite_bootstrap(parts: dict[str, dict[str, list[tuple[str, list[str], list[str]]]]], resamples: int = 1000,
                        seed: int = 0) -> dict:
    """Paired bootstrap of each composite-n's sum of sub-task scores: each resample draws the
    composite prompts with replacement (the same prompts for every system) and rescores every
    sub-task. ``parts``: {label: {system: composite_parts(...)}}. Returns, per label, the number of
    prompts, each system's sum with its 95% interval and MeteoRA's ratio / difference intervals."""
    import numpy as np

    rng = np.random.default_rng(seed)
    result = {}
    for label, by_system in parts.items():
        systems = list(by_system)
        n = len(by_system[systems[0]][0][1])
        if n == 0:
            continue
        picks = np.vstack([np.arange(n), rng.integers(0, n, size=(resamples, n))])
        sums = np.zeros((resamples + 1, len(systems)))
        for j, system in enumerate(systems):
            for metric, outs, refs in by_system[system]:
                sums[:, j] += _resampled(metric, outs, refs, picks)
        result[label] = {"resamples": resamples, "prompts": n, **_intervals(sums, systems, "sum")}
    return result


def rescore(folder: str | os.PathLike, resamples: int = 1000) -> dict:
    """Recompute the composite-n bootstrap of an evaluation folder (its summary.json and
    samples.jsonl or samples.jsonl.gz) with this version's code, and rewrite its summary.json and
    results.md. Each sub-task's answers and references are the numbered lines of the stored output
    and reference; the sub-tasks and their order come from the summary's composite table."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text())
    samples = folder / "samples.jsonl"
    if not samples.exists() and (folder / "samples.jsonl.gz").exists():
        samples = folder / "samples.jsonl.gz"
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in data_mod.read_jsonl(samples, required=("system", "task", "output", "reference")):
        rows.setdefault((r["task"], r["system"]), []).append(r)
    parts: dict = {}
    for label, by_system in summary.get("composite", {}).items():
        names = [k for k in next(iter(by_system.values()), {}) if k not in ("sum", "attempted")]
        tasks = [data_mod.Task(name) for name in names]
        for system in by_system:
            got = rows.get((label, system))
            if not got:
                raise data_mod.DataError(f"{samples}: no rows of system {system!r} on {label!r} (summary.json has them)")
            refs = [{"answers": data_mod.split_composite_answer(r["reference"], len(tasks))} for r in got]
            parts.setdefault(label, {})[system] = composite_parts(tasks, refs, [r["output"] for r in got])
    summary["composite_bootstrap"] = composite_bootstrap(parts, resamples)
    _atomic_write(summary_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    markdown = results_markdown(summary)
    _atomic_write(folder / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    return summary


def same_outputs(rows: Sequence[dict], systems: Sequence[str]) -> dict[str, list[int]]:
    """{system: [rows whose output is MeteoRA's, rows both answered]} over single-task rows: how
    often a system writes exactly MeteoRA's text (the routing ablations' closest measure)."""
    outputs: dict[tuple[str, int], dict[str, str]] = {}
    seen: dict[tuple[str, str], int] = {}
    for r in rows:  # a task's rows come in the same order for every system
        i = seen.get((r["system"], r["task"]), 0)
        seen[(r["system"], r["task"])] = i + 1
        outputs.setdefault((r["task"], i), {})[r["system"]] = r["output"]
    out = {}
    for s in systems:
        if s == "meteora":
            continue
        both = [v for v in outputs.values() if s in v and "meteora" in v]
        out[s] = [sum(v[s] == v["meteora"] for v in both), len(both)]
    return out


def mean_scores(summary: dict) -> dict[str, float | None]:
    """Each system's mean score over the tasks it was scored on (None: none)."""
    out = {}
    for s in summary["systems"]:
        values = [by[s]["score"] for by in summary["tasks"].values() if by.get(s, {}).get("score") is not None]
        out[s] = sum(values) / len(values) if values else None
    return out


def results_markdown(summary: dict) -> str:
    systems = summary["systems"]
    routing = summary.get("routing")
    rows = f"test rows {summary['offset'] + 1}-{summary['offset'] + summary['limit']}" if summary.get("offset") else \
        f"up to {summary['limit']} test rows"
    what = f"{rows} per task" if summary["tasks"] else "composite-n prompts only"
    lines = [f"Checkpoint `{summary['checkpoint']}` on {summary['device']}, {what}"
             + (f", MeteoRA routing top-{routing['top_k']} at temperature {routing['temperature']:g}." if routing else ".")]
    if summary["tasks"]:
        lines += ["", "| task | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
        for task, by_system in summary["tasks"].items():
            cells = ["" if by_system.get(s, {}).get("score") is None else f"{by_system[s]['score']:.3f}" for s in systems]
            lines.append(f"| {task} ({data_mod.TASK_METRICS.get(task, 'contained')}) | " + " | ".join(cells) + " |")
        means = mean_scores(summary)
        lines.append("| **mean** | " + " | ".join("" if means[s] is None else f"**{means[s]:.3f}**" for s in systems)
                     + " |")
    for label, by_system in summary["composite"].items():
        sub = [k for k in next(iter(by_system.values())) if k not in ("sum", "attempted")]
        how = "one free generation" if label.endswith("(free)") else "the harness writes each 'i.', the model answers to the line end"
        lines += ["", f"{label} ({how}): score per sub-task (its own metric on the i-th numbered answer), sum, attempted",
                  "", "| system | " + " | ".join(sub) + " | sum | attempted |", "|---|" + "---:|" * (len(sub) + 2)]
        for s, scores in by_system.items():
            lines.append(f"| {s} | " + " | ".join(f"{scores[k]:.3f}" for k in sub)
                         + f" | {scores['sum']:.3f} | {scores['attempted']:.0%} |")
        if "adapter" in by_system:
            lines += ["", "adapter: each answer line generated on its own sub-task's adapter (the whole forward, prompt "
                      "and earlier lines included; task labels used): the most that routing one adapter per answer "
                      "line could reach."]
        if "line-vote" in by_system:
            hit = summary.get("line_vote_accuracy", {}).get(label)
            lines += ["", "line-vote: each answer line generated on the adapter that MeteoRA's gates pick most (top-1) "
                      "over that line's question (the whole forward; question boundaries used, no task label)"
                      + ("" if hit is None else f"; it is the sub-task's own adapter for {hit:.0%} of the lines") + "."]
        if "segment" in by_system:
            lines += ["", "segment: every token on its own segment's adapter (sub-question j and answer line j on "
                      "sub-task j's, the rest of the context and the line being generated on the current line's; task "
                      "labels used): token-level routing that is right at every question and answer line."]
        gates = summary.get("composite_routing", {}).get(label)
        if gates:
            pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
            lines += ["", "MeteoRA's gates on these prompts, teacher-forced on the reference answers: top-1 = the "
                      "sub-task's adapter over its question's / its answer line's tokens: "
                      + ", ".join(f"{t} {pct(gates['question'][t])} / {pct(gates['answer'][t])}" for t in sub) + "."]
        boot = summary.get("composite_bootstrap", {}).get(label)
        if boot:
            parts = [", ".join(f"{s} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for s, v in boot["sum"].items())]
            def diff(a, b, d) -> str:
                return f"{a} - {b} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"

            parts += [", ".join(diff("MeteoRA", other, g["difference"]) for other, g in boot["meteora_vs"].items())] \
                if boot.get("meteora_vs") else []
            parts += [", ".join(diff(other, "mixed", g["difference"]) for other, g in boot["vs_mixed"].items())] \
                if boot.get("vs_mixed") else []
            lines += ["", f"Sum with its 95% interval (paired bootstrap over the {boot['prompts']} prompts, "
                      f"{boot['resamples']} resamples): " + "; ".join(parts) + "."]
    boot = summary.get("bootstrap")
    if boot:
        lines += ["", f"Mean over {boot['tasks']} tasks with its 95% interval (paired bootstrap over test rows, "
                  f"{boot['resamples']} resamples): "
                  + ", ".join(f"{s} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for s, v in boot["mean"].items()) + "."]
        for other, got in boot.get("meteora_vs", {}).items():
            r, d = got["ratio"], got["difference"]
            ratio = "undefined (0 mean)" if r[0] is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"
            lines.append(f"MeteoRA vs {other}: ratio of means {ratio}, difference {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}].")
    same = {s: v for s, v in (summary.get("same_output_as_meteora") or {}).items() if v[1]}  # none: composite only
    if same:
        lines += ["", "Rows on which a system writes exactly MeteoRA's text: "
                  + ", ".join(f"{s} {n} of {m}" for s, (n, m) in same.items()) + "."]
    lines.append("")
    lines.append("Scores: accuracy (exact / contained / gsm8k / strategyqa rules) or corpus BLEU / 100 (TASKS.md).")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def show(args) -> dict[str, Path]:
    """Generate for one prompt (--show) or the first composite-n row (--show-composite, numbered
    decoding) and draw which adapter each token used. The routing is read from one forward pass
    over the whole sequence, prompt and answer, which is what generation computed step by step."""
    ckpt = Path(args.model)
    model, tokenizer, device = load_checkpoint(args)
    if args.show_composite:
        tasks = data_mod.load_tasks(task_specs(args, ckpt, model), args.data_dir)
        opts = argparse.Namespace(**{**vars(args), "composite": args.show_composite, "composite_decoding": "numbered",
                                     "composite_samples": 1})
        sets = composite_sets(opts, model, tasks)
        if not sets:
            raise CheckpointError(f"--show-composite {args.show_composite}: needs at least two tasks")
        _, comp_tasks, rows, _ = sets[0]
        prompt = rows[0]["prompt"]
        answer = generate_numbered(model, tokenizer, [prompt], [max_new_tokens(t.name, args) for t in comp_tasks],
                                   1, device)[0]
    else:
        prompt = args.show
        answer = generate(model, tokenizer, [prompt], args.max_new_tokens_long, 1, device)[0]
    head = format_prompt(tokenizer, prompt)
    prompt_len = len(tokenizer(head, add_special_tokens=False).input_ids)
    ids = tokenizer(head + answer, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    with model.trace_routing() as trace:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    weights = trace.token_adapter_weights()  # position p's routing, drawn on token p
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    outdir = Path(args.out) if args.out else ckpt / "eval"
    outdir.mkdir(parents=True, exist_ok=True)
    title = f"MeteoRA routing, {len(model.adapter_names)} adapters, top-{model.top_k}"
    paths = {
        "html": viz.routing_html(tokens, weights, model.adapter_names, outdir / "routing.html", title, prompt_len),
        "png": viz.routing_png(tokens, weights, model.adapter_names, outdir / "routing.png", title, prompt_len),
        "usage": viz.usage_heatmap(trace, model.adapter_names, outdir / "usage.png",
                                   "mean gate weight per layer and module (prompt + generation)"),
    }
    if not args.quiet:
        print(f"answer: {answer}\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m meteora.eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="runs/default", help="a MeteoRA checkpoint folder")
    parser.add_argument("--tasks", help="task specs (default: the ones the checkpoint was trained on)")
    parser.add_argument("--data-dir")
    parser.add_argument("--baseline", action="append",
                        help="adapter (each task's own adapter: the checkpoint's expert, or after --train-loras "
                             "the PEFT adapter it started from, as train_run.json names it; adapter=DIR: the PEFT "
                             "adapter DIR/<task>), experts (the checkpoint's own experts forced one at a time, as "
                             "trained), base, mixed=DIR (one LoRA on the task mix), "
                             "prompt-adapter / answer-adapter (the task's adapter on the prompt / on the generated "
                             "tokens, the gates on the rest: a routing ablation), prompt-vote (MeteoRA whose gates "
                             "first vote one adapter for the whole prompt: meteora.PromptVote; prompt-vote=W: for each "
                             "token among the W tokens before and after it), or none; repeat (default: "
                             "adapter and base)")
    parser.add_argument("--composite", default="own",
                        help="comma list of 3, 5, 10 (TASKS.md's composite-n) or own (the evaluated tasks); '' for none")
    parser.add_argument("--composite-samples", type=int, default=16)
    parser.add_argument("--composite-decoding", default="numbered",
                        help="numbered (the harness writes each 'i.' and the model answers up to the line end), "
                             "free (one plain generation), or both as numbered,free")
    parser.add_argument("--limit", type=int, default=32, help="test rows per task (0: composite-n only)")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip this many test rows of each task first (held-out rows for choosing a setting)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--line-vote", action="store_true",
                        help="numbered composites also as line-vote: each answer line on the adapter that MeteoRA's "
                             "gates pick most over that line's question (an inference mode that uses the question "
                             "boundaries, no task label)")
    parser.add_argument("--segment-oracle", action="store_true",
                        help="numbered composites also as segment: every token on its own segment's adapter (each "
                             "sub-question and its answer line on their sub-task's; task labels used), the routing "
                             "oracle at token level")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples of the paired bootstrap intervals of the mean over tasks and of each "
                             "composite-n's sum (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="for short-answer tasks")
    parser.add_argument("--max-new-tokens-long", type=int, default=64, help="for BLEU/ROUGE tasks")
    parser.add_argument("--top-k", type=int, help="route every token to this many adapters (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, help="gate softmax temperature (default: the checkpoint's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="output folder (default MODEL/eval)")
    parser.add_argument("--show", metavar="PROMPT", help="only draw the routing of this prompt's generation")
    parser.add_argument("--show-composite", metavar="N",
                        help="only draw the routing of the first composite-N row (3, 5, 10 or own), numbered decoding")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--rescore", metavar="FOLDER",
                        help="only recompute an evaluation folder's composite-n bootstrap intervals (every system "
                             "against MeteoRA and against the mixed LoRA) from its samples, rewriting its "
                             "summary.json and results.md")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.offset < 0:
        parser.error(f"--limit {args.limit} / --offset {args.offset}: need >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        if args.rescore:
            summary = rescore(args.rescore, args.bootstrap or 1000)
            if not args.quiet:
                print(results_markdown(summary))
        elif args.show or args.show_composite:
            show(args)
        else:
            evaluate(args)
    except (data_mod.DataError, CheckpointError, FileNotFoundError) as err:
        print(f"meteora.eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
