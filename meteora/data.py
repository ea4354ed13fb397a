"""Tasks: JSONL rows ``{"prompt", "response"}`` with train and test splits (../TASKS.md).

Sources, tried in this order for each task spec:
  * a local folder holding ``train.jsonl`` (and ``test.jsonl``), or one ``.jsonl`` file;
  * a task folder or file under ``--data-dir`` named like the task;
  * a BIG-bench task of the MeteoRA suite, read offline from the ``bigbench==1.0.0`` sdist (fetched
    once from PyPI into the cache; only the needed ``task.json`` files are extracted);
  * a Hugging Face dataset id with ``prompt`` / ``response`` columns, when the machine is online.

A task without a test split gets 20% of its rows as test (seed 42). Caps: 100k train / 50k test.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .base import cache_dir
from ._files import atomic_write

log = logging.getLogger("meteora")

TRAIN_CAP, TEST_CAP = 100_000, 50_000
SPLIT_SEED, TEST_SHARE = 42, 0.2

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI_SIMPLE = "https://pypi.org/simple"

# The paper's 28 tasks and their metrics (TASKS.md). "hub" tasks need the network.
TASK_METRICS = {
    "abstract_narrative_understanding": "contained",
    "alpaca": "bleu_rouge",
    "cnn_dailymail": "bleu_rouge",
    "contextual_parametric_knowledge_conflicts": "contained",
    "cs_algorithms": "exact",
    "disfl_qa": "contained",
    "elementary_math_qa": "exact",
    "epistemic_reasoning": "exact",
    "formal_fallacies_syllogisms_negation": "exact",
    "goal_step_wikihow": "contained",
    "gsm8k": "gsm8k",
    "language_identification": "contained",
    "linguistics_puzzles": "bleu_rouge",
    "logical_deduction": "contained",
    "news_commentary_de": "bleu",
    "news_commentary_es": "bleu",
    "news_commentary_it": "bleu",
    "object_counting": "contained",
    "paragraph_segmentation": "exact",
    "play_dialog_same_or_different": "contained",
    "question_selection": "contained",
    "reasoning_about_colored_objects": "contained",
    "strategyqa": "strategyqa",
    "topical_chat": "bleu_rouge",
    "tracking_shuffled_objects": "exact",
    "unit_conversion": "exact",
    "vitaminc_fact_verification": "contained",
    "winowhy": "exact",
}
HUB_TASKS = ("alpaca", "cnn_dailymail", "gsm8k", "news_commentary_de", "news_commentary_es", "news_commentary_it")
BIGBENCH_TASKS = tuple(t for t in TASK_METRICS if t not in HUB_TASKS)
# Multiple-choice tasks whose choices are appended to the prompt as "choice: ..." lines.
APPEND_CHOICES = ("logical_deduction", "abstract_narrative_understanding", "tracking_shuffled_objects",
                  "unit_conversion")

# Composite-n: the paper's task lists; offline, hub tasks are replaced by the named BIG-bench tasks.
COMPOSITE_TASKS = {
    3: ["logical_deduction", "question_selection", "strategyqa"],
    5: ["logical_deduction", "question_selection", "strategyqa", "abstract_narrative_understanding",
        "goal_step_wikihow"],
    10: ["logical_deduction", "question_selection", "strategyqa", "abstract_narrative_understanding",
         "goal_step_wikihow", "winowhy", "disfl_qa", "news_commentary_de", "alpaca", "linguistics_puzzles"],
}
OFFLINE_SUBSTITUTES = {"news_commentary_de": "language_identification", "alpaca": "topical_chat"}
COMPOSITE_SAMPLES, COMPOSITE_SEED = 200, 47

# The embedded default run: four BIG-bench tasks with short prompts and distinct styles.
DEFAULT_TASKS = ("object_counting", "cs_algorithms", "winowhy", "unit_conversion")


class DataError(ValueError):
    """Malformed or missing task data; the message names the file (and line) or the task."""


@dataclass
class Task:
    name: str
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    source: str = ""
    parts: tuple["Task", ...] = ()  # a union's tasks (union_task)

    @property
    def metric(self) -> str:
        return TASK_METRICS.get(self.name, "contained")


# -- JSONL ---------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ("prompt", "response")) -> list[dict]:
    """Rows of a JSONL file (gzipped when its name ends in .gz); a malformed row raises DataError
    naming the file and line."""
    path = Path(path)
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str):
                    why = "missing" if key not in row else f"a {type(row[key]).__name__}, not a string"
                    raise DataError(f"{path}:{number}: field '{key}' is {why}")
            rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)
    return path


def split_rows(rows: list[dict], seed: int = SPLIT_SEED, test_share: float = TEST_SHARE) -> tuple[list, list]:
    """(train, test): a seeded shuffle, the last ``test_share`` of it is test."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(rows) * test_share)) if len(rows) > 1 else 0
    cut = len(rows) - n_test
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _capped(task: Task) -> Task:
    task.train, task.test = task.train[:TRAIN_CAP], task.test[:TEST_CAP]
    return task


