"""python -m meteora.train end to end on a tiny random LLaMA: adapters -> gates -> checkpoint -> reload,
torchrun with 2 gloo processes (FSDP2), resume after kill -9, --add-adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import meteora
from meteora import train

from conftest import common, read_log

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_adapters_gates_checkpoint_reload(trained, tiny_base, task_dir):
    run = trained / "run"
    # per-task adapters are PEFT adapters that peft itself loads
    from peft import PeftModel

    base, _ = meteora.load_base_model(tiny_base)
    for name in ["count", "reverse", "upper"]:
        folder = trained / "adapters" / name
        info = json.loads((folder / "meteora_adapter.json").read_text())
        assert info["task"] == name and info["steps"] == 3
        peft_model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        assert any("lora_A" in n for n, _ in peft_model.named_parameters())
        base = peft_model.unload()
    # the checkpoint reloads, with the adapters in task order and trained gates
    model = meteora.load(run, base_model=meteora.load_base_model(tiny_base)[0])
    assert model.adapter_names == ["count", "reverse", "upper"]
    assert len(model.meteora_layers()) == 14 and model.top_k == 2
    fresh = meteora.from_adapters(meteora.load_base_model(tiny_base)[0],
                                  {n: trained / "adapters" / n for n in model.adapter_names})
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(model.meteora_layers()[name].gate.weight, fresh.meteora_layers()[name].gate.weight)
    # the default trains the LoRA experts too (at --lora-lr 5e-4: 24 Adam steps move a weight < 0.012)
    moved = (model.meteora_layers()[name].lora_A - fresh.meteora_layers()[name].lora_A).abs().max()
    assert 1e-4 < moved < 0.012 and train.read_run(run)["args"]["train_loras"]
    # the gate loss falls and the gates learn the tasks
    history = read_log(run)
    assert [h["step"] for h in history] == list(range(1, 25))
    first, last = sum(h["gate"] for h in history[:4]) / 4, sum(h["gate"] for h in history[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    report = json.loads((run / "report.json").read_text())
    assert set(report["gate_accuracy"]) == {"count", "reverse", "upper"}
    assert sum(report["gate_accuracy"].values()) / 3 > 0.5
    assert set(report["gate_accuracy_answer"]) == {"count", "reverse", "upper"}
    assert all(0.0 <= v <= 1.0 for v in report["gate_accuracy_answer"].values())
    assert set(report["gate_accuracy_template"]) == {"count", "reverse", "upper"}  # "[INST]" before every prompt
    assert all(0.0 <= v <= 1.0 for v in report["gate_accuracy_template"].values())
    assert all(len(s["tokens"]) == len(s["adapters"]) >= 1 for s in report["samples"])
    run_info = train.read_run(run)
    assert [t["name"] for t in run_info["tasks"]] == ["count", "reverse", "upper"]
    assert (run / "checkpoint" / train.STATE_NAME).is_file()
    assert not [p for p in run.rglob("*.tmp")]


def test_template_head_is_what_every_prompt_starts_with(tiny_base, smollm2_dir):
    """train.template_head: the tokens format_prompt puts before the question, the same for every
    prompt: SmolLM2's chat template (an empty system turn, then the user turn's header) and the
    [INST] wrapper of a tokenizer without one."""
    import transformers

    for folder, text in ((smollm2_dir, "<|im_start|>user\n"), (tiny_base, "[INST]")):
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        head = train.template_head(tok)
        assert head and tok.decode(head).rstrip().endswith(text.strip())
        for prompt in ("Count: cat dog", "Q: 2+2?\nA:"):
            ids = tok(train.format_prompt(tok, prompt), add_special_tokens=False).input_ids
            assert ids[:len(head)] == head and tok.decode(ids[len(head):]).lstrip().startswith(prompt[:5])


def test_existing_adapters_are_skipped(trained, tiny_base, task_dir, caplog):
    folder = trained / "adapters" / "count"
    before = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="meteora"):
        train.main(common(tiny_base, task_dir, trained / "adapters", trained / "unused", "adapters",
                          "--tasks", "count,reverse"))
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert "adapter count: reusing" in caplog.text


def test_add_adapter_keeps_old_routing(trained, tiny_base, task_dir, tmp_path):
    base = meteora.load_base_model(tiny_base)[0]
    old = meteora.load(trained / "run", base_model=base)
    train.main(common(tiny_base, task_dir, trained / "adapters", tmp_path / "grown", "gates",
                      "--from", str(trained / "run"), "--add-adapter", f"again={trained / 'adapters' / 'upper'}",
                      "--tasks", f"again={task_dir / 'upper'}", "--steps", "6", "--lr", "2e-2"))
    grown = meteora.load(tmp_path / "grown", base_model=meteora.load_base_model(tiny_base)[0])
    assert grown.adapter_names == ["count", "reverse", "upper", "again"]
    fresh = _embedded(trained, tiny_base)
    grown_run = train.read_run(tmp_path / "grown")
    assert not grown_run["args"]["train_loras"]  # --add-adapter: the experts stay as they were
    assert grown_run["experts_trained"]  # ... which the default run had trained: eval's oracle needs to know
    assert set(grown_run["adapters"]) == {"count", "reverse", "upper", "again"}
    for name, layer in grown.meteora_layers().items():
        before = old.meteora_layers()[name]
        assert torch.equal(layer.gate.weight[:3], before.gate.weight)  # old rows untouched
        assert layer.gate.weight[3].abs().sum() > 0  # the newcomer's row learned
        torch.testing.assert_close(layer.lora_A[:3], before.lora_A)
        torch.testing.assert_close(layer.lora_A[3], fresh.meteora_layers()[name].lora_A[2])  # upper's adapter, as saved
    assert set(json.loads((tmp_path / "grown" / "report.json").read_text())["gate_accuracy"]) == {
        "count", "reverse", "upper", "again"}


def test_bad_task_file_is_a_one_line_error(tiny_base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 1, "response": "r"}\n')
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--base", str(tiny_base), "--tasks", f"bad={bad}", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "bad.jsonl:2: field 'prompt' is a int" in message and "\n" not in message


def _embedded(trained, tiny_base) -> meteora.MeteoRAModel:
    """The fixture's three adapters embedded as experts, untrained: where every gate run starts."""
    return meteora.from_adapters(meteora.load_base_model(tiny_base)[0],
                                 {n: trained / "adapters" / n for n in ["count", "reverse", "upper"]})


