"""meteora.metrics on hand-made cases; python -m meteora.eval end to end on a tiny checkpoint; the
routing pictures."""

from __future__ import annotations

import json
import re

import pytest
import torch

import meteora
from meteora import eval as meteora_eval
from meteora import train
from meteora import PromptVote, metrics


def test_accuracy_rules():
    assert metrics.exact("  Valid \n", "valid") and not metrics.exact("Valid.", "valid")
    assert metrics.exact("Q: 2+2?\nA: four", "four", prompt="Q: 2+2?\nA:")  # the prompt is stripped
    assert metrics.contained("I think it is Four.", "four") and not metrics.contained("fourteen?", "forty")
    assert metrics.score("exact", ["a", "b", "c", "d"], ["a", "B", "x", "y"]) == {"score": 0.5, "accuracy": 0.5}
    assert metrics.score("contained", [], []) == {"score": 0.0, "accuracy": 0.0}


def test_gsm8k_rule():
    assert metrics.gsm8k("3 + 4 = 7, so 7 + 5 = 12. The answer is 12.", "steps... #### 12")
    assert metrics.gsm8k("It costs 1,250 dollars", "#### 1250")  # no "The answer is": the last number
    assert not metrics.gsm8k("The answer is 11. Check: 12", "#### 12")  # "The answer is" wins
    assert metrics.gsm8k("-3.50", "#### -3.5") and not metrics.gsm8k("no number", "#### 3")
    assert metrics.gsm8k_prediction("the answer is: 42 apples and 7 pears") == 42


def test_strategyqa_rule():
    assert metrics.strategyqa("Yes, because...", "Yes. Frost is common in December.")
    assert metrics.strategyqa("no.", "No. Whales are mammals.")
    assert not metrics.strategyqa("Maybe yes", "Yes. ...")  # "yes" must be in the first 5 characters
    assert not metrics.strategyqa("No", "Yes.")
    scores = metrics.score("strategyqa", ["Yes, it is", "No"], ["Yes. It is.", "Yes. It is."])
    assert scores["accuracy"] == 0.5 and set(scores) >= {"bleu", "rouge1", "rouge2", "rougeL"}


def test_bleu_is_corpus_level_with_aligned_references():
    hyps = ["the cat sat on the mat", "a completely different sentence here"]
    refs = ["the cat sat on the mat", "a completely different sentence here"]
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(100.0)
    # Every hypothesis is scored against its own reference: swapping the references must hurt.
    assert metrics.corpus_bleu(hyps, refs[::-1]) < 10
    # The authors' call ([[gt] for gt in gts]) scores the first hypothesis against all references;
    # ours sees the second hypothesis too: a bad second output lowers the score.
    assert metrics.corpus_bleu([hyps[0], "zzz qqq"], refs) < 70
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        metrics.corpus_bleu(hyps, refs[:1])