def load_local_task(name: str, path: str | os.PathLike) -> Task:
    """A folder with train.jsonl [+ test.jsonl] (the authors' layout), or one .jsonl file."""
    path = Path(path)
    if path.is_dir():
        train_file = path / "train.jsonl"
        if not train_file.is_file():
            raise DataError(f"task '{name}': {train_file} not found (a task folder holds train.jsonl and test.jsonl)")
        train = read_jsonl(train_file)
        test_file = path / "test.jsonl"
        if test_file.is_file():
            test = read_jsonl(test_file)
        else:
            train, test = split_rows(train)
    elif path.is_file():
        train, test = split_rows(read_jsonl(path))
    else:
        raise DataError(f"task '{name}': {path} not found")
    if not train:
        raise DataError(f"task '{name}': {path} has no training rows")
    return _capped(Task(name, train, test, str(path)))


# -- BIG-bench -----------------------------------------------------------------------------------
def bigbench_dir() -> Path:
    return cache_dir() / "bigbench"


def bigbench_sdist(download: bool = True) -> Path:
    """The bigbench sdist in the cache (downloaded from PyPI once, checked against its sha256).

    ``METEORA_BIGBENCH_SDIST`` may point at a copy already on disk.
    """
    env = os.environ.get("METEORA_BIGBENCH_SDIST")
    if env:
        if not Path(env).is_file():
            raise DataError(f"METEORA_BIGBENCH_SDIST={env}: no such file")
        return Path(env)
    target = bigbench_dir() / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if target.is_file():
        return target
    if not download:
        raise DataError(f"BIG-bench data not in the cache ({target})")
    index = os.environ.get("METEORA_PYPI_SIMPLE", PYPI_SIMPLE).rstrip("/")
    try:
        page = urllib.request.urlopen(f"{index}/bigbench/", timeout=60).read().decode()
    except OSError as err:
        raise DataError(f"BIG-bench data: cannot reach {index}/bigbench/ ({err}); set METEORA_BIGBENCH_SDIST "
                        f"to a downloaded bigbench-{BIGBENCH_VERSION}.tar.gz") from None
    match = re.search(rf'href="([^"]*bigbench-{re.escape(BIGBENCH_VERSION)}\.tar\.gz)[^"]*"', page)
    if match is None:
        raise DataError(f"BIG-bench data: {index}/bigbench/ lists no bigbench-{BIGBENCH_VERSION}.tar.gz")
    url = match.group(1)
    if url.startswith("/") or not re.match(r"^https?://", url):
        url = urllib.request.urljoin(f"{index}/bigbench/", url)
    log.info("meteora: downloading %s (358 MB, once) into %s", url, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)

    def download(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=120) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != BIGBENCH_SHA256:
            raise DataError(f"BIG-bench data: {url} has sha256 {digest.hexdigest()}, expected {BIGBENCH_SHA256}")

    atomic_write(target, download)
    return target