def _train_cmd(tiny_base, task_dir, trained, out, *extra):
    adapters = [f"--adapter={n}={trained / 'adapters' / n}" for n in ["count", "reverse", "upper"]]
    return [*common(tiny_base, task_dir, trained / "adapters", out, "gates", "--tasks", "count,reverse,upper",
                    "--lr", "1e-2", *adapters), *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_resume_after_kill_9_matches_an_uninterrupted_run(trained, tiny_base, task_dir, tmp_path):
    steps = ["--steps", "60", "--checkpoint-every", "3", "--train-loras"]
    subprocess.run([sys.executable, "-m", "meteora.train", *_train_cmd(tiny_base, task_dir, trained,
                                                                         tmp_path / "whole", *steps)],
                   check=True, env=_env(), cwd=tmp_path, capture_output=True)
    cmd = [sys.executable, "-m", "meteora.train", *_train_cmd(tiny_base, task_dir, trained, tmp_path / "cut", *steps)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "cut" / train.LOG_NAME
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log_file.is_file() and len(log_file.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(log_file.read_text().splitlines())
    assert killed_at < 60
    state = torch.load(tmp_path / "cut" / "checkpoint" / train.STATE_NAME, weights_only=False)
    assert 3 <= state["step"] <= killed_at
    subprocess.run(cmd + ["--resume"], check=True, env=_env(), cwd=tmp_path, capture_output=True)
    whole, resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert [h["step"] for h in resumed] == list(range(1, 61))
    for a, b in zip(whole, resumed):
        for key in ("loss", "lm", "gate", "acc", "lr"):
            assert a.get(key) == pytest.approx(b.get(key), rel=1e-4, abs=1e-6), (a["step"], key)
    ta = meteora.load(tmp_path / "whole", base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
    tb = meteora.load(tmp_path / "cut", base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-6)


def _torchrun_gates(tiny_base, task_dir, trained, out, *extra) -> subprocess.CompletedProcess:
    """Gate training under torchrun with 2 gloo processes (FSDP2); it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "meteora.train", *_train_cmd(tiny_base, task_dir, trained, out, *extra)]
    result = subprocess.run(cmd, env=_env(), cwd=out.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_torchrun_two_gloo_processes_fsdp2(trained, tiny_base, task_dir, tmp_path):
    out = tmp_path / "fsdp"
    result = _torchrun_gates(tiny_base, task_dir, trained, out, "--steps", "6", "--checkpoint-every", "3")
    assert "2 process(es)" in result.stdout + result.stderr
    single = trained / "run"
    files = {"meteora_config.json", "meteora_model.safetensors", train.RUN_NAME, train.LOG_NAME}
    assert files <= {p.name for p in out.iterdir()} and files <= {p.name for p in single.iterdir()}
    assert (out / "checkpoint" / train.STATE_NAME).is_file()
    from safetensors import safe_open

    with safe_open(str(out / "meteora_model.safetensors"), "pt") as a, \
            safe_open(str(single / "meteora_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).shape == b.get_tensor(key).shape
    model = meteora.load(out, base_model=meteora.load_base_model(tiny_base)[0])
    assert model.adapter_names == ["count", "reverse", "upper"]
    run_info = train.read_run(out)
    assert run_info["world_size"] == 2 and len(read_log(out)) == 6
    # the training state written by 2 processes resumes only with 2
    with pytest.raises(SystemExit):
        train.main(_train_cmd(tiny_base, task_dir, trained, out, "--steps", "8", "--resume"))


def test_gradient_checkpointing_gives_the_same_steps(trained, tiny_base, task_dir, tmp_path):
    logs = []
    for flag in ([], ["--grad-checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        train.main(_train_cmd(tiny_base, task_dir, trained, out, "--steps", "3", "--train-loras", *flag))
        logs.append(read_log(out))
    for a, b in zip(*logs):
        for key in ("loss", "lm", "gate", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_union_adapter_sees_the_gates_composite_rows(tiny_base, task_dir, tmp_path, monkeypatch):
    """--composite-rows N on a union task's adapter (mixed=a+b+c): its rows plus the N composite rows
    the gates would get from the same tasks (same seed): the fair mixed LoRA for --train-loras."""
    from meteora import data as data_mod
    from meteora.base import load_tokenizer

    seen, real = [], train.Batches
    monkeypatch.setattr(train, "Batches", lambda examples, *a, **k: seen.append(list(examples)) or real(examples, *a, **k))
    for rows in ("0", "5"):
        train.main(common(tiny_base, task_dir, tmp_path / f"a{rows}", tmp_path / "unused", "adapters",
                          "--tasks", "mix=count+reverse+upper", "--composite-rows", rows, "--adapter-steps", "1"))
    plain, more = seen
    assert len(more) == len(plain) + 5 and more[:len(plain)] == plain
    tasks = data_mod.load_tasks(["count", "reverse", "upper"], task_dir)
    gates_rows = train.composite_examples(load_tokenizer(str(tiny_base)), tasks, 5, 64, 0)
    assert [e.input_ids for e in more[len(plain):]] == [e.input_ids for e in gates_rows]
    assert all(len({t for t in e.token_tasks if t >= 0}) >= 2 for e in gates_rows)  # each mixes tasks


def test_train_loras_at_their_own_learning_rate(trained, tiny_base, task_dir, tmp_path):
    """--train-loras: the LoRA weights learn at --lora-lr (default 5e-4), the gates at --lr."""
    start = _embedded(trained, tiny_base).meteora_state_dict()

    def moved(*flags):
        out = tmp_path / "_".join(flags).replace("-", "")
        train.main(_train_cmd(tiny_base, task_dir, trained, out, "--steps", "4", "--warmup", "0", "--train-loras", *flags))
        state = meteora.load(out, base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
        lora = max(float((state[k] - start[k]).abs().max()) for k in state if k.endswith(("lora_A", "lora_B")))
        assert 1e-3 < read_log(out)[0]["lr"] <= 1e-2  # the log reports the gates' rate (--lr 1e-2, cosine)
        return lora

    frozen, slow, fast = moved("--lora-lr", "1e-9"), moved(), moved("--lora-lr", "1e-2")
    assert frozen < 1e-6  # Adam's steps are ~lr in size
    assert 1e-5 < slow < 4e-3 < 1e-2 < fast  # --lora-lr 5e-4 by default: 4 Adam steps move a weight < 2.5e-3
    for bad in ("-1", "0"):
        with pytest.raises(SystemExit):
            train.main(_train_cmd(tiny_base, task_dir, trained, tmp_path / "bad", "--lora-lr", bad))


def test_default_trains_the_experts_and_no_train_loras_freezes_them(trained, tiny_base, task_dir, tmp_path, capsys):
    """The default (the authors' script, local gate loss) trains the LoRA experts with the gates;
    --no-train-loras trains the gates alone (the experts stay the adapters bit for bit); the run
    records which; --train-loras with --add-adapter is a one-line error."""
    start = _embedded(trained, tiny_base).meteora_state_dict()

    def run(name, *flags):
        out = tmp_path / name
        train.main(_train_cmd(tiny_base, task_dir, trained, out, "--steps", "3", "--warmup", "0", *flags))
        state = meteora.load(out, base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
        lora = max(float((state[k] - start[k]).abs().max()) for k in state if k.endswith(("lora_A", "lora_B")))
        return lora, train.read_run(out)["args"]

    lora, args = run("default")
    assert lora > 1e-5 and args["train_loras"] and args["local_gate_loss"] and args["lora_lr"] == 5e-4
    lora, args = run("gates_only", "--no-train-loras", "--no-local-gate-loss")
    assert lora == 0.0 and not args["train_loras"] and not args["local_gate_loss"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["gates", "--from", str(trained / "run"), "--add-adapter", "x=DIR", "--train-loras"])
    assert "--train-loras cannot go with --add-adapter" in capsys.readouterr().err


def test_torchrun_bf16_base_with_fp32_gates(trained, tiny_base, task_dir, tmp_path):
    """FSDP2 with the frozen base in bf16 and the trained gates in fp32 (what a GPU run does):
    the mixed-precision policy shards both, the gates come out fp32 and the loss falls."""
    out = tmp_path / "bf16"
    _torchrun_gates(tiny_base, task_dir, trained, out, "--steps", "12", "--dtype", "bf16")
    from safetensors import safe_open

    with safe_open(str(out / "meteora_model.safetensors"), "pt") as f:
        gates = [f.get_tensor(k) for k in f.keys() if k.endswith(".gate")]
    assert gates and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gates)
    log = read_log(out)
    assert sum(h["gate"] for h in log[-3:]) < sum(h["gate"] for h in log[:3])


def test_torchrun_fsdp2_trains_loras_with_the_local_gate_loss(trained, tiny_base, task_dir, tmp_path):
    """FSDP2 with --train-loras --local-gate-loss (the set-up that scores best on the GPU box): the
    local gate logits read each gate's weight inside its layer's forward, where FSDP2 has it
    unsharded; the LoRA experts move, the gates stay finite and the gate loss falls."""
    out = tmp_path / "local"
    _torchrun_gates(tiny_base, task_dir, trained, out, "--steps", "10", "--train-loras", "--lora-lr", "1e-2",
                    "--local-gate-loss")
    assert train.read_run(out)["args"]["local_gate_loss"]
    start = meteora.load(trained / "run", base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
    state = meteora.load(out, base_model=meteora.load_base_model(tiny_base)[0]).meteora_state_dict()
    assert max(float((state[k] - start[k]).abs().max()) for k in state if k.endswith("lora_B")) > 1e-3
    assert all(torch.isfinite(v).all() for v in state.values())
    log = read_log(out)
    assert len(log) == 10 and sum(h["gate"] for h in log[-3:]) < sum(h["gate"] for h in log[:3])


def test_composite_rows_label_each_question_and_answer_line(trained, tiny_base, task_dir, tmp_path):
    """--composite-rows: numbered questions of several tasks in one prompt, each question's and
    answer line's tokens labelled with its own task, the rest unlabelled; gate training runs on them."""
    from meteora import base, data

    tokenizer = base.load_tokenizer(str(tiny_base))
    tasks = data.load_tasks(["count", "reverse", "upper"], task_dir)
    labels = {t.name: i for i, t in enumerate(tasks)}
    row = data.build_composite([tasks[2], tasks[0]], samples=1, seed=5, split="train", shots=1)[0]
    assert row["questions"][0] in [r["prompt"] for r in tasks[2].train]
    e = train.encode_composite(tokenizer, row, labels, max_length=512, group=3)
    assert e.task == 3 and len(e.token_tasks) == len(e.input_ids) == len(e.labels)
    for task, name in ((2, "upper"), (0, "count")):
        text = tokenizer.decode([t for t, k in zip(e.input_ids, e.token_tasks) if k == task])
        i = row["tasks"].index(name)
        assert row["questions"][i] in text and row["answers"][i] in text, (name, text)
    assert 1 not in e.token_tasks and -1 in e.token_tasks  # reverse is absent; the prefix is not labelled
    response = [t for t, lab in zip(e.input_ids, e.labels) if lab != -100]
    assert tokenizer.decode(response[:-1]) == row["response"] and response[-1] == tokenizer.eos_token_id
    assert e.token_tasks[-1] == -1
    batch = train.collate([e, train.encode(tokenizer, tasks[1].train[0], 1, 64)], tokenizer.pad_token_id,
                          torch.device("cpu"))
    assert batch["task_labels"][0, : len(e.input_ids)].tolist() == e.token_tasks
    assert set(batch["task_labels"][1].tolist()) == {1, -1}  # a plain row: its task, then padding

    out = tmp_path / "composite"
    train.main(_train_cmd(tiny_base, task_dir, trained, out, "--steps", "4", "--composite-rows", "6",
                          "--max-length", "160"))
    run_info = train.read_run(out)
    assert run_info["args"]["composite_rows"] == 6
    assert all(r["gate"] == r["gate"] for r in read_log(out))  # finite gate losses
    with pytest.raises(SystemExit):
        train.main(_train_cmd(tiny_base, task_dir, trained, tmp_path / "bad", "--composite-rows", "-1"))


def test_composite_rows_shed_questions_to_fit(tiny_base, task_dir):
    """composite_examples: a row that fits max_length is kept as drawn; a longer one sheds its shot,
    then its last questions, until it fits whole (every sub-task keeps its question and its answer
    line); only a row of two questions may still be cut."""
    from meteora import base, data

    tokenizer = base.load_tokenizer(str(tiny_base))
    tasks = data.load_tasks(["count", "reverse", "upper"], task_dir)

    def parts(e):  # the sub-tasks labelled in the prompt (questions) and in the response (answer lines)
        question = {k for k, lab in zip(e.token_tasks, e.labels) if k >= 0 and lab == -100}
        return question, {k for k, lab in zip(e.token_tasks, e.labels) if k >= 0 and lab != -100}

    roomy = train.composite_examples(tokenizer, tasks, 16, 1 << 16, seed=3)
    for e in roomy:
        question, answer = parts(e)
        assert question == answer and len(answer) in (2, 3)
    limit = sorted(len(e.input_ids) for e in roomy)[len(roomy) // 2]
    tight = train.composite_examples(tokenizer, tasks, 16, limit, seed=3)
    shed = 0
    for drawn, got in zip(roomy, tight):
        if len(drawn.input_ids) <= limit:
            assert got == drawn
            continue
        question, answer = parts(got)
        if len(got.input_ids) <= limit and question == answer:
            shed += 1
            assert len(got.input_ids) < len(drawn.input_ids) and len(answer) <= len(parts(drawn)[1])
        else:
            assert len(got.input_ids) == limit and len(question | answer) <= 2  # cut: two questions did not fit
    assert shed > 0


def test_answer_positions_are_those_that_generate_the_response(tiny_base):
    """The report's answer-token gate accuracy counts the positions whose next token is a response
    token: from the last prompt token to the response's second last, padding excluded."""
    _, tokenizer = meteora.load_base_model(tiny_base)
    prompt, response = [5, 6, 7], [8, 9]
    short = train.Example(input_ids=prompt + response, labels=[-100] * 3 + response, task=0)
    longer = train.Example(input_ids=[4] + prompt + response + [10], labels=[-100] * 4 + response + [10], task=1)
    batch = train.collate([short, longer], tokenizer.pad_token_id, torch.device("cpu"))
    assert train.answer_positions(batch["labels"]).tolist() == [
        [False, False, True, True, False, False, False],
        [False, False, False, True, True, True, False],
    ]


def test_joint_backward_gives_each_expert_its_own_tasks_gradient(tiny_base):
    """Side-by-side adapter training: in a batch mixing two tasks (rows of different lengths,
    micro-batches that split them), each expert's gradient and loss equal those of its task's rows
    alone with the plain mean LM loss; per-expert clipping scales each expert on its own."""
    model = meteora.new_experts(meteora.load_base_model(tiny_base)[0], ["x", "y"], rank=4, lora_alpha=8)
    with torch.no_grad():
        for layer in model.meteora_layers().values():
            layer.lora_B.normal_(std=0.1)  # so that lora_A gets a gradient too
    gen = torch.Generator().manual_seed(5)
    rows = []
    for i, (task, length, answer) in enumerate([(0, 9, 3), (1, 12, 4), (1, 7, 2), (0, 14, 5), (1, 10, 6)]):
        ids = torch.randint(3, 90, (length,), generator=gen).tolist()
        rows.append(train.Example(input_ids=ids, labels=[-100] * (length - answer) + ids[-answer:], task=task))
    batch = train.collate(rows, 0, torch.device("cpu"))
    layers = list(model.meteora_layers().values())
    means = train.joint_backward(model, batch, 2, micro_rows=2)
    joint = [(layer.lora_A.grad.clone(), layer.lora_B.grad.clone()) for layer in layers]
    for task in (0, 1):
        model.zero_grad(set_to_none=True)
        alone = train.collate([r for r in rows if r.task == task], 0, torch.device("cpu"))
        with model.route_by_labels(alone["task_labels"]):
            loss = train.lm_loss(model, alone)
            loss.backward()
        torch.testing.assert_close(means[task], loss.detach(), rtol=1e-5, atol=1e-6)
        for layer, (grad_a, grad_b) in zip(layers, joint):
            torch.testing.assert_close(grad_a[task], layer.lora_A.grad[task], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad_b[task], layer.lora_B.grad[task], rtol=1e-4, atol=1e-6)
            assert layer.lora_B.grad[1 - task].abs().sum() == 0
    # clipping: each expert to its own norm
    for layer, (grad_a, grad_b) in zip(layers, joint):
        layer.lora_A.grad, layer.lora_B.grad = grad_a.clone(), grad_b.clone()
    norms = train.clip_experts(model, 1e-3)
    after = train.clip_experts(model, float("inf"))
    torch.testing.assert_close(after, torch.full_like(after, 1e-3), rtol=1e-3, atol=0)
    assert (norms > 1e-3).all()


def test_joint_adapters_cli(tiny_base, task_dir, tmp_path, caplog):
    """--joint-adapters: the missing adapters trained side by side, saved as PEFT folders that
    meteora embeds, each with its own falling loss."""
    adapters = tmp_path / "adapters"
    with caplog.at_level("INFO", logger="meteora"):
        train.main(common(tiny_base, task_dir, adapters, tmp_path / "unused", "adapters", "--tasks",
                          "count,reverse,upper", "--joint-adapters", "--adapter-steps", "8", "--adapter-lr", "1e-2"))
    assert "adapters count, reverse, upper: trained side by side" in caplog.text
    for name in ("count", "reverse", "upper"):
        meta = json.loads((adapters / name / "meteora_adapter.json").read_text())
        assert meta["trained_with"] == ["count", "reverse", "upper"] and meta["steps"] == 8
        assert meta["last_loss"] < meta["first_loss"], (name, meta)
    model = meteora.from_adapters(meteora.load_base_model(tiny_base)[0],
                                  {n: adapters / n for n in ("count", "reverse", "upper")})
    assert model.adapter_names == ["count", "reverse", "upper"]
    assert not [p for p in adapters.rglob("*.tmp")] and not [p for p in adapters.iterdir() if p.name.startswith(".")]


def test_task_batches_give_every_task_its_rows_each_step():
    """TaskBatches (adapters side by side): each step batch_size rows of every task, task after task,
    every row of a task once per pass, the same steps again from a later start."""
    rows = [train.Example(input_ids=[i] * (1 + i), labels=[i] * (1 + i), task=t)
            for t, n in ((0, 8), (1, 4), (2, 6)) for i in range(n)]
    batches = train.TaskBatches(rows, 2, seed=3, pad_id=0)
    stream = batches.stream()
    steps = [next(stream) for _ in range(6)]
    for step in steps:
        assert [e.task for e in step] == [0, 0, 1, 1, 2, 2]
    seen = [e.input_ids[0] for step in steps[:4] for e in step if e.task == 1]  # 8 draws over 4 rows: 2 passes
    assert sorted(seen[:4]) == [0, 1, 2, 3] and sorted(seen[4:]) == [0, 1, 2, 3]
    later = batches.stream(4)
    assert [[(e.task, e.input_ids) for e in next(later)] for _ in range(2)] == \
        [[(e.task, e.input_ids) for e in step] for step in steps[4:6]]