def test_rouge_averages_over_samples():
    got = metrics.rouge(["the cat sat", "dogs bark loudly"], ["the cat sat", "cats meow"])
    assert got["rouge1"] == pytest.approx(0.5) and got["rougeL"] == pytest.approx(0.5)
    assert metrics.score("bleu_rouge", ["a b c d"], ["a b c d"])["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("f1", ["a"], ["a"])


def test_eval_end_to_end_writes_every_output(trained, tmp_path):
    out = tmp_path / "eval"
    summary = meteora_eval.evaluate(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(out), "--limit", "4", "--composite-samples", "3",
        "--composite-decoding", "numbered,free", "--max-new-tokens", "4", "--max-new-tokens-long", "6", "--device", "cpu", "--quiet",
        "--baseline", "adapter", "--baseline", "base", "--baseline", f"mixed={trained / 'adapters' / 'count'}", "--line-vote",
        "--segment-oracle"]))
    assert summary["systems"] == ["meteora", "adapter", "base", "mixed"]
    assert set(summary["tasks"]) == {"count", "reverse", "upper"}
    for by_system in summary["tasks"].values():
        assert set(by_system) == set(summary["systems"])
        assert all(0.0 <= s["score"] <= 1.0 for s in by_system.values())
    assert set(summary["composite"]) == {"composite-3", "composite-3 (free)"}
    # no single adapter to force on a mixed prompt: the adapter system answers numbered composites
    # line by line, each line on its own sub-task's adapter, and skips the free ones
    assert set(summary["composite"]["composite-3"]) == {"meteora", "line-vote", "segment", "adapter", "base", "mixed"}
    assert set(summary["line_vote_accuracy"]) == {"composite-3"} and 0 <= summary["line_vote_accuracy"]["composite-3"] <= 1
    assert set(summary["composite"]["composite-3 (free)"]) == {"meteora", "base", "mixed"}
    for composite in summary["composite"].values():
        assert set(composite["meteora"]) == {"count", "reverse", "upper", "sum", "attempted"}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 * 4 + 2 * 3 * 3 + 3 + 3 + 3
    numbered = [r["output"] for r in rows if r["task"] == "composite-3"]
    assert all(re.fullmatch(r"1\. [^\n]*\n2\. [^\n]*\n3\. [^\n]*", o) for o in numbered), numbered
    assert {r["system"] for r in rows} == set(summary["systems"]) | {"line-vote", "segment"}  # composites only
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "results.md").read_text()
    numbered_table, free_table = table.split("composite-3 (free)")[0].split("composite-3")[1], table.split("composite-3 (free)")[1]
    assert "| **mean** |" in table and "| adapter |" in numbered_table and "| adapter |" not in free_table
    assert "adapter: each answer line generated on its own sub-task's adapter" in numbered_table
    assert "| line-vote |" in numbered_table and "| line-vote |" not in free_table and "line-vote: each answer" in numbered_table
    assert "| segment |" in numbered_table and "| segment |" not in free_table and "segment: every token" in numbered_table
    boot = summary["bootstrap"]  # over the three single tasks only
    assert boot["tasks"] == 3 and set(boot["mean"]) == set(summary["systems"])
    for system, (point, lo, hi) in boot["mean"].items():
        mean = sum(summary["tasks"][t][system]["score"] for t in summary["tasks"]) / 3
        assert point == pytest.approx(mean) and lo <= point + 1e-9 and point <= hi + 1e-9
    assert set(boot["meteora_vs"]) == {"adapter", "base", "mixed"} and "MeteoRA vs adapter: ratio" in table
    assert "NaN" not in (out / "summary.json").read_text()
    same = summary["same_output_as_meteora"]
    assert set(same) == {"adapter", "base", "mixed"} and all(m == 4 * 3 and 0 <= n <= m for n, m in same.values())
    assert f"adapter {same['adapter'][0]} of 12" in table
    comp_boot = summary["composite_bootstrap"]  # every composite's sum, over its prompts
    assert set(comp_boot) == set(summary["composite"])
    for label, got in comp_boot.items():
        assert got["prompts"] == 3 and set(got["sum"]) == set(summary["composite"][label])
        for system, (point, lo, hi) in got["sum"].items():
            assert point == pytest.approx(summary["composite"][label][system]["sum"]) and lo <= point + 1e-9 <= hi + 2e-9
        assert set(got["meteora_vs"]) == set(summary["composite"][label]) - {"meteora"}
    assert table.count("Sum with its 95% interval (paired bootstrap over the 3 prompts") == 2
    gates = summary["composite_routing"]  # once per composite, either decoding: the same prompts
    assert set(gates) == {"composite-3"} and set(gates["composite-3"]["answer"]) == {"count", "reverse", "upper"}
    assert table.count("MeteoRA's gates on these prompts") == 1


def test_same_outputs_counts_rows_by_position():
    """Rows are matched by task and position (the same prompt may occur twice), MeteoRA's own left out."""
    rows = [{"system": s, "task": t, "prompt": "p", "output": o}
            for s, t, outs in (("meteora", "a", "xyz"), ("meteora", "b", "uv"), ("adapter", "a", "xqz"),
                               ("adapter", "b", "uv"), ("base", "a", "qqq"))
            for o in outs]
    assert meteora_eval.same_outputs(rows, ["meteora", "adapter", "base"]) == {"adapter": [4, 5], "base": [0, 3]}


