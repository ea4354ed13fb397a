"""``python -m meteora.train``: tasks -> one LoRA adapter per task -> MeteoRA gates -> checkpoint.

    python -m meteora.train                      # the embedded default: SmolLM2-135M, 4 BIG-bench tasks
    python -m meteora.train adapters --tasks a,b # only the per-task PEFT adapters (skips existing ones)
    python -m meteora.train gates --adapter a=DIR --adapter b=DIR --tasks a,b
    python -m meteora.train gates --from CKPT --add-adapter c=DIR     # grow a trained checkpoint
    torchrun --nproc_per_node=G -m meteora.train ...                  # FSDP2 (NCCL, or gloo on CPUs)

Gate training minimises ``L_LM + lambda * CE_gate`` (DESIGN.md section 1): every token of a row is
labelled with its task's adapter index, padding is ignored. By default the LoRA experts train too
(at ``--lora-lr``, as the authors' script does) and each gate's cross-entropy reaches that gate
alone, so the experts learn from the LM loss only: the set-up that matched the per-task adapters on
16 tasks (docs/results.md); ``--no-train-loras`` trains the gates alone. Checkpoints of the whole training
state are written atomically every ``--checkpoint-every`` steps; ``--resume`` continues from the
last one (the data order, RNG, optimizer and schedule included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import data as data_mod
from .adapters import TARGET_MODULES, AdapterError
from .base import DEFAULT_MODEL, cache_dir, default_model_dir, load_base_model
from .data import Task
from .loss import gate_accuracy, meteora_loss
from ._files import atomic_folder, atomic_write as _atomic_write
from .model import CheckpointError, MeteoRAModel, _full_tensor, from_adapters, load, new_experts

log = logging.getLogger("meteora")

STATE_NAME = "train_state.pt"


class TrainError(RuntimeError):
    """A training run that cannot go on; the message says why (one line)."""

LOG_NAME = "train_log.jsonl"
RUN_NAME = "train_run.json"


def read_run(ckpt) -> dict:
    """A checkpoint's train_run.json ({} when it has none)."""
    run_file = Path(ckpt) / RUN_NAME
    return json.loads(run_file.read_text()) if run_file.is_file() else {}


def experts_trained(run: dict) -> bool:
    """Whether a run's train_run.json says its LoRA experts moved away from the adapters they were
    embedded from (runs written before the ``experts_trained`` key: their --train-loras flag)."""
    return bool(run.get("experts_trained", run.get("args", {}).get("train_loras", False)))


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values / self.world
        return values.cpu()


def init_dist(device: str) -> Dist:
    """torchrun's environment -> a process group (NCCL on GPUs, gloo on CPUs); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu") if device in ("auto", "cuda") else torch.device(device)
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local_rank, dev)


# -- examples and batches -----------------------------------------------------------------------
def format_prompt(tokenizer, prompt: str) -> str:
    """The tokenizer's chat template around one user turn (with an empty system turn, which keeps
    templates from adding a default system prompt to every row), or the authors' ``[INST]`` wrapper."""
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": prompt}
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": ""}, user],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:  # a template without a system role
            return tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    return f"[INST] {prompt} [/INST]\n"


def _response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V) fp32, targets (B, K)) at the K positions some row of the batch is labelled
    at: the vocabulary projection runs there only (``logits_to_keep`` as indices), not at every
    prompt token (on SmolLM2 the head is a fifth of the model's flops). The call goes through the
    model's own forward, so FSDP2 hooks run."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return out.logits.float(), labels[:, keep + 1]


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (response) tokens, averaged over them."""
    logits, targets = _response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def lm_loss_rows(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) per row: the summed next-token cross-entropy over its labelled (response) tokens."""
    logits, targets = _response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                             reduction="none").sum(1)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: the LM loss is on the response (and EOS) only
    task: int  # the task label of every token (and the batching group)
    token_tasks: list[int] | None = None  # a label per token instead (composite rows; -1: none)


