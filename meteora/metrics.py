"""Task metrics of the MeteoRA suite (TASKS.md): accuracy (exact / contained), the gsm8k number rule,
strategyqa's yes/no rule, corpus BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score)."""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def clean(output: str, prompt: str = "") -> str:
    """Lower-cased output with the prompt removed when the output repeats it, stripped."""
    if prompt and output.startswith(prompt):
        output = output[len(prompt):]
    return output.strip().lower()


def exact(output: str, answer: str, prompt: str = "") -> bool:
    return clean(output, prompt) == answer.strip().lower()


def contained(output: str, answer: str, prompt: str = "") -> bool:
    return answer.strip().lower() in clean(output, prompt)


def _number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def gsm8k_prediction(output: str) -> float | None:
    """The number after "The answer is", else the last number of the output."""
    lowered = output.lower()
    if "the answer is" in lowered:
        found = _number(output[lowered.rindex("the answer is") + len("the answer is"):])
        if found is not None:
            return found
    numbers = _NUMBER.findall(output)
    return float(numbers[-1].replace(",", "")) if numbers else None


def gsm8k_answer(reference: str) -> float | None:
    """The number after "####" (the dataset's format), else the reference's last number."""
    if "####" in reference:
        return _number(reference.split("####")[-1])
    return gsm8k_prediction(reference)


def gsm8k(output: str, reference: str) -> bool:
    predicted, wanted = gsm8k_prediction(output), gsm8k_answer(reference)
    return predicted is not None and wanted is not None and abs(predicted - wanted) < 1e-6


def yes_no(text: str) -> str | None:
    """"yes" or "no" when it stands in the first 5 characters (lower-cased), else None."""
    head = text.strip().lower()[:5]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def strategyqa(output: str, reference: str) -> bool:
    wanted = yes_no(reference)
    return wanted is not None and yes_no(output) == wanted


def corpus_bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU with one reference stream aligned with the outputs (0-100)."""
    import sacrebleu

    if len(outputs) != len(references):
        raise ValueError(f"corpus_bleu: {len(outputs)} outputs but {len(references)} references")
    if not outputs:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(outputs), [list(references)]).score)


def rouge(outputs: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures averaged over the samples (0-1)."""
    from rouge_score import rouge_scorer

    if len(outputs) != len(references):
        raise ValueError(f"rouge: {len(outputs)} outputs but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for output, reference in zip(outputs, references):
        for key, value in scorer.score(reference, output).items():
            totals[key] += value.fmeasure
    return {k: v / max(1, len(outputs)) for k, v in totals.items()}


CORPUS_METRICS = ("bleu", "bleu_rouge")  # the headline is corpus BLEU: not a mean over rows


def row_hits(metric: str, outputs: Sequence[str], references: Sequence[str],
             prompts: Sequence[str] | None = None) -> list[float]:
    """Per-row headline of an accuracy metric (1.0 / 0.0): ``score``'s headline is their mean."""
    prompts = prompts or [""] * len(outputs)
    if metric in ("exact", "contained"):
        rule = exact if metric == "exact" else contained
        return [float(rule(o, r, p)) for o, r, p in zip(outputs, references, prompts)]
    if metric in ("gsm8k", "strategyqa"):
        rule = gsm8k if metric == "gsm8k" else strategyqa
        return [float(rule(o, r)) for o, r in zip(outputs, references)]
    raise ValueError(f"row_hits: {metric!r} is not an accuracy metric")


def score(metric: str, outputs: Sequence[str], references: Sequence[str],
          prompts: Sequence[str] | None = None) -> dict[str, float]:
    """The task's scores: always a ``score`` key (the headline: accuracy, or BLEU / 100), plus the
    metric's parts. ``metric`` is one of data.TASK_METRICS' values."""
    if metric in ("exact", "contained", "gsm8k", "strategyqa"):
        acc = sum(row_hits(metric, outputs, references, prompts)) / max(1, len(outputs))
        if metric != "strategyqa":
            return {"score": acc, "accuracy": acc}
        return {"score": acc, "accuracy": acc, "bleu": corpus_bleu(outputs, references),
                **rouge(outputs, references)}
    if metric == "bleu":
        bleu = corpus_bleu(outputs, references)
        return {"score": bleu / 100, "bleu": bleu}
    if metric == "bleu_rouge":
        bleu = corpus_bleu(outputs, references)
        return {"score": bleu / 100, "bleu": bleu, **rouge(outputs, references)}
    raise ValueError(f"unknown metric {metric!r}")