def test_bootstrap_intervals():
    """The paired bootstrap: its full-sample row is the mean over tasks (accuracy and corpus-BLEU
    tasks), a system against itself has a zero-width interval, a clearly better one a positive one."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        ref = f"answer {i}"
        right = torch.rand(2, generator=gen) < torch.tensor([0.9, 0.3])
        for system, ok in zip(("meteora", "mixed"), right.tolist()):
            rows.append({"system": system, "task": "object_counting", "reference": ref,
                         "output": ref if ok else "no idea"})
            # a corpus-BLEU task, the same outputs for both
            rows.append({"system": system, "task": "linguistics_puzzles", "reference": f"the cat sat on mat {i}",
                         "output": f"the cat sat on the mat {i}"})
    rows += [dict(r, system="twin") for r in rows if r["system"] == "meteora"]
    boot = meteora_eval.bootstrap(rows, ["meteora", "mixed", "twin"], resamples=300, seed=1)
    assert boot["tasks"] == 2 and boot["resamples"] == 300
    for system in ("meteora", "mixed"):
        got = [r for r in rows if r["system"] == system]
        acc = metrics.score("exact", [r["output"] for r in got if r["task"] == "object_counting"],
                            [r["reference"] for r in got if r["task"] == "object_counting"])["score"]
        bleu = metrics.score("bleu", [r["output"] for r in got if r["task"] == "linguistics_puzzles"],
                             [r["reference"] for r in got if r["task"] == "linguistics_puzzles"])["score"]
        assert boot["mean"][system][0] == pytest.approx((acc + bleu) / 2)
    assert boot["meteora_vs"]["twin"]["ratio"] == pytest.approx([1.0, 1.0, 1.0])
    assert boot["meteora_vs"]["twin"]["difference"] == pytest.approx([0.0, 0.0, 0.0])
    lo = boot["meteora_vs"]["mixed"]["difference"][1]
    assert lo > 0, boot["meteora_vs"]["mixed"]
    assert meteora_eval.bootstrap([], ["meteora"]) == {}


def test_composite_bootstrap_intervals():
    """Composite sums: the full-sample row is score_composite's sum (an accuracy and a corpus-BLEU
    sub-task), a system against its twin has a zero-width interval, a clearly better one a positive
    one, and a composite with no prompts is left out."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(3)
    tasks = [SimpleNamespace(name="object_counting", metric="exact"), SimpleNamespace(name="puzzles", metric="bleu")]
    rows = [{"answers": [f"{i}", f"the cat sat on mat {i}"]} for i in range(50)]
    outputs = {}
    for system, p in (("meteora", 0.9), ("mixed", 0.2)):
        right = (torch.rand(50, generator=gen) < p).tolist()
        outputs[system] = [f"1. {i if ok else 'no'}\n2. the cat sat on the mat {i}" for i, ok in enumerate(right)]
    outputs["twin"] = outputs["meteora"]
    parts = {"composite-2": {s: meteora_eval.composite_parts(tasks, rows, o) for s, o in outputs.items()},
             "composite-9": {"meteora": [("exact", [], [])]}}
    boot = meteora_eval.composite_bootstrap(parts, resamples=300, seed=2)
    assert set(boot) == {"composite-2"} and boot["composite-2"]["prompts"] == 50
    for system, out in outputs.items():
        assert boot["composite-2"]["sum"][system][0] == pytest.approx(
            meteora_eval.score_composite(tasks, rows, out)["sum"])
    vs = boot["composite-2"]["meteora_vs"]
    assert vs["twin"]["difference"] == pytest.approx([0.0, 0.0, 0.0])
    assert vs["mixed"]["difference"][1] > 0, vs["mixed"]
    # every other system against the mixed LoRA: MeteoRA's twin has MeteoRA's difference, MeteoRA
    # itself is left to meteora_vs
    assert set(boot["composite-2"]["vs_mixed"]) == {"twin"}
    assert boot["composite-2"]["vs_mixed"]["twin"]["difference"] == pytest.approx(vs["mixed"]["difference"])


@pytest.mark.parametrize("packed", [False, True])
def test_rescore_recomputes_composite_intervals_from_samples(tmp_path, packed):
    """--rescore: from an evaluation folder's summary.json and samples (plain or gzipped), the
    composite bootstrap is the one composite_bootstrap gives on the same outputs (sub-tasks in the
    summary's order, answers and references split from the numbered lines), both files are
    rewritten with it (no temporary file left), and a folder without samples is a one-line error."""
    import gzip
    import json
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    tasks = [SimpleNamespace(name="object_counting", metric="exact"), SimpleNamespace(name="strategyqa", metric="strategyqa")]
    rows = [{"answers": [f"{i}", "Yes. Because." if i % 3 else "No. Never."]} for i in range(40)]
    outputs = {s: [f"1. {i if torch.rand((), generator=gen) < p else 'x'}\n2. {'Yes. So.' if torch.rand((), generator=gen) < p else 'No.'}"
                   for i in range(40)] for s, p in (("meteora", 0.8), ("segment", 0.6), ("mixed", 0.3))}
    parts = {"composite-2": {s: meteora_eval.composite_parts(tasks, rows, o) for s, o in outputs.items()}}
    summary = {"checkpoint": "ckpt", "device": "cpu", "limit": 0, "offset": 0, "systems": ["meteora", "mixed"], "tasks": {},
               "composite": {"composite-2": {s: meteora_eval._composite_scores(tasks, p) for s, p in parts["composite-2"].items()}}}
    samples = [{"system": s, "task": "composite-2", "prompt": "q", "output": o,
                "reference": f"1. {r['answers'][0]}\n2. {r['answers'][1]}"} for s, outs in outputs.items() for o, r in zip(outs, rows)]
    text = "".join(json.dumps(r) + "\n" for r in samples)
    if packed:
        with gzip.open(tmp_path / "samples.jsonl.gz", "wt") as f:
            f.write(text)
    else:
        (tmp_path / "samples.jsonl").write_text(text)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    meteora_eval.main(["--rescore", str(tmp_path), "--bootstrap", "200", "--quiet"])
    got = json.loads((tmp_path / "summary.json").read_text())
    want = meteora_eval.composite_bootstrap(parts, 200)["composite-2"]
    assert got["composite_bootstrap"]["composite-2"] == want and set(want["vs_mixed"]) == {"segment"}
    assert got["composite"] == summary["composite"]
    assert "segment - mixed" in (tmp_path / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["summary.json", "results.md",
                                                                 "samples.jsonl.gz" if packed else "samples.jsonl"])
    (tmp_path / ("samples.jsonl.gz" if packed else "samples.jsonl")).unlink()
    with pytest.raises(SystemExit) as err:
        meteora_eval.main(["--rescore", str(tmp_path)])
    assert err.value.code == 2