def fit(prompt: list, response: list, max_length: int, eos) -> tuple[list, list]:
    """The response's first max_length // 2 items + ``eos``, and the prompt left-truncated so that
    both fit in max_length (the cut of ``encode`` and ``encode_composite``)."""
    response = response[: max_length // 2] + [eos]
    return prompt[max(0, len(prompt) + len(response) - max_length):], response


def encode(tokenizer, row: dict, task: int, max_length: int) -> Example:
    """Prompt (left-truncated to fit) + response + EOS."""
    prompt = tokenizer(format_prompt(tokenizer, row["prompt"]), add_special_tokens=False).input_ids
    response = tokenizer(row["response"], add_special_tokens=False).input_ids
    prompt, response = fit(prompt, response, max_length, tokenizer.eos_token_id)
    return Example(prompt + response, [-100] * len(prompt) + response, task)


def encode_composite(tokenizer, row: dict, labels: dict[str, int], max_length: int, group: int) -> Example:
    """A composite row (``data.build_composite``): every token of sub-question i and of answer line
    i is labelled with task i's adapter; the instruction, the few-shot prefix and the template are
    not labelled. Prompt left-truncated to fit, response + EOS as in ``encode``."""
    prompt, response = composite_tokens(tokenizer, row, labels)
    return composite_example(*fit(prompt, response, max_length, (tokenizer.eos_token_id, -1)), group)


def composite_example(prompt: list[tuple[int, int]], response: list[tuple[int, int]], group: int) -> Example:
    ids = [t for t, _ in prompt + response]
    return Example(ids, [-100] * len(prompt) + [t for t, _ in response], group,
                   [task for _, task in prompt + response])


def composite_spans(row: dict, labels: dict[str, int], formatted: str, text: str | None = None) -> list[tuple[int, int, int]]:
    """(start, end, label) character spans in ``text`` (the formatted prompt ``formatted``, then the
    response; default: the prompt alone) of each sub-question after the prompt's last "Questions:"
    (the few-shot prefix has its own), then of each reference answer line in the response."""
    text = formatted if text is None else text
    questions, answers = data_mod.composite_lines(row["questions"], row["answers"])
    spans = []
    for lines, cursor in ((questions, max(0, formatted.rfind("Questions:"))), (answers, len(formatted))):
        for name, line in zip(row["tasks"], lines):
            at = text.find(line, cursor)
            if at >= 0:
                spans.append((at, at + len(line), labels[name]))
                cursor = at + len(line)
    return spans


def composite_tokens(tokenizer, row: dict, labels: dict[str, int]) -> tuple[list, list]:
    """A composite row's prompt and response tokens, each as (token id, task label or -1)."""
    formatted = format_prompt(tokenizer, row["prompt"])
    text = formatted + row["response"]
    spans = composite_spans(row, labels, formatted, text)
    if not getattr(tokenizer, "is_fast", False):
        raise TrainError("composite training rows need a fast tokenizer (character offsets)")
    prompt, response = [], []
    for token, start, task in span_labels(tokenizer, text, spans):
        (response if start >= len(formatted) else prompt).append((token, task))
    return prompt, response


def span_labels(tokenizer, text: str, spans: Sequence[tuple[int, int, int]], default: int = -1) -> list[tuple[int, int, int]]:
    """Each token of ``text`` (a fast tokenizer, no special tokens) as (token id, offset of its first
    character, the label of the (start, end, label) span holding that character, else ``default``)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(token, start, next((label for a, b, label in spans if a <= start < b), default))
            for token, (start, _end) in zip(enc.input_ids, enc.offset_mapping)]


def composite_examples(tokenizer, tasks: Sequence[Task], count: int, max_length: int, seed: int) -> list[Example]:
    """``count`` composite rows from the train splits, each 2 to 5 distinct tasks in random order and
    one shot. A row longer than ``max_length`` sheds its shot, then its last questions (down to two),
    until it fits whole: cutting it as ``encode`` does would drop its first questions (and the last
    answer lines) and leave answer lines labelled with tasks whose question the row no longer shows
    (at 16 tasks and 256 tokens, 28% of the sub-tasks). A row of two questions that still does not
    fit is cut."""
    rng = random.Random(seed)
    labels = {t.name: i for i, t in enumerate(tasks)}
    out = []
    for i in range(count):
        picked = rng.sample(list(tasks), rng.randint(2, min(5, len(tasks))))
        for n, shots in [(n, shots) for n in range(len(picked), 1, -1) for shots in (1, 0)]:
            row = data_mod.build_composite(picked[:n], samples=1, seed=seed * 7919 + i, split="train", shots=shots)[0]
            prompt, response = composite_tokens(tokenizer, row, labels)
            kept_prompt, kept_response = fit(prompt, response, max_length, (tokenizer.eos_token_id, -1))
            if len(kept_prompt) == len(prompt) and len(kept_response) == len(response) + 1:
                break  # nothing cut
        out.append(composite_example(kept_prompt, kept_response, group=len(tasks)))  # else two questions, cut
    return out


def encode_tasks(tokenizer, tasks: Sequence[Task], labels: Sequence[int], rows_per_task: int,
                 max_length: int, split: str = "train") -> list[Example]:
    out = []
    for task, label in zip(tasks, labels):
        rows = getattr(task, split)[:rows_per_task]
        out.extend(encode(tokenizer, r, label, max_length) for r in rows)
    return out


class Batches:
    """Length-bucketed, task-mixed micro-batches in a seeded order per epoch, dealt round-robin to
    the ranks.

    Micro-batch ``m`` of a rank is fully determined by (seed, m), which is what makes a resumed run
    see the same data as an uninterrupted one.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world: int = 1):
        if not examples:
            raise ValueError("meteora.train: no training examples")
        self.examples, self.batch_size, self.seed, self.pad_id = list(examples), batch_size, seed, pad_id
        self.rank, self.world = rank, world
        self.per_rank = max(1, math.ceil(len(self.examples) / batch_size) // world)

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        chunk = self.batch_size * 32
        batches = []
        for start in range(0, len(order), chunk):
            # Within a chunk, each task's rows sorted by length, then dealt out task by task: a
            # batch holds rows of similar length *quantile* from every task. (Sorting the chunk as a
            # whole would give batches of one task each, and gates trained on them oscillate.)
            by_task: dict[int, list[int]] = {}
            for i in order[start:start + chunk]:
                by_task.setdefault(self.examples[i].task, []).append(i)
            ranked = [sorted(rows, key=lambda i: len(self.examples[i].input_ids)) for rows in by_task.values()]
            part = [i for group in itertools.zip_longest(*ranked) for i in group if i is not None]
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        while len(batches) < self.per_rank * self.world:  # tiny data sets: every rank gets a batch
            batches.append(batches[len(batches) % max(1, len(batches))])
        return batches[self.rank::self.world][: self.per_rank]

    def stream(self, start: int = 0) -> Iterator[list[Example]]:
        m = start
        while True:
            epoch, index = divmod(m, self.per_rank)
            batches = self._epoch(epoch)
            for index in range(index, self.per_rank):
                yield [self.examples[i] for i in batches[index]]
            m = (epoch + 1) * self.per_rank


class TaskBatches:
    """For adapters trained side by side: every step one length-bucketed batch of ``batch_size`` rows
    of each task (a Batches per task), task after task, so a micro-batch of ``batch_size`` rows
    holds one task. Step ``m`` is fully determined by (seed, m)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int):
        by_task: dict[int, list[Example]] = {}
        for e in examples:
            by_task.setdefault(e.task, []).append(e)
        if not by_task:
            raise ValueError("meteora.train: no training examples")
        self.tasks = {t: Batches(rows, batch_size, seed, pad_id) for t, rows in sorted(by_task.items())}  # as each alone
        self.batch_size, self.pad_id = batch_size, pad_id

    def stream(self, start: int = 0) -> Iterator[list[Example]]:
        streams = [b.stream(start) for b in self.tasks.values()]
        while True:
            yield [e for s in streams for e in next(s)]


def collate(batch: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors; task labels are -1 (ignored) on padding."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    tasks = torch.full((len(batch), length), -1, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        tasks[row, :n] = torch.tensor(e.token_tasks) if e.token_tasks is not None else e.task
        mask[row, :n] = 1
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, labels=labels, task_labels=tasks, attention_mask=mask).items()}


# -- the optimisation loop ----------------------------------------------------------------------
def cosine_schedule(optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Checkpointer:
    """The whole training state in one file, written atomically by rank 0 and read by every rank."""

    def __init__(self, folder: Path, ctx: Dist):
        self.folder, self.ctx = folder, ctx
        self.path = folder / STATE_NAME

    def save(self, step: int, position: int, model, optimizer, scheduler, history: list[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rngs = [None] * self.ctx.world
        if self.ctx.enabled:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.ctx.main:
            state = dict(step=step, position=position, world=self.ctx.world, model=model_state,
                         optimizer=optim_state, scheduler=scheduler.state_dict(), rng=rngs, history=history)
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self.ctx.barrier()

    def load(self, model, optimizer, scheduler) -> tuple[int, int, list[dict]]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state["world"] != self.ctx.world:
            raise TrainError(f"{self.path} was written by {state['world']} processes; resume with "
                               f"the same number (this run has {self.ctx.world})")
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][self.ctx.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return state["step"], state["position"], state["history"]


def optimize(model: nn.Module, params: list[nn.Parameter] | list[dict], batches: Batches | TaskBatches,
             loss_fn: Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None, args, ctx: Dist,
             desc: str, out: Path | None = None, resume: bool = False,
             backward_fn: Callable[[dict], dict[str, torch.Tensor]] | None = None) -> list[dict]:
    """AdamW + warmup/cosine, gradient accumulation and clipping; optional checkpoints in ``out``.
    ``params``: parameters, or torch.optim parameter groups (a group's "lr" overrides ``args.lr``;
    the clipping is over all of them together).
    ``backward_fn(batch)`` instead of ``loss_fn``: runs the backward itself (for one micro-batch of
    ``grad_accum`` = 1) and returns the parts to log, "loss" among them.

    Returns the per-step history (dicts of floats). With ``out``, rank 0 appends each step to
    ``out/train_log.jsonl`` and the state goes to ``out/checkpoint/`` every ``args.checkpoint_every``
    steps.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = cosine_schedule(optimizer, args.steps, int(args.warmup * args.steps))
    ckpt = Checkpointer(out / "checkpoint", ctx) if out is not None else None
    step, position, history = 0, 0, []
    if resume and ckpt is not None and ckpt.path.is_file():
        step, position, history = ckpt.load(model, optimizer, scheduler)
        log.info("meteora.train: resumed %s at step %d (micro-batch %d)", ckpt.path, step, position)
    if out is not None and ctx.main:
        _atomic_write(out / LOG_NAME, lambda tmp: Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history)))
    stream = batches.stream(position)
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc=desc, disable=not ctx.main or args.quiet, dynamic_ncols=True)
    while step < args.steps:
        started = time.perf_counter()
        totals: dict[str, torch.Tensor] = {}
        for _ in range(args.grad_accum):
            batch = collate(next(stream), batches.pad_id, ctx.device)
            position += 1
            if backward_fn is not None:
                parts = backward_fn(batch)
                loss = parts.pop("loss")
            else:
                loss, parts = loss_fn(batch)
                (loss / args.grad_accum).backward()
            for key, value in {"loss": loss, **parts}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / args.grad_accum
        norm = _full_tensor(torch.nn.utils.clip_grad_norm_(params, args.clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        keys = sorted(totals)
        means = ctx.mean(torch.stack([totals[k] for k in keys]))
        record = {"step": step, **{k: round(float(v), 6) for k, v in zip(keys, means)},
                  "grad_norm": round(float(norm), 6), "lr": scheduler.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - started, 3)}
        if ctx.device.type == "cuda":  # the largest of every process's peak so far
            record["peak_gib"] = round(ctx.max(torch.cuda.max_memory_allocated(ctx.device) / 2**30), 3)
        history.append(record)
        if out is not None and ctx.main:
            with open(out / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{record[k]:.3g}" for k in keys if k != "loss"})
        bar.update(1)
        if ctx.main and not args.quiet and step % max(1, args.log_every) == 0:
            bar.write(f"{desc} step {step}/{args.steps} " + " ".join(f"{k} {record[k]:.4g}" for k in keys))
        if ckpt is not None and args.checkpoint_every > 0 and (step % args.checkpoint_every == 0 or step == args.steps):
            ckpt.save(step, position, model, optimizer, scheduler, history)
    bar.close()
    model.eval()
    return history


# -- per-task adapters --------------------------------------------------------------------------
def adapter_dir(args, task: str) -> Path:
    root = Path(args.adapters_dir) if args.adapters_dir else (
        cache_dir() / "adapters" / f"{_slug(args.base)}-r{args.lora_r}-s{args.adapter_steps}")
    return root / task


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name).strip("/"))[-60:]