def bigbench_tasks_dir(tasks: Sequence[str] = BIGBENCH_TASKS, download: bool = True) -> Path:
    """A ``benchmark_tasks`` folder in the cache holding the task.json files of ``tasks``.

    One pass over the sdist extracts every missing task of the MeteoRA suite (about 200 MB), so
    later calls cost nothing. ``METEORA_BIGBENCH_TASKS`` may name such a folder instead.
    """
    env = os.environ.get("METEORA_BIGBENCH_TASKS")
    root = Path(env) if env else bigbench_dir() / "benchmark_tasks"
    missing = [t for t in tasks if not (root / t / "task.json").is_file()]
    if not missing or env:
        return root
    sdist = bigbench_sdist(download)
    wanted = set(missing) | {t for t in BIGBENCH_TASKS if not (root / t / "task.json").is_file()}
    pattern = re.compile(rf"^bigbench-{re.escape(BIGBENCH_VERSION)}/bigbench/benchmark_tasks/([^/]+)/(.*)task\.json$")
    staging = Path(tempfile.mkdtemp(dir=bigbench_dir(), prefix=".extract."))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                match = pattern.match(member.name)
                if match and match.group(1) in wanted and member.isfile():
                    dest = staging / match.group(1) / match.group(2) / "task.json"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        root.mkdir(parents=True, exist_ok=True)
        for folder in staging.iterdir():  # each task folder lands whole, or not at all
            if (root / folder.name).exists():
                shutil.rmtree(root / folder.name)
            os.replace(folder, root / folder.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    absent = [t for t in missing if not (root / t / "task.json").is_file()]
    if absent:
        raise DataError(f"BIG-bench data: {sdist} has no task(s) {', '.join(absent)}")
    return root


def _target(example: dict, where: str) -> str:
    """targets[0]: the first target string, else the first highest-scored choice."""
    target = example.get("target")
    if isinstance(target, list) and target and isinstance(target[0], str):
        return target[0]
    if isinstance(target, str):
        return target
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        best = max(scores.values())
        return next(choice for choice, score in scores.items() if score == best)
    raise DataError(f"{where}: example has neither 'target' nor 'target_scores'")


def convert_bigbench_task(name: str, tasks_dir: str | os.PathLike) -> Task:
    """One BIG-bench task (all of its subtasks) as prompt/response rows, 80/20 split with seed 42.

    prompt = task_prefix + example_input_prefix (default "\\nQ: ") + input [+ "\\nchoice: ..." lines
    for the tasks TASKS.md names] + example_output_prefix (default "\\nA: "), stripped;
    response = targets[0].
    """
    root = Path(tasks_dir) / name
    top = root / "task.json"
    if not top.is_file():
        raise DataError(f"BIG-bench task '{name}': {top} not found")
    files = [top] + sorted(p for p in root.glob("*/task.json"))
    rows: list[dict] = []
    for file in files:
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{file}: not valid JSON ({err.msg})") from None
        examples = spec.get("examples")
        if examples is None:
            continue  # a parent task whose examples live in subtask folders
        if not isinstance(examples, list):
            raise DataError(f"{file}: field 'examples' is not a list")
        prefix = spec.get("task_prefix", "") or ""
        in_prefix = spec.get("example_input_prefix", "\nQ: ")
        out_prefix = spec.get("example_output_prefix", "\nA: ")
        for number, example in enumerate(examples):
            where = f"{file} examples[{number}]"
            if not isinstance(example, dict) or not isinstance(example.get("input"), str):
                raise DataError(f"{where}: needs a string field 'input'")
            prompt = prefix + in_prefix + example["input"]
            if name in APPEND_CHOICES and isinstance(example.get("target_scores"), dict):
                prompt += "".join(f"\nchoice: {c}" for c in example["target_scores"])
            prompt += out_prefix
            rows.append({"prompt": prompt.strip(), "response": _target(example, where).strip()})
    if not rows:
        raise DataError(f"BIG-bench task '{name}': no examples under {root}")
    train, test = split_rows(rows)
    return _capped(Task(name, train, test, f"bigbench:{name}"))


def bigbench_task(name: str, download: bool = True) -> Task:
    """A BIG-bench task, converted once into the cache as train.jsonl / test.jsonl."""
    folder = cache_dir() / "data" / "bigbench" / name
    if (folder / "test.jsonl").is_file() and (folder / "train.jsonl").is_file():
        task = load_local_task(name, folder)
        task.source = f"bigbench:{name}"
        return task
    task = convert_bigbench_task(name, bigbench_tasks_dir([name], download))
    write_jsonl(folder / "test.jsonl", task.test)
    write_jsonl(folder / "train.jsonl", task.train)  # written last: its presence marks a full folder
    return task


def hub_task(name: str, dataset_id: str) -> Task:
    """A Hugging Face dataset with prompt/response columns (needs the network or the hub cache)."""
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id)
    except Exception as err:
        raise DataError(f"task '{name}': not a local path, not a BIG-bench task of the suite, and the "
                        f"Hugging Face dataset '{dataset_id}' could not be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    splits = {k: [dict(prompt=r["prompt"], response=r["response"]) for r in v] for k, v in loaded.items()
              if {"prompt", "response"} <= set(v.column_names)}
    if "train" not in splits:
        raise DataError(f"task '{name}': dataset '{dataset_id}' has no train split with prompt/response columns")
    test = splits.get("test") or splits.get("validation")
    train = splits["train"]
    if test is None:
        train, test = split_rows(train)
    return _capped(Task(name, train, test, f"hub:{dataset_id}"))


def _exists(path: Path) -> bool:
    """Path.exists that says False for names the OS rejects (a long a+b+c union spec, say)."""
    try:
        return path.exists()
    except OSError:
        return False


def parse_task_spec(spec: str) -> tuple[str, str]:
    """``name=source`` or ``source`` (the name is then the file or folder stem)."""
    if "=" in spec:
        name, source = spec.split("=", 1)
        return name.strip(), source.strip()
    source = spec.strip()
    path = Path(source).expanduser()
    return (path.stem if _exists(path) else source), source