def test_composite_routing_counts_each_sub_task_on_its_own_lines(trained, task_dir):
    """composite_routing: teacher-forced over composite prompts and their reference answers, the
    share of gates picking each sub-task's adapter over its question's and its answer line's
    tokens. With every gate zeroed all logits tie, ties go to the lowest index: the first adapter
    is picked everywhere (1.0 for its sub-task, 0.0 for the others); with the trained gates every
    share is a fraction, and the model's gates are left as they were."""
    from meteora import data

    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    tasks = data.load_tasks(["count", "reverse", "upper"][::-1], str(task_dir))  # sub-tasks not in adapter order
    rows = data.build_composite(tasks, samples=3, seed=5)
    got = meteora_eval.composite_routing(model, tokenizer, tasks, rows, device, batch_size=2)
    assert set(got) == {"question", "answer"}
    for part in got.values():
        assert set(part) == {t.name for t in tasks} and all(0.0 <= v <= 1.0 for v in part.values())
    assert all(layer.routing is None for layer in model.meteora_layers().values())  # recording switched off
    first = model.adapter_names[0]
    for layer in model.meteora_layers().values():
        layer.gate.weight.data.zero_()
    tied = meteora_eval.composite_routing(model, tokenizer, tasks, rows, device, batch_size=3)
    for part in tied.values():
        assert part == {t.name: (1.0 if t.name == first else 0.0) for t in tasks}, part


def test_question_votes_count_each_question_s_own_tokens(trained, task_dir, monkeypatch):
    """question_votes: per composite row and sub-question, the adapter most voted over that
    question's tokens. With votes that put each sub-question's tokens (as training labels them) on
    its task's adapter and every other token (more of them) on the last adapter, the votes are the
    sub-tasks' adapters; a question whose line is missing from the prompt gets -1; with the real
    gates every vote is an adapter."""
    from meteora import data
    from meteora.train import composite_tokens

    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    tasks = data.load_tasks(["count", "reverse", "upper"][::-1], str(task_dir))
    rows = data.build_composite(tasks, samples=2, seed=3)
    index = {name: model.adapter_index(name) for name in model.adapter_names}
    real = model.top1_votes
    assert all(0 <= v < model.num_experts for vs in meteora_eval.question_votes(model, tokenizer, rows, device) for v in vs)
    calls = []

    def synthetic(ids, *a):
        labels = torch.tensor([task for _, task in composite_tokens(tokenizer, rows[len(calls)], index)[0]])
        calls.append(1)
        assert labels.shape == ids.shape[1:] and int((labels < 0).sum()) > int((labels >= 0).sum())
        picks = torch.where(labels >= 0, labels, model.num_experts - 1)
        return torch.nn.functional.one_hot(picks, model.num_experts).float().unsqueeze(0) * 7

    monkeypatch.setattr(model, "top1_votes", synthetic)
    assert meteora_eval.question_votes(model, tokenizer, rows, device) == [[index[t.name] for t in tasks]] * 2
    monkeypatch.setattr(model, "top1_votes", real)
    gone = [dict(rows[0], prompt=rows[0]["prompt"].replace("2. " + rows[0]["questions"][1], "2. ?"))]
    assert meteora_eval.question_votes(model, tokenizer, gone, device)[0][1] == -1