def _adapter_targets(args) -> tuple[str, ...]:
    return TARGET_MODULES if args.lora_targets == "all" else tuple(args.lora_targets.split(","))


def _adapter_optim_args(args, **more) -> argparse.Namespace:
    """``args`` as optimize() reads them for adapter training."""
    return argparse.Namespace(**{**vars(args), "steps": args.adapter_steps, "lr": args.adapter_lr,
                                 "weight_decay": 0.0, "grad_accum": 1, **more})


def _adapter_meta(args, task: Task, first_loss: float | None, last_loss: float | None, **more) -> str:
    """The meteora_adapter.json written beside a trained adapter."""
    return json.dumps({"task": task.name, "source": task.source, "base": str(args.base), "steps": args.adapter_steps,
                       "lr": args.adapter_lr, "batch_size": args.batch_size, "max_length": args.max_length, **more,
                       "first_loss": first_loss, "last_loss": last_loss}, indent=2)


def train_adapter(args, task: Task, folder: Path, ctx: Dist) -> Path:
    """Fine-tune one PEFT LoRA adapter on ``task`` and save it (atomically) in ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.base, dtype=_model_dtype(args, ctx), device=ctx.device)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(_adapter_targets(args)), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = encode_tasks(tokenizer, [task], [0], args.rows_per_task, args.max_length)
    if args.composite_rows and len(task.parts) > 1:  # a union's LoRA sees the gates' composite rows too
        examples += composite_examples(tokenizer, task.parts, args.composite_rows, args.max_length, args.seed)
    batches = Batches(examples, args.batch_size, args.seed, tokenizer.pad_token_id)

    def loss_fn(batch):
        loss = lm_loss(model, batch)
        return loss, {"lm": loss}

    history = optimize(model, params, batches, loss_fn, _adapter_optim_args(args), Dist(device=ctx.device),
                       f"adapter {task.name}")

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "meteora_adapter.json").write_text(_adapter_meta(
            args, task, history[0]["lm"] if history else None, history[-1]["lm"] if history else None))

    atomic_folder(folder, save)
    return folder


def joint_backward(model: MeteoRAModel, batch: dict[str, torch.Tensor], tasks: int, micro_rows: int) -> torch.Tensor:
    """Backward of sum over tasks of each task's mean LM loss over its own tokens in ``batch``, every
    token routed to its task's expert (route_by_labels), in micro-batches of ``micro_rows`` rows;
    returns the (tasks,) mean losses. Expert t's gradient is that of its task's rows alone."""
    row_task = batch["task_labels"][:, 0]  # every token of a row carries its task (padding, at the end: -1)
    tokens = (batch["labels"][:, 1:] != -100).sum(1).float()
    counts = torch.zeros(tasks, device=tokens.device).index_add_(0, row_task, tokens).clamp(min=1)
    per_task = torch.zeros(tasks, device=tokens.device)
    for start in range(0, row_task.numel(), micro_rows):
        micro = {k: v[start:start + micro_rows] for k, v in batch.items()}
        length = int(micro["attention_mask"].sum(1).max())  # right padding: trim to this micro-batch's rows
        micro = {k: v[:, :length] for k, v in micro.items()}
        here = row_task[start:start + micro_rows]
        with model.route_by_labels(micro["task_labels"]):  # backward inside: checkpointing recomputes
            ce = lm_loss_rows(model, micro)
            (ce / counts[here]).sum().backward()
        per_task.index_add_(0, here, ce.detach())
    return per_task / counts


def clip_experts(model: MeteoRAModel, max_norm: float) -> torch.Tensor:
    """Clip each expert's gradient (its lora_A and lora_B rows in every layer) to ``max_norm`` on its
    own; returns the (N,) norms before clipping."""
    grads = [p.grad for layer in model.meteora_layers().values() for p in (layer.lora_A, layer.lora_B)
             if p.grad is not None]
    squares = sum(g.float().pow(2).sum(dim=tuple(range(1, g.dim()))) for g in grads)
    norms = squares.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))
    return norms


def train_adapters_jointly(args, tasks: Sequence[Task], folders: Sequence[Path], ctx: Dist) -> None:
    """Fine-tune one LoRA adapter per task side by side, as N experts of one model with every
    token routed to its own task's expert (MeteoRAModel.route_by_labels): a step runs batch_size
    rows of every task (TaskBatches: the batches each would get alone), in micro-batches (one task
    each on the CPU, several on a GPU). Each adapter's loss is the mean over its own task's tokens
    of the step, its gradient is clipped on its own and Adam's state is per parameter, so each
    trains as it would alone. Each is saved as a PEFT adapter folder (atomically) with its
    meteora_adapter.json."""
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.base, dtype=_model_dtype(args, ctx), device=ctx.device)
    model = new_experts(base, [t.name for t in tasks], args.lora_r, args.lora_alpha, _adapter_targets(args),
                        args.lora_dropout)
    params = model.lora_parameters()
    for p in params:
        p.data = p.data.float()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = len(tasks)
    examples = encode_tasks(tokenizer, tasks, list(range(n)), args.rows_per_task, args.max_length)
    batches = TaskBatches(examples, args.batch_size, args.seed, tokenizer.pad_token_id)
    first: list[torch.Tensor] = []  # per-task mean loss at the first and the last step
    last: list[torch.Tensor] = []

    # Micro-batches: on the CPU batch_size rows (one task each: two small GEMMs per linear, as PEFT);
    # on a GPU several tasks in one forward (launch-bound at this size; the grouped LoRA kernels).
    micro_rows = args.joint_micro_rows or (args.batch_size if ctx.device.type == "cpu" else
                                           args.batch_size * max(1, min(n, 128 // args.batch_size)))

    def backward_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        means = joint_backward(model, batch, n, micro_rows)
        clip_experts(model, args.clip)
        if not first:
            first.append(means.cpu())
        last[:] = [means.cpu()]
        return {"loss": means.sum(), "lm": means.mean()}

    optimize(model, params, batches, None, _adapter_optim_args(args, clip=math.inf), Dist(device=ctx.device),
             f"{n} adapters", backward_fn=backward_fn)
    for index, (task, folder) in enumerate(zip(tasks, folders)):
        meta = _adapter_meta(args, task, float(first[0][index]) if first else None,
                             float(last[0][index]) if last else None, trained_with=[t.name for t in tasks])
        model.save_adapter(index, folder, lora_alpha=args.lora_alpha, extra={"meteora_adapter.json": meta})


def ensure_adapters(args, tasks: Sequence[Task], ctx: Dist) -> dict[str, Path]:
    """An adapter folder per task: given (--adapter), already trained (skipped) or trained now.
    Under torchrun each rank trains its share of the missing ones."""
    given = dict(_pairs(args.adapter))
    paths, missing = {}, []
    for task in tasks:
        if task.name in given:
            paths[task.name] = Path(given[task.name])
            continue
        folder = adapter_dir(args, task.name)
        paths[task.name] = folder
        if (folder / "adapter_config.json").is_file():
            if ctx.main:
                log.info("adapter %s: reusing %s", task.name, folder)
        else:
            missing.append(task)
    mine = missing[ctx.rank::ctx.world]
    if args.joint_adapters and len(mine) > 1:
        started = time.perf_counter()
        train_adapters_jointly(args, mine, [paths[t.name] for t in mine], ctx)
        log.info("adapters %s: trained side by side in %.0f s -> %s", ", ".join(t.name for t in mine),
                 time.perf_counter() - started, paths[mine[0].name].parent)
        mine = []
    for task in mine:
        started = time.perf_counter()
        train_adapter(args, task, paths[task.name], ctx)
        log.info("adapter %s: trained in %.0f s -> %s", task.name, time.perf_counter() - started, paths[task.name])
    ctx.barrier()
    return paths


def _pairs(items: Sequence[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for item in items or []:
        if "=" not in item:
            raise TrainError(f"expected name=path, got {item!r}")
        name, path = item.split("=", 1)
        pairs.append((name.strip(), path.strip()))
    return pairs


# -- gates --------------------------------------------------------------------------------------
def _model_dtype(args, ctx: Dist) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]


def build_model(args, names: Sequence[str], adapter_paths: dict[str, Path], ctx: Dist):
    """The MeteoRA model to train: fresh from the adapters, or a checkpoint (--from) grown by
    --add-adapter. Trainable parameters are kept in fp32 (a bf16 base computes in bf16)."""
    dtype = _model_dtype(args, ctx)
    fsdp = ctx.enabled
    # The frozen base is loaded in the compute dtype, under FSDP2 too (its mixed-precision policy
    # then casts only the fp32 trained weights for the all-gather): each GPU holds 1/G of a bf16 copy.
    base, tokenizer = load_base_model(args.base if not args.from_ckpt else _ckpt_base(args), dtype=dtype)
    new_index = None
    if args.from_ckpt:
        model = load(args.from_ckpt, base_model=base)
        for name in names[model.num_experts:]:
            new_index = model.add_adapter(name, adapter_paths[name])
    else:
        model = from_adapters(base, {n: adapter_paths[n] for n in names}, top_k=args.top_k,
                              temperature=args.temperature)
    model.set_trainable(gates=True, loras=args.train_loras)
    model.to(ctx.device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.grad_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        _shard(model, ctx, dtype)
    return model, tokenizer, new_index


def _shard(model: MeteoRAModel, ctx: Dist, dtype: torch.dtype) -> None:
    """FSDP2: every decoder layer, then the whole model (embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # An explicit mesh on our device: the default one is on CUDA whenever a GPU is visible, even for
    # a gloo run on the CPUs (seen on the GPU box: rank 1 asked for cuda:1 and failed).
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
        MixedPrecisionPolicy()
    inner = model.model
    layers = getattr(getattr(inner, "model", inner), "layers", None)
    if layers is None:
        raise TrainError(f"cannot find the decoder layers of {type(inner).__name__} to shard")
    for module in model.meteora_layers().values():
        module.packable = False  # FSDP owns the storage of the parameters
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(inner, mesh=mesh, mp_policy=policy)


def _ckpt_base(args) -> str:
    config = json.loads((Path(args.from_ckpt) / "meteora_config.json").read_text())
    return args.base if args.base_given else config["base_model"]


def train_gates(args, tasks: Sequence[Task], adapter_paths: dict[str, Path], ctx: Dist):
    """Train the gates (and the LoRA experts unless --no-train-loras); write the checkpoint; (model, tokenizer)."""
    out = Path(args.out)
    names = [t.name for t in tasks]
    model, tokenizer, new_index = build_model(args, names, adapter_paths, ctx)
    if new_index is not None and ctx.enabled:
        raise TrainError("--add-adapter runs in one process (no torchrun)")
    if model.adapter_names != names:
        raise TrainError(f"the checkpoint's adapters {model.adapter_names} do not match the tasks {names}")
    examples = encode_tasks(tokenizer, tasks, range(len(tasks)), args.rows_per_task, args.max_length)
    if args.composite_rows:
        if len(tasks) < 2:
            raise TrainError("--composite-rows needs at least two tasks")
        examples += composite_examples(tokenizer, tasks, args.composite_rows, args.max_length, args.seed)
    batches = Batches(examples, args.batch_size, args.seed, tokenizer.pad_token_id, ctx.rank, ctx.world)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = params
    if new_index is not None:  # only the newcomer's gate rows learn; the old routing stays as it was
        params = groups = model.gate_parameters()
        for p in params:
            keep = torch.zeros(p.shape[0], 1, device=p.device, dtype=p.dtype)
            keep[new_index:] = 1
            p.register_hook(lambda grad, keep=keep: grad * keep)
        args.weight_decay = 0.0
    elif args.train_loras:  # the LoRA experts at their own learning rate
        groups = [{"params": model.gate_parameters()},
                  {"params": model.lora_parameters(), "lr": args.lora_lr}]
    model.record_routing(True, local=args.local_gate_loss)

    def loss_fn(batch):
        loss, parts = meteora_loss(lm_loss(model, batch), model, batch["task_labels"], gate_weight=args.gate_weight)
        parts["acc"] = gate_accuracy(model, batch["task_labels"])
        return loss, parts

    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        log.info("gates: %d tasks (%s), %d training rows, %d trainable parameters, %d process(es) on %s",
                 len(tasks), ", ".join(names), len(examples), sum(p.numel() for p in params), ctx.world, ctx.device)
    ctx.barrier()
    history = optimize(model, groups, batches, loss_fn, args, ctx, "gates", out=out, resume=args.resume)
    model.record_routing(False)
    state = model.meteora_state_dict()  # every rank gathers (FSDP2), rank 0 writes
    if ctx.main:
        model.save_pretrained(out, state_dict=state)
        # A grown checkpoint (--from) keeps what its experts came from: the source run's adapters and
        # whether they were trained further (eval's per-task oracle reads both).
        source = read_run(args.from_ckpt) if args.from_ckpt else {}
        run = {"tasks": [{"name": t.name, "source": t.source} for t in tasks],
               "adapters": {**source.get("adapters", {}), **{n: str(p) for n, p in adapter_paths.items()}},
               "experts_trained": args.train_loras or experts_trained(source), "data_dir": args.data_dir,
               "base": str(args.base if not args.from_ckpt else _ckpt_base(args)), "world_size": ctx.world,
               "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
               "first": history[0] if history else None, "last": history[-1] if history else None}
        _atomic_write(out / RUN_NAME, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=2)))
        log.info("gates: checkpoint written to %s", out)
    ctx.barrier()
    return model, tokenizer