def load_task(spec: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Task:
    """Resolve one task spec (see the module docstring)."""
    name, source = parse_task_spec(spec)
    path = Path(source).expanduser()
    if _exists(path):
        return load_local_task(name, path)
    if data_dir is not None:
        for candidate in (Path(data_dir) / source, Path(data_dir) / f"{source}.jsonl"):
            if _exists(candidate):
                return load_local_task(name, candidate)
    if "+" in source:  # a union of tasks, e.g. the mixed-task LoRA's data
        parts = [load_task(part, data_dir, download) for part in source.split("+") if part.strip()]
        return union_task(name, parts)
    if source in BIGBENCH_TASKS:
        return bigbench_task(source, download)
    if source in HUB_TASKS or "/" in source:
        return hub_task(name, source)
    raise DataError(f"task '{name}': '{source}' is not a path, not under --data-dir, not a BIG-bench task of the "
                    f"suite ({', '.join(BIGBENCH_TASKS[:3])}, ...) and not a Hugging Face dataset id")


def union_task(name: str, parts: Sequence[Task]) -> Task:
    """One task made of several: their rows dealt out in turn (so any prefix, e.g. what
    ``--rows-per-task`` keeps, is balanced across them)."""
    def deal(lists):
        return [row for group in itertools.zip_longest(*lists) for row in group if row is not None]

    return Task(name, deal([p.train for p in parts]), deal([p.test for p in parts]),
                "+".join(p.source or p.name for p in parts), tuple(parts))


def load_tasks(specs: Sequence[str], data_dir: str | os.PathLike | None = None, download: bool = True) -> list[Task]:
    tasks = [load_task(s, data_dir, download) for s in specs]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"task names repeat: {', '.join(names)}")
    return tasks


# -- composite-n ---------------------------------------------------------------------------------
def composite_task_names(n: int, offline: bool = True) -> list[str]:
    if n not in COMPOSITE_TASKS:
        raise ValueError(f"composite-n: n must be one of {sorted(COMPOSITE_TASKS)}, got {n}")
    names = COMPOSITE_TASKS[n]
    return [OFFLINE_SUBSTITUTES.get(t, t) if offline else t for t in names]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def composite_lines(prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str]]:
    """The numbered question lines and answer lines of a composite row, as its text holds them."""
    return ([f"{i}. {p}" for i, p in enumerate(prompts, 1)],
            [f"{i}. {_one_line(r)}" for i, r in enumerate(responses, 1)])


def _composite_prompt(prompts: Sequence[str]) -> str:
    return "Questions:\n" + "\n\n".join(composite_lines(prompts, [])[0]) + "\nAnswers:"


def _composite_answer(responses: Sequence[str]) -> str:
    return "\n".join(composite_lines([], responses)[1])


def build_composite(tasks: Sequence[Task], samples: int = COMPOSITE_SAMPLES, seed: int = COMPOSITE_SEED,
                    split: str = "test", shots: int = 2) -> list[dict]:
    """Composite rows: a fixed few-shot prefix of ``shots`` examples (from the train splits), then one
    question per task from ``split``, numbered; the response is ``1. <answer>\\n2. <answer>...``.

    Each row also holds ``tasks`` (sub-task names in order), ``questions`` and ``answers`` (the
    sub-prompts and sub-responses).
    """
    if len(tasks) < 2:
        raise ValueError("composite-n needs at least two tasks")
    for task in tasks:
        if not task.train or not task.test:
            raise DataError(f"composite-n: task '{task.name}' needs train and test rows")
    rng = random.Random(seed)
    examples = []
    for _ in range(shots):
        picked = [rng.choice(t.train) for t in tasks]
        examples.append(_composite_prompt([r["prompt"] for r in picked]) + "\n"
                        + _composite_answer([r["response"] for r in picked]))
    prefix = ("Answer every question, one numbered line per question.\n\n" + "\n\n".join(examples) + "\n\n")
    rows = []
    for _ in range(samples):
        picked = [rng.choice(getattr(t, split)) for t in tasks]
        rows.append({
            "prompt": prefix + _composite_prompt([r["prompt"] for r in picked]),
            "response": _composite_answer([r["response"] for r in picked]),
            "tasks": [t.name for t in tasks],
            "questions": [r["prompt"] for r in picked],
            "answers": [r["response"] for r in picked],
        })
    return rows


_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")


def split_composite_answer(text: str, n: int) -> list[str]:
    """The ``i. <answer>`` lines of a composite generation (empty string where one is missing)."""
    answers = [""] * n
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match and 1 <= int(match.group(1)) <= n and not answers[int(match.group(1)) - 1]:
            answers[int(match.group(1)) - 1] = match.group(2).strip()
    return answers