def test_segment_oracle_routes_every_token_by_its_segment(trained, task_dir, monkeypatch):
    """Segments: sub-question j's tokens (as training labels them) and answer line j's on sub-task
    j's adapter, every other token and the generated ones on the current line's; the prefill gets
    those labels left-padded with -1, each one-token step the line's adapter. With one adapter for
    every segment it writes what forcing that adapter writes."""
    from meteora import data
    from meteora.train import composite_tokens, format_prompt

    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    tasks = data.load_tasks(["count", "reverse", "upper"][::-1], str(task_dir))  # lines not in adapter order
    rows = data.build_composite(tasks, samples=2, seed=11)
    index = {name: model.adapter_index(name) for name in model.adapter_names}
    own = [index[t.name] for t in tasks]
    seg = meteora_eval.segments_for(model, tokenizer, tasks, rows)
    assert seg.line_adapters == own and own != sorted(own)
    head = format_prompt(tokenizer, rows[0]["prompt"])
    trained_labels = [label for _, label in composite_tokens(tokenizer, rows[0], index)[0]]
    assert len(trained_labels) == len(tokenizer(head, add_special_tokens=False).input_ids)
    for line in (1, 3):
        body = "".join(f"{j}. a{j} b\n" for j in range(1, line)) + f"{line}. "
        got = seg.labels(tokenizer, head + body, head, seg.spans[0], line)
        assert got[:len(trained_labels)] == [own[line - 1] if t < 0 else t for t in trained_labels]
        assert set(trained_labels) - {-1} == set(own)  # every question has tokens
        tail = [tokenizer.decode(t) for t in tokenizer(head + body, add_special_tokens=False).input_ids[len(trained_labels):]]
        lines_of = "".join(tail).split("\n")
        assert len(lines_of) == line
        expect, at = [], 0
        for piece in tail:  # the numbered lines: line j's tokens (its number and its line end) on adapter j
            expect.append(own[min(at, line - 1)])
            at += piece.count("\n")
        assert got[len(trained_labels):] == expect
    seen = []
    real = model.route_by_labels
    monkeypatch.setattr(model, "route_by_labels", lambda labels: seen.append(labels.clone()) or real(labels))
    prompts = [r["prompt"] for r in rows]
    meteora_eval.generate_numbered(model, tokenizer, prompts, [2, 2, 2], 2, device, segments=seg)
    line, steps = 0, 0
    for labels in seen:  # line 1's prefill, its one-token steps, line 2's prefill, ...
        assert labels.shape[0] == 2
        if labels.shape[1] > 1:
            line += 1
            assert labels[:, -1].tolist() == [own[line - 1]] * 2  # "i. ": the line's own adapter
            for j in range(2):  # each row: its labels after its left padding (-1)
                text = format_prompt(tokenizer, prompts[j])
                width = len(tokenizer(text, add_special_tokens=False).input_ids)
                row = labels[j].tolist()
                unpadded = row[next(k for k, x in enumerate(row) if x >= 0):]  # -1: the left padding only
                assert min(unpadded) >= 0 and set(unpadded) <= set(own)
                assert unpadded[:width] == [own[line - 1] if t < 0 else t for _, t in
                                            composite_tokens(tokenizer, rows[j], index)[0]]
        else:
            steps += 1
            assert labels.tolist() == [[own[line - 1]]] * 2
    assert line == 3 and steps > 0
    lengths = [len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids) for p in prompts]
    if lengths[0] != lengths[1]:  # the shorter row's left padding is unlabelled
        assert int(seen[0][lengths.index(min(lengths)), 0]) == -1
    assert next(iter(model.meteora_layers().values())).token_experts is None  # released
    monkeypatch.setattr(model, "route_by_labels", real)
    one = meteora_eval.Segments([[(lo, hi, 1) for lo, hi, _ in s] for s in seg.spans], [1, 1, 1])
    labelled = meteora_eval.generate_numbered(model, tokenizer, prompts, [3, 3, 3], 2, device, segments=one)
    model.force_adapter(1)
    try:
        forced = meteora_eval.generate_numbered(model, tokenizer, prompts, [3, 3, 3], 2, device)
    finally:
        model.force_adapter(None)
    assert labelled == forced
    slow = type("Slow", (), {"is_fast": False})()
    with pytest.raises(meteora_eval.CheckpointError, match="segment-oracle needs a fast tokenizer"):
        meteora_eval.segments_for(model, slow, tasks, rows)