# -- a short report -----------------------------------------------------------------------------
def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the positions whose next token is a response token (LM labels != -100), i.e.
    whose routing generates the answer (the last prompt token up to the response's second last)."""
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != -100
    return answer


def template_head(tokenizer) -> list[int]:
    """The tokens ``format_prompt`` puts before every prompt (the chat template's opening turns):
    the same for every task, so no gate can know the task there."""
    a, b = (tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in ("alpha", "7 Zulu"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:  # the common prefix (a space before the prompt joins its word)
        n += 1
    return a[:n]


@torch.no_grad()
def report(model: MeteoRAModel, tokenizer, tasks: Sequence[Task], args, ctx: Dist) -> dict:
    """Gate accuracy per task on its test rows (teacher forced), over all tokens, over the
    positions that generate the answer (each one's next token is the response's) and over the
    template's tokens before the question (``template_head``; rows cut on the left have none),
    and one generation per task with the adapter each new token used. Every rank runs it (FSDP2
    needs them in step); rank 0 prints."""
    model.eval()
    model.record_routing(True)
    names = model.adapter_names
    head_ids = template_head(tokenizer)
    accuracy, answer_accuracy, head_accuracy = {}, {}, {}
    for label, task in enumerate(tasks):
        examples = encode_tasks(tokenizer, [task], [label], args.eval_rows, args.max_length, split="test")
        hits = {"all": [0.0, 0], "answer": [0.0, 0], "head": [0.0, 0]}
        for start in range(0, len(examples), args.batch_size):
            chunk = examples[start:start + args.batch_size]
            batch = collate(chunk, tokenizer.pad_token_id, ctx.device)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            answer = answer_positions(batch["labels"])
            head = torch.zeros_like(answer)
            for row, e in enumerate(chunk):
                if head_ids and e.input_ids[:len(head_ids)] == head_ids:
                    head[row, :len(head_ids)] = True
            task_labels = batch["task_labels"]
            for part, labels in (("all", task_labels), ("answer", task_labels.masked_fill(~answer, -1)),
                                 ("head", task_labels.masked_fill(~head, -1))):
                tokens = int((labels >= 0).sum())
                if tokens:
                    hits[part][0] += float(gate_accuracy(model, labels)) * tokens
                    hits[part][1] += tokens
        accuracy[task.name] = hits["all"][0] / max(hits["all"][1], 1)
        answer_accuracy[task.name] = hits["answer"][0] / max(hits["answer"][1], 1)
        if hits["head"][1]:
            head_accuracy[task.name] = hits["head"][0] / hits["head"][1]
    model.record_routing(False)
    samples = []
    stop = stop_tokens(model, tokenizer)
    for task in tasks:
        if not task.test:
            continue
        row = task.test[0]
        ids = tokenizer(format_prompt(tokenizer, row["prompt"]), add_special_tokens=False,
                        return_tensors="pt").input_ids.to(ctx.device)
        with model.trace_routing() as trace:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.sample_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        new = out[0, ids.shape[1]:].tolist()
        weights = trace.token_adapter_weights()[ids.shape[1] - 1: ids.shape[1] - 1 + len(new)]
        samples.append({"task": task.name, "prompt": row["prompt"], "reference": row["response"],
                        "answer": tokenizer.decode(new, skip_special_tokens=True),
                        "tokens": [tokenizer.decode([t]) for t in new],
                        "adapters": [names[int(w.argmax())] for w in weights]})
    if ctx.main:
        print("\ngate accuracy on test rows (share of gates whose top-1 is the task's adapter), over all tokens"
              f" | the positions that generate the answer | the {len(head_ids)} template tokens before the question"
              f" (chance: 1/{len(names)}):")
        pct = lambda v: "     -" if v is None else f"{v:6.1%}"  # noqa: E731
        for name, acc in accuracy.items():
            print(f"  {name:40s} {acc:6.1%} | {answer_accuracy[name]:6.1%} | {pct(head_accuracy.get(name))}")
        mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
        print(f"  {'mean':40s} {pct(mean(accuracy))} | {pct(mean(answer_accuracy))} | {pct(mean(head_accuracy))}")
        for s in samples:
            print(f"\n[{s['task']}] {s['prompt'][-160:]!r}\n  reference: {s['reference'][:120]!r}\n"
                  f"  answer:    {s['answer'][:120]!r}\n  token -> adapter: "
                  + " ".join(f"{t!r}:{a}" for t, a in zip(s["tokens"], s["adapters"])))
    return {"gate_accuracy": accuracy, "gate_accuracy_answer": answer_accuracy, "gate_accuracy_template": head_accuracy,
            "samples": samples}


def stop_tokens(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the EOS the responses were trained with, then the model's
    own (they differ for SmolLM2 converted from GGUF by some transformers versions)."""
    own = getattr(model.generation_config, "eos_token_id", None)
    own = [] if own is None else list(own) if isinstance(own, (list, tuple)) else [own]
    return [tokenizer.eos_token_id] + [t for t in own if t != tokenizer.eos_token_id]


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m meteora.train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", nargs="?", default="all", choices=["all", "adapters", "gates"],
                        help="all: adapters that are missing, then gates, then a short report")
    g = parser.add_argument_group("data")
    g.add_argument("--tasks", default=",".join(data_mod.DEFAULT_TASKS),
                   help="comma-separated task specs: BIG-bench task names, name=path (folder with train.jsonl "
                        "[+ test.jsonl] or a .jsonl file), or Hugging Face dataset ids")
    g.add_argument("--data-dir", help="a folder of task folders / .jsonl files, looked up by task name")
    g.add_argument("--rows-per-task", type=int, default=1000, help="training rows used per task")
    g.add_argument("--max-length", type=int, default=256, help="tokens per row (prompt left-truncated)")
    g = parser.add_argument_group("model")
    g.add_argument("--base", default=DEFAULT_MODEL, help="base model: smollm2 (embedded), a folder or a hub id")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="base model dtype (auto: bf16 on GPU, fp32 on CPU); trained weights stay fp32")
    g.add_argument("--grad-checkpointing", action="store_true")
    g = parser.add_argument_group("adapters")
    g.add_argument("--adapters-dir", help="where per-task adapters live (default: the cache)")
    g.add_argument("--adapter", action="append", metavar="NAME=PATH", help="use this existing PEFT adapter for NAME")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="all", help="'all' (the 7 LLaMA linears) or a comma list")
    g.add_argument("--adapter-steps", type=int, default=30)
    g.add_argument("--adapter-lr", type=float, default=1e-3)
    g.add_argument("--joint-adapters", action="store_true",
                   help="train the missing adapters side by side, as experts of one model with each token on its "
                        "task's expert (one forward for all; each adapter's loss, clipping and Adam state its own)")
    g.add_argument("--joint-micro-rows", type=int, default=0,
                   help="rows per forward with --joint-adapters (0: --batch-size on a CPU, up to 128 rows of "
                        "several tasks on a GPU)")
    g = parser.add_argument_group("gates")
    g.add_argument("--out", default="runs/default", help="checkpoint folder")
    g.add_argument("--steps", type=int, default=40, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=float, default=0.1, help="share of steps")
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--gate-weight", type=float, default=50.0, help="lambda of L_LM + lambda * CE_gate")
    g.add_argument("--composite-rows", type=int, default=0,
                   help="add this many composite rows to the gate data: 2-5 numbered questions of different "
                        "tasks in one prompt, each question's and answer line's tokens labelled with its task; "
                        "to a union task's adapter (NAME=a+b+...) the same rows of its tasks")
    g.add_argument("--train-loras", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="train the LoRA experts with the gates, as the authors' script does (default: on, but off "
                        "with --add-adapter; --no-train-loras: the gates alone, the experts as the adapters were)")
    g.add_argument("--local-gate-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="the gate cross-entropy trains each gate alone (its logits from the gate's input, detached): "
                        "the experts then learn from the LM loss only (--no-local-gate-loss: the cross-entropy's "
                        "gradient also reaches every earlier layer through the hidden states)")
    g.add_argument("--lora-lr", type=float, default=5e-4,
                   help="learning rate of the LoRA experts when they train (the authors' script's; --lr is the gates')")
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--checkpoint-every", type=int, default=20)
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--from", dest="from_ckpt", help="a MeteoRA checkpoint to grow with --add-adapter")
    g.add_argument("--add-adapter", action="append", metavar="NAME=PATH",
                   help="append this adapter to --from; only its gate rows are trained (NAME is its task)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-rows", type=int, default=24, help="test rows per task in the report")
    g.add_argument("--sample-tokens", type=int, default=16)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.train_loras = getattr(args, "train_loras", None)  # unset: decided below
    args.base_given = any(a == "--base" or a.startswith("--base=") for a in (argv or []))
    if args.add_adapter and not args.from_ckpt:
        parser.error("--add-adapter needs --from CKPT")
    for name in ("steps", "batch_size", "grad_accum", "rows_per_task", "max_length", "adapter_steps", "lora_r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.composite_rows < 0:
        parser.error("--composite-rows must be >= 0")
    if args.lora_lr <= 0:
        parser.error("--lora-lr must be > 0")
    if args.train_loras and args.add_adapter:
        parser.error("--train-loras cannot go with --add-adapter: only the newcomer's gate rows learn there")
    if args.train_loras is None:
        args.train_loras = not args.add_adapter
    return args


def task_list(args) -> list[str]:
    """Task specs in adapter order; with --from, the checkpoint's tasks first, then the new ones."""
    specs = [s for s in args.tasks.split(",") if s.strip()]
    if args.from_ckpt:
        ckpt = Path(args.from_ckpt)
        config = json.loads((ckpt / "meteora_config.json").read_text())
        run = read_run(ckpt)
        sources = {t["name"]: t["source"] for t in run.get("tasks", [])}
        args.data_dir = args.data_dir or run.get("data_dir")
        old = [f"{n}={sources[n].split(':', 1)[1]}" if sources.get(n, "").startswith("bigbench:")
               else (f"{n}={sources[n]}" if n in sources else n) for n in config["adapters"]]
        explicit = {data_mod.parse_task_spec(s)[0]: s for s in specs} if args.tasks_given else {}
        specs = [explicit.get(n, spec) for n, spec in zip(config["adapters"], old)]
        specs += [explicit.get(name, name) for name, _ in _pairs(args.add_adapter)]
    return specs


def main(argv: Sequence[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    args.tasks_given = any(a == "--tasks" or a.startswith("--tasks=") for a in raw)
    ctx = init_dist(args.device)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; ours are the ones that matter
    logging.basicConfig(level=logging.INFO if ctx.main else logging.WARNING, format="%(message)s")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.perf_counter()
    try:
        specs = task_list(args)
        if ctx.main:  # the first process converts BIG-bench data (and the embedded model) into the cache
            tasks = data_mod.load_tasks(specs, args.data_dir)
            if ctx.enabled and not args.from_ckpt and str(args.base) == DEFAULT_MODEL:
                default_model_dir()
        ctx.barrier()
        if not ctx.main:
            tasks = data_mod.load_tasks(specs, args.data_dir)
        if ctx.main:
            log.info("data: %s", ", ".join(f"{t.name} ({len(t.train)} train / {len(t.test)} test)" for t in tasks))
        adapter_paths = ensure_adapters(args, tasks, ctx) if not args.from_ckpt else {}
        if args.from_ckpt:
            adapter_paths.update(dict(_pairs(args.add_adapter)))
        if args.command == "adapters":
            return
        model, tokenizer = train_gates(args, tasks, {k: Path(v) for k, v in adapter_paths.items()}, ctx)
        if args.command == "all" or args.from_ckpt:
            summary = report(model, tokenizer, tasks, args, ctx)
            if ctx.main:
                _atomic_write(Path(args.out) / "report.json",
                              lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, ensure_ascii=False)))
        if ctx.main:
            print(f"\ncheckpoint: {args.out}   total time {time.perf_counter() - started:.0f} s "
                  f"({ctx.world} process(es), {ctx.device})")
    except (data_mod.DataError, AdapterError, CheckpointError, TrainError, FileNotFoundError) as err:
        print(f"meteora.train: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