def test_adapter_baseline_from_folders_is_the_per_task_oracle(trained, tmp_path):
    """--baseline adapter=DIR forces the PEFT adapters DIR/<task>, not the checkpoint's experts:
    after the experts changed (as --train-loras changes them) it still answers as the adapters do."""
    changed = meteora.load(trained / "run")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in changed.meteora_layers().values():
            layer.lora_B.normal_(0, 1.0)
    changed.save_pretrained(tmp_path / "changed")
    run = train.read_run(trained / "run")  # its tasks' data
    run["experts_trained"] = False  # first as a gates-only run: its experts are its adapters
    (tmp_path / "changed" / "train_run.json").write_text(json.dumps(run))

    def outputs(model, baseline):
        out = tmp_path / f"eval_{len(list(tmp_path.iterdir()))}"
        meteora_eval.evaluate(meteora_eval.parse_args([
            "--model", str(model), "--out", str(out), "--limit", "3", "--composite", "", "--max-new-tokens", "4",
            "--device", "cpu", "--quiet", "--baseline", baseline]))
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        return [(r["task"], r["output"]) for r in rows if r["system"] == baseline.partition("=")[0]]

    adapters = trained / "adapters"
    oracle = outputs(trained / "run", "adapter")
    assert len(oracle) == 9
    assert outputs(trained / "run", f"adapter={adapters}") == oracle
    assert outputs(tmp_path / "changed", f"adapter={adapters}") == oracle
    assert outputs(tmp_path / "changed", "adapter") != oracle
    with pytest.raises(meteora_eval.CheckpointError, match=r"adapter=.*no PEFT adapter folder for count, reverse, upper"):
        outputs(trained / "run", f"adapter={tmp_path}")
    assert outputs(tmp_path / "changed", "experts") == outputs(tmp_path / "changed", "adapter")  # gates-only run
    # A checkpoint trained with --train-loras (train_run.json says so): its default oracle is the
    # adapters its experts started from, as train_run.json names them; `experts` forces its own.
    run["experts_trained"] = True
    (tmp_path / "changed" / "train_run.json").write_text(json.dumps(run))
    assert outputs(tmp_path / "changed", "adapter") == oracle
    assert outputs(tmp_path / "changed", "experts") != oracle
    del run["experts_trained"]  # a run written before that key: the --train-loras flag says it
    (tmp_path / "changed" / "train_run.json").write_text(json.dumps(run))
    assert not run["args"]["train_loras"] or outputs(tmp_path / "changed", "adapter") == oracle
    run["args"]["train_loras"] = True
    run["adapters"] = {name: str(tmp_path / "gone" / name) for name in run["adapters"]}
    (tmp_path / "changed" / "train_run.json").write_text(json.dumps(run))
    with pytest.raises(meteora_eval.CheckpointError, match=r"experts were trained .* are gone .*: no PEFT adapter folder for count"):
        outputs(tmp_path / "changed", "adapter")
    assert outputs(tmp_path / "changed", f"adapter={adapters}") == oracle
    with pytest.raises(SystemExit) as info:  # both oracles in one run would share one name, one column
        meteora_eval.main(["--model", str(trained / "run"), "--out", str(tmp_path / "twice"), "--device", "cpu",
                           "--baseline", "adapter", "--baseline", f"adapter={adapters}"])
    assert info.value.code == 2


def test_eval_limit_zero_scores_composites_only(trained, tmp_path):
    out = tmp_path / "eval"
    summary = meteora_eval.evaluate(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(out), "--limit", "0", "--composite-samples", "2",
        "--max-new-tokens", "3", "--max-new-tokens-long", "3", "--device", "cpu", "--quiet", "--baseline", "base"]))
    assert summary["tasks"] == {} and summary["bootstrap"] == {}
    assert set(summary["composite"]) == {"composite-3"} and set(summary["composite"]["composite-3"]) == {"meteora", "base"}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["task"] for r in rows} == {"composite-3"}
    table = (out / "results.md").read_text()
    assert "composite-n prompts only" in table and "| **mean** |" not in table and "| task |" not in table
    assert "MeteoRA - base" in table and "writes exactly MeteoRA's text" not in table  # no single-task rows to match
    with pytest.raises(meteora_eval.CheckpointError, match="nothing to evaluate"):
        meteora_eval.evaluate(meteora_eval.parse_args(["--model", str(trained / "run"), "--out", str(out), "--limit", "0",
                                                       "--composite", "", "--device", "cpu", "--quiet"]))


def test_numbered_decoding_writes_each_number_and_keeps_the_answers(trained):
    """Each sub-answer is generated after everything before it plus "i. ", and only its first line
    is kept: the calls the model sees are checked one by one."""
    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    seen, real = [], model.generate

    forced = []

    def spy(**kw):
        seen.append(tokenizer.batch_decode(kw["input_ids"], skip_special_tokens=False))
        forced.append(next(iter(model.meteora_layers().values())).forced_mask)
        out = real(**kw)
        width = kw["input_ids"].shape[1]
        step = len(seen)  # the model "answers" line one, newline, garbage: only line one is kept
        extra = tokenizer([f" ans{step}\nnoise"] * out.shape[0], return_tensors="pt", add_special_tokens=False).input_ids
        return torch.cat([out[:, :width], extra], 1)

    model.generate = spy
    try:
        prompts = ["Count: cat dog", "Reverse: abc"]
        replies = meteora_eval.generate_numbered(model, tokenizer, prompts, [3, 5, 4], 2, device)
        assert forced == [None] * 3
        # before_line: the per-line oracle forces line i's sub-task before its answers are generated
        order = ["upper", "count", "reverse"]
        per_line = meteora_eval.generate_numbered(model, tokenizer, prompts, [3, 5, 4], 2, device,
                                                  before_line=lambda i: model.force_adapter(order[i - 1]))
        model.force_adapter(None)
        # line_adapters: per prompt and line; prompts that share one generate together, -1 left to the gates
        sizes = []
        real_greedy = meteora_eval._greedy
        meteora_eval._greedy = lambda m, tok, texts, *a: sizes.append(len(texts)) or real_greedy(m, tok, texts, *a)
        try:
            voted = meteora_eval.generate_numbered(model, tokenizer, prompts, [3, 5, 4], 2, device,
                                                   line_adapters=[[0, 1, -1], [0, 2, -1]])
        finally:
            meteora_eval._greedy = real_greedy
    finally:
        del model.generate
    assert [m.nonzero().flatten().tolist() for m in forced[3:6]] == [[model.adapter_index(t)] for t in order]
    assert per_line == ["1. ans4\n2. ans5\n3. ans6"] * 2
    assert len(seen) == 10 and sizes == [2, 1, 1, 2] and forced[-1] is None  # line 2 split by adapter, line 3 on the gates
    assert [m.nonzero().flatten().tolist() for m in forced[6:9]] == [[0], [1], [2]]
    assert voted[0].startswith("1. ans7\n2. ans8\n3. ans10") and voted[1].startswith("1. ans7\n2. ans9\n3. ans10")
    assert next(iter(model.meteora_layers().values())).forced_mask is None
    seen = seen[:3]
    assert replies == ["1. ans1\n2. ans2\n3. ans3"] * 2
    for i, texts in enumerate(seen, 1):
        for text, prompt in zip(texts, prompts):
            body = text.replace(tokenizer.pad_token, "")
            # the harness writes "i." and the model " answer": no prompt ends in a lone space token
            assert prompt in body and body.endswith("".join(f"{j}. ans{j}\n" for j in range(1, i)) + f"{i}.")


def test_eval_routing_override(trained, tmp_path, capsys):
    """--top-k / --temperature replace the checkpoint's routing for every gate (recorded in the
    summary and the table); an impossible k is a one-line error that names the option."""
    model, _, _ = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu", "--top-k", "1", "--temperature", "0.5"]))
    assert (model.top_k, model.temperature) == (1, 0.5)
    assert {(m.top_k, m.temperature) for m in model.meteora_layers().values()} == {(1, 0.5)}
    summary = meteora_eval.evaluate(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(tmp_path / "e"), "--limit", "2", "--composite", "",
        "--max-new-tokens", "2", "--max-new-tokens-long", "2", "--device", "cpu", "--quiet", "--baseline", "none",
        "--top-k", "1"]))
    assert summary["routing"]["top_k"] == 1 and "routing top-1" in (tmp_path / "e" / "results.md").read_text()
    with pytest.raises(SystemExit) as info:
        meteora_eval.main(["--model", str(trained / "run"), "--out", str(tmp_path), "--device", "cpu", "--top-k", "9"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--top-k" in err and "top_k=9" in err and err.count("\n") == 1


@pytest.mark.parametrize("phase", ["prompt", "answer"])
def test_phase_force_routes_one_phase_by_the_adapter(trained, tmp_path, phase):
    """prompt-adapter / answer-adapter: the task's adapter on the prefill (forwards over more than
    one token) or on the one-token decode steps, the gates on the other; the first generated token's
    logits come from the prefill, so they equal the adapter's (prompt) or MeteoRA's (answer)."""
    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    layer = next(iter(model.meteora_layers().values()))
    seen = []
    spy = layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[-2], m.forced_mask is not None)))
    ids = tokenizer(["Count: cat dog bird"], return_tensors="pt").input_ids

    def first_logits():
        out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        return out.scores[0]

    gated = first_logits()
    model.force_adapter("count")
    forced = first_logits()
    model.force_adapter(None)
    assert not torch.equal(gated, forced)  # the adapter alone and the gates differ on this prompt
    seen.clear()
    force = meteora_eval.PhaseForce(model, phase)
    force.force("count")
    mixed = first_logits()
    force.release()
    spy.remove()
    prefill = phase == "prompt"
    assert seen == [(ids.shape[1], prefill), (1, not prefill), (1, not prefill)]
    torch.testing.assert_close(mixed, forced if prefill else gated, rtol=0, atol=0)
    assert force._handle is None and all(m.forced_mask is None for m in model.meteora_layers().values())
    summary = meteora_eval.evaluate(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(tmp_path / "e"), "--limit", "2", "--composite-samples", "2",
        "--max-new-tokens", "2", "--max-new-tokens-long", "2", "--device", "cpu", "--quiet",
        "--baseline", f"{phase}-adapter"]))
    assert summary["systems"] == ["meteora", f"{phase}-adapter"]
    assert all(set(c) == {"meteora"} for c in summary["composite"].values())  # forced systems skip them
    with pytest.raises(ValueError, match="phase"):
        meteora_eval.PhaseForce(model, "both")


def test_prompt_vote_runs_the_prompt_on_the_gates_choice(trained, tmp_path):
    """prompt-vote: one forward over the prompt in which every gate votes its top-1 expert at every
    unpadded token; the prefill then runs each row on its most voted expert (the first generated
    token's logits are that adapter's), the decode steps on the gates; no task label is used, so
    composite prompts are evaluated too."""
    model, tokenizer, device = meteora_eval.load_checkpoint(meteora_eval.parse_args(
        ["--model", str(trained / "run"), "--device", "cpu"]))
    layers = list(model.meteora_layers().values())
    with meteora_eval._left_padding(tokenizer):
        batch = tokenizer(["Count: cat dog bird", "Reverse: abc def ghi jkl mno"], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    assert not mask.all()  # the rows differ in length: left padding
    for layer in layers:
        layer.record_routing = True
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    expected = torch.zeros(2, model.num_experts)
    for layer in layers:
        top1 = layer.routing.expert_idx[:, 0].view(ids.shape)
        for row in range(2):
            expected[row] += torch.bincount(top1[row][mask[row].bool()], minlength=model.num_experts)
        layer.record_routing = False
    vote = PromptVote(model)
    labels = vote.vote(ids, mask)
    assert torch.equal(labels, expected.argmax(1, keepdim=True).expand_as(ids).masked_fill(~mask.bool(), -1))
    assert all(layer.routing_hook is None for layer in layers)
    # window W: each token's label is the most voted expert among the tokens at most W from it
    per_token = torch.zeros(*ids.shape, model.num_experts)
    for layer in layers:
        layer.record_routing = True
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for layer in layers:
        per_token += torch.nn.functional.one_hot(layer.routing.expert_idx[:, 0], model.num_experts).view_as(per_token)
        layer.record_routing = False
    per_token *= mask.unsqueeze(-1)
    for window in (0, 2, ids.shape[1]):
        want = torch.stack([per_token[:, max(0, t - window): t + window + 1].sum(1).argmax(1)
                            for t in range(ids.shape[1])], 1).masked_fill(~mask.bool(), -1)
        assert torch.equal(PromptVote(model, window).vote(ids, mask), want), window
    assert torch.equal(PromptVote(model, ids.shape[1]).vote(ids, mask), labels)  # a window over the whole row
    assert not torch.equal(PromptVote(model, 0).vote(ids, mask), labels)  # single tokens vote otherwise here
    with pytest.raises(ValueError, match="window"):
        PromptVote(model, -1)

    one = ids[1:, mask[1].bool()]  # the longer row alone
    winner = int(expected[1].argmax())
    seen = []
    spy = layers[0].register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[-2], m.token_experts is not None)))

    def first_logits():
        out = model.generate(input_ids=one, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        return out.scores[0]

    model.force_adapter(winner)
    forced = first_logits()
    model.force_adapter(None)
    seen.clear()
    with model.vote_prompts() as vote:
        voted = first_logits()
    spy.remove()
    # the vote's forward (gates), the prefill (the winner), two decode steps (gates)
    assert seen == [(one.shape[1], False), (one.shape[1], True), (1, False), (1, False)]
    torch.testing.assert_close(voted, forced, rtol=1e-4, atol=1e-4)
    assert vote._handle is None and all(layer.token_experts is None for layer in layers)
    summary = meteora_eval.evaluate(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(tmp_path / "e"), "--limit", "2", "--composite-samples", "2",
        "--max-new-tokens", "2", "--max-new-tokens-long", "2", "--device", "cpu", "--quiet",
        "--baseline", "prompt-vote", "--baseline", "prompt-vote=4"]))
    assert summary["systems"] == ["meteora", "prompt-vote", "prompt-vote(4)"]
    assert summary["composite"] and all(set(c) == set(summary["systems"]) for c in summary["composite"].values())


def test_eval_rejects_a_task_without_adapter(trained, task_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        meteora_eval.main(["--model", str(trained / "run"), "--tasks", f"other={task_dir / 'count'}",
                           "--out", str(tmp_path), "--device", "cpu"])
    assert info.value.code == 2 and "task 'other' has no adapter" in capsys.readouterr().err


def test_show_composite_draws_a_numbered_generation(trained, tmp_path):
    paths = meteora_eval.show(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(tmp_path), "--device", "cpu", "--quiet",
        "--max-new-tokens", "3", "--max-new-tokens-long", "3", "--show-composite", "own"]))
    page = paths["html"].read_text()
    answer = page.count('class="tok"') - 3  # the legend's three names are plain "tok" spans too
    assert page.count('class="tok prompt"') > 50 and answer >= 6 and paths["png"].is_file()  # >= "1. 2. 3. "


def test_show_draws_the_routing(trained, tmp_path):
    import matplotlib.image

    paths = meteora_eval.show(meteora_eval.parse_args([
        "--model", str(trained / "run"), "--out", str(tmp_path), "--device", "cpu", "--quiet",
        "--max-new-tokens-long", "8", "--show", "Count animals: cat dog horse"]))
    page = paths["html"].read_text()
    assert page.count('class="tok') > 10 and all(name in page for name in ["count", "reverse", "upper"])
    for key in ("png", "usage"):
        image = matplotlib.image.imread(paths[key])
        height, width = image.shape[:2]
        assert width >= 400 and height >= 100
        colours = {tuple(px) for px in image.reshape(-1, image.shape[2])[:: 7].round(2).tolist()}
        assert len(colours) > 10  # more than background and text
