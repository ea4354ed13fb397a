"""The benchmark and GPU-box scripts are not imported by other tests: at least they must parse."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import meteora
from meteora import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_scripts_compile(path):
    py_compile.compile(str(path), doraise=True)


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_quality_pipeline_runs_in_four_calls(tiny_base, task_dir, tmp_path):
    """benchmarks/quality.py on a tiny model: the adapters in one call, the gates in the next, the
    evaluation and the composite routing picture in a third, the extra evaluations (top-1, routing
    ablation) in a fourth (what is there kept, times merged), then the tables."""
    import json
    import sys

    out = tmp_path / "q"
    args = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out), "--base", str(tiny_base),
            "--data-dir", str(task_dir), "--tasks", "count,reverse,upper", "--adapter-steps", "2", "--mixed-batch-size", "8",
            "--steps", "3", "--batch-size", "4", "--rows-per-task", "8", "--max-length", "64", "--limit", "2",
            "--composite", "own", "--composite-samples", "2", "--also-top-k", "1"]
    subprocess.run([*args, "--stop-after", "adapters"], check=True, capture_output=True)
    first = json.loads((out / "times.json").read_text())
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["count", "mixed", "reverse", "upper"]
    assert not (out / "meteora").exists()
    mixed = json.loads((out / "adapters" / "mixed" / "meteora_adapter.json").read_text())
    assert mixed["steps"] == 2 * 3 * 4 // 8  # as many rows as the per-task adapters together
    stamp = (out / "adapters" / "count" / "adapter_model.safetensors").stat().st_mtime_ns
    subprocess.run([*args, "--stop-after", "gates"], check=True, capture_output=True)
    assert (out / "meteora" / "report.json").is_file() and not (out / "eval").exists()
    gates = (out / "meteora" / "report.json").stat().st_mtime_ns
    subprocess.run([*args, "--stop-after", "eval"], check=True, capture_output=True)
    assert (out / "eval" / "summary.json").is_file() and (out / "eval" / "routing.png").is_file()
    assert not (out / "eval_top1").exists() and not (out / "quality.md").exists()
    evaluated = (out / "eval" / "summary.json").stat().st_mtime_ns
    subprocess.run([*args, "--ablate-routing"], check=True, capture_output=True)
    assert (out / "eval" / "summary.json").stat().st_mtime_ns == evaluated
    assert (out / "adapters" / "count" / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # kept
    assert (out / "meteora" / "report.json").stat().st_mtime_ns == gates
    times = json.loads((out / "times.json").read_text())
    assert {k: times[k] for k in first} == first  # the adapters' times of the first call stay
    assert list(times) == ["per-task adapters", "mixed-task LoRA", "gates (+ gate accuracy)", "evaluation",
                           "routing picture", "evaluation, top-1", "evaluation, routing ablation"]
    phase = json.loads((out / "eval_phase" / "summary.json").read_text())
    assert phase["systems"] == ["meteora", "adapter", "prompt-adapter", "answer-adapter"] and not phase["composite"]
    assert json.loads((out / "eval_top1" / "summary.json").read_text())["routing"]["top_k"] == 1
    table = (out / "quality.md").read_text()
    for text in ("| count |", "composite-3 (the harness", "composite-3 (free)", "| mixed |", "Gate accuracy", "| template |",
                 "MeteoRA with top-1 routing", "Routing ablation", "| prompt-adapter |"):
        assert text in table, text
    assert (out / "eval" / "routing.png").is_file()


def test_quality_skip_eval_runs_only_the_extra_evaluations(tiny_base, task_dir, tmp_path):
    """--skip-eval: adapters, gates and the routing ablation, without the main evaluation; with
    --prompt-format inst every stage runs on the derived base folder; --no-mixed trains no mixed LoRA;
    --select-top-k evaluates each k on the held-out test rows after the first --limit, then the
    chosen one on the test rows; --prompt-vote evaluates MeteoRA with vote_prompts (eval_vote/);
    --composite-check evaluates composite-n alone on that many prompts (eval_composite/), with each
    answer line on its own adapter (adapter) and on the one the gates vote over its question (line-vote),
    and --composite-no-base leaves the base model out of it."""
    import json
    import sys

    out = tmp_path / "q"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out), "--base",
                    str(tiny_base), "--data-dir", str(task_dir), "--tasks", "count,upper", "--adapter-steps", "2",
                    "--steps", "2", "--batch-size", "4", "--rows-per-task", "8", "--max-length", "64", "--limit", "2",
                    "--composite", "own", "--skip-eval", "--ablate-routing", "--prompt-format", "inst", "--no-mixed",
                    "--select-top-k", "1,2", "--select-rows", "3", "--prompt-vote", "--vote-window", "2",
                    "--composite-check", "3", "--composite-no-base"],
                   check=True, capture_output=True)
    assert not (out / "eval").exists() and sorted(p.name for p in (out / "adapters").iterdir()) == ["count", "upper"]
    run_args = train.read_run(out / "meteora")["args"]
    assert not run_args["train_loras"] and not run_args["local_gate_loss"]  # this flow's gates-only default
    config = json.loads((out / "meteora" / "meteora_config.json").read_text())
    assert Path(config["base_model"]) == (out / "base_inst").resolve()  # every stage on the [INST] base
    assert json.loads((out / "eval_phase" / "summary.json").read_text())["systems"][-1] == "answer-adapter"
    times = json.loads((out / "times.json").read_text())
    assert "evaluation" not in times and "mixed-task LoRA" not in times and "evaluation, routing ablation" in times
    assert "Routing ablation" in (out / "quality.md").read_text()
    selection = json.loads((out / "selection.json").read_text())
    chosen = selection["chosen"]
    assert selection["held_out_rows"] == [2, 5] and chosen in (1, 2) and set(selection["mean_by_top_k"]) == {"1", "2"}
    held_out = json.loads((out / "select_top1" / "summary.json").read_text())
    assert (held_out["offset"], held_out["limit"], held_out["systems"], held_out["composite"]) == (2, 3, ["meteora"], {})
    assert "test rows 3-5 per task" in (out / "select_top1" / "results.md").read_text()
    assert json.loads((out / f"eval_top{chosen}" / "summary.json").read_text())["routing"]["top_k"] == chosen
    assert "chosen on held-out test rows 3-5" in (out / "quality.md").read_text()
    vote = json.loads((out / "eval_vote" / "summary.json").read_text())
    assert vote["systems"] == ["meteora", "prompt-vote", "prompt-vote(2)"] and vote["composite"]
    assert all(set(c) == set(vote["systems"]) for c in vote["composite"].values())
    assert "evaluation, prompt vote" in times and "| prompt-vote |" in (out / "quality.md").read_text()
    comp = json.loads((out / "eval_composite" / "summary.json").read_text())
    assert comp["tasks"] == {} and comp["systems"] == ["meteora", "adapter", "prompt-vote", "prompt-vote(2)"]  # no base
    assert list(comp["composite"]) == ["composite-2"] and comp["composite_bootstrap"]["composite-2"]["prompts"] == 3
    assert set(comp["composite"]["composite-2"]) == {*comp["systems"], "line-vote", "segment"}  # adapter: one per answer line
    assert "composite-n, 3 prompts" in times and "## Composite-n on 3 prompts" in (out / "quality.md").read_text()


def test_quality_train_loras_keeps_the_adapters_as_oracle(tiny_base, task_dir, tmp_path):
    """--train-loras: the gates and the LoRA experts learn together (the experts move away from the
    adapters), the oracle is the adapters as trained (adapter=DIR), and the mixed LoRA learns from
    the gate stage's rows too (adapters/mixed_matched: more steps)."""
    import json
    import sys

    import meteora

    out = tmp_path / "q"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out), "--base",
                    str(tiny_base), "--data-dir", str(task_dir), "--tasks", "count,upper", "--adapter-steps", "2",
                    "--mixed-batch-size", "8", "--steps", "2", "--batch-size", "4", "--rows-per-task", "8",
                    "--max-length", "64", "--limit", "2", "--composite", "", "--composite-rows", "4",
                    "--train-loras", "--lora-lr", "1e-2", "--local-gate-loss", "--stop-after", "eval", "--seed", "3"],
                   check=True, capture_output=True)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["count", "mixed_matched", "upper"]
    mixed = json.loads((out / "adapters" / "mixed_matched" / "meteora_adapter.json").read_text())
    assert mixed["steps"] == (2 * 2 * 4 + 2 * 4) // 8  # the adapters' rows and the gate stage's
    run = train.read_run(out / "meteora")
    assert run["args"]["train_loras"] and run["args"]["lora_lr"] == 1e-2 and run["args"]["local_gate_loss"]
    assert run["args"]["seed"] == 3  # --seed reaches every training of the flow
    trained = meteora.load(out / "meteora").meteora_state_dict()
    embedded = meteora.from_adapters(meteora.load_base_model(str(tiny_base))[0],
                                     {t: out / "adapters" / t for t in ("count", "upper")}).meteora_state_dict()
    assert max(float((trained[k] - embedded[k]).abs().max()) for k in trained if k.endswith("lora_A")) > 1e-3
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["systems"] == ["meteora", "adapter", "base", "mixed"]
    # A later call: the oracle row-matched to the experts (2 adapter steps + 2 gate steps / 2 tasks) and
    # the lean composite check (MeteoRA and the mixed LoRA only); the checkpoint is reused.
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out), "--base",
                    str(tiny_base), "--data-dir", str(task_dir), "--tasks", "count,upper", "--adapter-steps", "2",
                    "--mixed-batch-size", "8", "--steps", "2", "--batch-size", "4", "--rows-per-task", "8",
                    "--max-length", "64", "--limit", "2", "--composite", "own", "--composite-rows", "4",
                    "--train-loras", "--lora-lr", "1e-2", "--local-gate-loss", "--skip-eval", "--matched-oracle",
                    "--composite-check", "2", "--composite-lean", "--composite-no-base"],
                   check=True, capture_output=True)
    assert json.loads((out / "adapters_matched" / "count" / "meteora_adapter.json").read_text())["steps"] == 3
    matched = json.loads((out / "eval_matched" / "summary.json").read_text())
    assert matched["systems"] == ["meteora", "adapter"] and matched["composite"] == {}
    assert matched["tasks"]["count"]["meteora"] == summary["tasks"]["count"]["meteora"]  # the same checkpoint
    comp = json.loads((out / "eval_composite" / "summary.json").read_text())
    assert comp["systems"] == ["meteora", "mixed"] and set(comp["composite"]["composite-2"]) == {"meteora", "mixed"}
    times = json.loads((out / "times.json").read_text())
    assert "matched per-task adapters" in times and "evaluation, matched oracle" in times
    assert "adapters_matched/" in (out / "quality.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out),
                          "--matched-oracle"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--matched-oracle needs --train-loras" in bad.stderr


def test_quality_inst_base_drops_the_chat_template(smollm2_dir, tmp_path):
    """quality.py --prompt-format inst: a base folder with SmolLM2's weights (linked) and its
    tokenizer without the chat template, so every prompt is wrapped as [INST] ... [/INST]."""
    import os

    import transformers

    from benchmarks import quality
    from meteora import train

    folder = quality.inst_base(str(smollm2_dir), tmp_path / "base_inst")
    assert quality.inst_base(str(smollm2_dir), tmp_path / "base_inst") == folder  # made once
    assert os.path.islink(os.path.join(folder, "model.safetensors")) and not (tmp_path / "base_inst.tmp").exists()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert not getattr(tok, "chat_template", None) and tok.pad_token is not None
    assert train.format_prompt(tok, "Q: 2+2?") == "[INST] Q: 2+2? [/INST]\n"
    assert tok.decode(train.template_head(tok)) == "[INST]"
    chat = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(train.template_head(chat)) == 8 and len(train.template_head(tok)) == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == transformers.AutoConfig.from_pretrained(smollm2_dir).num_hidden_layers


def test_e2e_model_cache_and_gather_bmm():
    """benchmarks/e2e.py's pieces on a tiny CPU model: decoding through the static KV cache gives
    the full-sequence logits, and the authors' gather-bmm path equals MeteoRALinear."""
    from benchmarks import e2e

    torch.manual_seed(0)
    cfg = e2e.Config(layers=2, dim=64, heads=4, kv_heads=2, ffn=96, vocab=97)
    model = e2e.Llama(cfg).eval()
    ids = torch.randint(0, cfg.vocab, (2, 9))
    with torch.no_grad():
        full = model(ids, torch.arange(9), last_only=False)
        caches = [(torch.zeros(2, cfg.kv_heads, 12, cfg.head_dim), torch.zeros(2, cfg.kv_heads, 12, cfg.head_dim))
                  for _ in range(cfg.layers)]
        steps = [model(ids[:, :5], torch.arange(5), caches, last_only=False)]
        steps += [model(ids[:, t:t + 1], torch.tensor([t]), caches) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)

    lin = model.layers[0].mlp.down_proj
    m = meteora.MeteoRALinear(lin, 5, 4, top_k=2)
    with torch.no_grad():
        for e in range(5):
            m.set_expert(e, torch.randn(4, lin.in_features) * 0.1, torch.randn(lin.out_features, 4), 2.0)
        m.gate.weight.normal_()
        x = torch.randn(3, 7, lin.in_features)
        torch.testing.assert_close(e2e.GatherBmmLinear(m)(x), m(x), rtol=1e-4, atol=1e-4)


def test_cpu_decode_benchmark(smollm2_adapters, tmp_path):
    """benchmarks/cpu_decode.py times the base model and MeteoRA over the given adapters and writes
    its numbers."""
    from benchmarks import cpu_decode

    root = next(iter(smollm2_adapters.values())).parent
    out = tmp_path / "cpu_decode.json"
    assert cpu_decode.main(["--adapters", str(root), "--new-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["adapters"] == 2 and result["linears"] == 210 and result["new_tokens"] == 2
    assert result["base_ms_per_token"] > 0 and result["meteora_ms_per_token"] > 0
    assert cpu_decode.main(["--adapters", str(tmp_path)]) == 2  # no adapters there


def test_concat_k_layouts_compute_the_same_linear(monkeypatch):
    """benchmarks/concat_k.py's one-GEMM forms ([x | H] [W0 | B_all]^T, and gate / up reading one
    shared [H_g | x | H_u]) against base + expand, on the CPU with the timer stubbed."""
    from benchmarks import concat_k

    seen = []
    monkeypatch.setattr(concat_k, "timed", lambda fn, **_: (fn(), seen.append(fn), 1.0)[2])
    gen = torch.Generator().manual_seed(0)
    row = concat_k.one_linear(5, 24, 40, 16, (2, 4), gen, torch.device("cpu"), torch.float64)
    assert row["err_current"] < 1e-5 and row["err_concat"] < 1e-5  # (its reference is fp32)
    pair = concat_k.gate_up_pair(3, 24, 40, 16, (2, 4), gen, torch.device("cpu"), torch.float64)
    assert set(pair) == {"base", "current", "concat", "concat_with_copy", "err_concat"} and len(seen) == 5 + 4
    assert pair["err_concat"] < 1e-12  # the same rounding order as current in float64
    h = concat_k.routing(6, 4, 2, 4, gen).view(6, 4, 4)
    assert ((h != 0).any(2).sum(1) == 2).all()  # top-2 of 4 experts per token


def test_ab_layer_wide_variant_keeps_the_weights():
    """benchmarks/ab_layer.py --wide-gate-up / --left-gate: gate / up (d_out > d_in) get [W0 | B_all]
    (W0 and B as views of one buffer, the same values), with the first of the two as [B_all | W0]
    unless left=False, the others stay as they are, and the copies' groups list the copies."""
    from types import SimpleNamespace

    from benchmarks.ab_layer import wide_gate_up
    from benchmarks.moe_fwd import given_inputs

    gen = torch.Generator().manual_seed(1)

    def lin(name, d_in, d_out):
        w0, b = torch.randn(d_out, d_in, generator=gen), torch.randn(3, d_out, 2, generator=gen)
        return SimpleNamespace(name=name, d_in=d_in, d_out=d_out, w0=w0, b=b, w0_ours=w0, b_ours=b, stacked=(w0,))

    gate, up, down = lin("gate_proj", 6, 10), lin("up_proj", 6, 10), lin("down_proj", 10, 6)
    gate.group = up.group = [gate, up]
    for left in (True, False):
        copies = wide_gate_up([gate, up, down], left=left)
        for old, new in zip((gate, up), copies[:2]):
            assert new is not old and new.stacked is None and new.group == copies[:2]
            assert torch.equal(new.w0_ours, old.w0) and torch.equal(new.b_ours, old.b)
            assert new.b_ours.untyped_storage().data_ptr() == new.w0_ours.untyped_storage().data_ptr()
            assert new.w0_ours.stride(0) >= 6 + 3 * 2
        g, u = copies[:2]
        assert (g.w0_ours.storage_offset() == g.b_ours.storage_offset() + 3 * 2) == left  # [B_all | W0]
        assert u.b_ours.storage_offset() == u.w0_ours.storage_offset() + 6  # [W0 | B_all]
        assert copies[2].w0_ours is down.w0 and copies[2].stacked == (down.w0,)
    assert gate.group == [gate, up]  # the originals keep theirs
    copies = wide_gate_up([gate, up, down])  # --x-in-place: x once in the middle of [H_gate | x | H_up]
    x = torch.arange(240.0).view(40, 6)
    (x_cat, x_col), = given_inputs(copies, {6: x}).values()
    assert x_col == 8 and x_cat.shape == (40, 24) and torch.equal(x_cat[:, 8:14], x)
    assert given_inputs(copies, {6: x[:32]}) == {}  # decode sizes: the library's norm writes no buffer
    d = wide_gate_up([gate, up, down], names={"down_proj"})[2]  # --wide-linears: any shape
    assert d.stacked is None and d.b_ours.storage_offset() == d.w0_ours.storage_offset() + 10
    assert torch.equal(d.w0_ours, down.w0) and torch.equal(d.b_ours, down.b)


def test_profile_kernels_draws_timelines_from_a_log(tmp_path):
    """benchmarks/profile_kernels.py --from-log: the timelines --layer prints are read back (header,
    rows), kernels that ran at once get separate lanes, LOG:TEXT and --match filter the labels, and
    the picture is written (no GPU needed)."""
    from benchmarks import profile_kernels as pk

    log = tmp_path / "t.log"
    log.write_text(
        "noise\n"
        "== layer base T=16 (uniform): 2 kernels, 9.0 us first start to last end; busy per stream 7: 9.0 us\n"
        "       0.0      4.0     4.0  s7   nvjet_sm90_tst_h_bz_TNT\n"
        "       4.5      9.0     4.5  s7   nvjet_sm90_tst_h_bz_TNT\n"
        "== layer ours T=16 (uniform): 3 kernels, 12.0 us first start to last end; busy per stream 7: 10.0 us\n"
        "       0.0      6.0     6.0  s7   nvjet_sm90_tss_h_bz_TNN\n"
        "       1.0      5.0     4.0  s143 void meteora::cuda::(anonymous namespace)::route_select_kernel<bf16>(...)\n"
        "       6.0     12.0     6.0  s143 nvjet_sm90_tst_h_badd_TNT\n")
    timelines = pk.parse_timelines(log.read_text())
    assert [label for label, _ in timelines] == ["layer base T=16 (uniform)", "layer ours T=16 (uniform)"]
    rows = timelines[1][1]
    assert rows[1] == (1.0, 4.0, 143, "void meteora::cuda::(anonymous namespace)::route_select_kernel<bf16>(...)")
    assert pk.lanes_of(rows) == [0, 1, 0] and pk.lanes_of(timelines[0][1]) == [0, 0]
    assert [pk.kernel_kind(r[3]).split()[0] for r in rows] == ["cuBLAS", "meteora", "cuBLAS"]
    assert "beta = 1" in pk.kernel_kind(rows[2][3])
    png = tmp_path / "out" / "t.png"
    assert pk.main(["--from-log", f"{log}:ours", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000 and not list(png.parent.glob("*.tmp.png"))
    assert pk.main(["--from-log", str(log), "--match", "T=4096", "--plot", str(png)]) == 2


def _cutlass_source() -> Path | None:
    """CUTLASS's sources from the nvidia-cutlass wheel (make install puts it in .venv), if there."""
    spec = importlib.util.find_spec("cutlass_library")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "source" / "include" / "cutlass" / "cutlass.h").exists():
            return Path(root) / "source"
    return None


def _nvcc() -> str | None:
    found = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    return found if Path(found).exists() else None


@pytest.mark.skipif(_nvcc() is None or _cutlass_source() is None, reason="needs nvcc and CUTLASS's headers")
def test_fused_expand_prototype_compiles(tmp_path):
    """benchmarks/fused_expand/fused_expand.cu (the experts' expand inside a CUTLASS Hopper GEMM: a
    standalone measurement, run on the GPU box by scripts/gpu_fused_expand.sh) compiles for sm_90a."""
    source = _cutlass_source()
    cmd = [_nvcc(), "-std=c++17", "-O3", "-DNDEBUG", "-arch=sm_90a", "--expt-relaxed-constexpr",
           f"-I{source / 'include'}", f"-I{source / 'tools' / 'util' / 'include'}"]
    nvidia = importlib.util.find_spec("nvidia")  # cuBLAS's headers from the pip packages, where the toolkit lacks them
    for root in (nvidia.submodule_search_locations or []) if nvidia else []:
        cmd += [f"-I{inc}" for inc in sorted(Path(root).glob("cu*/include")) if (inc / "cublas_v2.h").exists()]
    cmd += ["-c", str(ROOT / "benchmarks" / "fused_expand" / "fused_expand.cu"), "-o", str(tmp_path / "fused_expand.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "fused_expand.o").stat().st_size > 0
    assert "C7510" not in done.stderr  # wgmma serialized across a function call: the build lost the fusion's point


def test_e2e_paired_prefill_alternates_the_systems(monkeypatch):
    """benchmarks/e2e.py's paired prefill: one graph per system (captured with that system's
    linears in place), replays alternated base / meteora, then meteora / base, and the ratio is
    the median of the per-round ratios; meteora's linears are back in place afterwards."""
    from benchmarks import e2e

    torch.manual_seed(0)
    cfg = e2e.Config(layers=1, dim=32, heads=4, kv_heads=2, ffn=48, vocab=50)
    model = e2e.Llama(cfg).eval()
    layers = {}
    for parent, name, lin in list(e2e.linears(model)):
        m = meteora.MeteoRALinear(lin, 3, 2, top_k=1)
        setattr(parent, name, m)
        layers[(parent, name)] = m
    captured, order = [], []

    class Graph:
        def __init__(self, fn):
            self.system = "meteora" if isinstance(model.layers[0].mlp.down_proj, meteora.MeteoRALinear) else "base"
            captured.append(self.system)
            fn()

        def replay(self):
            order.append(self.system)

    clock = iter([1.0, 1.25, 1.0, 1.1, 1.0, 1.3, 1.0, 1.2, 1.0, 1.15])  # base 1.0 s, meteora 1.1-1.3 s
    monkeypatch.setattr(e2e, "graph_of", Graph)
    monkeypatch.setattr(e2e, "timed", lambda fn, repeats: (fn(), next(clock))[1])
    r = e2e.paired_prefill(model, layers, 2, 5, torch.Generator().manual_seed(1), 5)
    assert captured == ["base", "meteora"]
    assert order == ["base", "meteora", "meteora", "base", "base", "meteora", "meteora", "base", "base", "meteora"]
    assert all(getattr(p, n) is m for (p, n), m in layers.items())
    # rounds (base, meteora): (1.0, 1.25), (1.1, 1.0), (1.0, 1.3), (1.2, 1.0), (1.0, 1.15)
    ratios = sorted([1.0 / 1.25, 1.1 / 1.0, 1.0 / 1.3, 1.2 / 1.0, 1.0 / 1.15])
    assert r["ratio"] == pytest.approx(ratios[2]) and r["ratio_low"] == pytest.approx(ratios[0])
    assert r["rounds"] == 5 and r["base_s"] == pytest.approx(1.0)
    assert isinstance(r["clock"], dict)  # empty without nvidia-smi


def test_gpu_clock_attributes_samples_to_windows():
    """benchmarks/gpu_clock.py: nvidia-smi's CSV lines parsed (others skipped) and each sample
    counted in the labelled window it falls in, none outside every window."""
    from benchmarks import gpu_clock

    lines = ["2026/12/02 16:30:00.000, 1755, 690.5", "2026/12/02 16:30:00.100, 1695, 699.0",
             "2026/12/02 16:30:00.200, 1500, 700.0", "2026/12/02 16:30:00.300, 1980, 120.0",
             "timestamp, clocks.current.sm [MHz], power.draw [W]", "2026/12/02 16:30:00.400, [N/A], 1.0"]
    samples = [s for s in map(gpu_clock.parse_sample, lines) if s is not None]
    assert len(samples) == 4
    t0 = samples[0][0]
    assert samples[1][0] - t0 == pytest.approx(0.1) and samples[2][1:] == (1500.0, 700.0)
    windows = [("base", t0 - 0.01, t0 + 0.05), ("ours", t0 + 0.05, t0 + 0.25)]
    summary = gpu_clock.attribute(samples, windows)
    assert summary["base"] == dict(clock_mhz=1755.0, power_w=690.5, samples=1)
    assert summary["ours"] == dict(clock_mhz=pytest.approx(1597.5), power_w=pytest.approx(699.5), samples=2)
    assert gpu_clock.attribute(samples, []) == {}
    with gpu_clock.ClockLog(command=["/nonexistent/nvidia-smi"]) as log:  # cannot start: nothing, no error
        with log.window("x"):
            pass
    assert [w[0] for w in log.windows] == ["x"] and log.samples == []


def test_gpu_clock_reads_lines_as_they_come():
    """ClockLog reads its sampler through a pseudo-terminal: lines arrive while it runs (a pipe would
    hold them in the sampler's stdio buffer until it exits) and the ones before the stop are kept."""
    import sys
    import time

    from benchmarks import gpu_clock

    # buffered as C's stdio buffers nvidia-smi's output: by line on a terminal, in 8 KB blocks on a pipe
    script = ("import datetime, os, time\n"
              "out = open(1, 'w', buffering=1 if os.isatty(1) else 8192, closefd=False)\n"
              "for i in range(400):\n"
              "    now = datetime.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]\n"
              "    print(f'{now}, {1500 + i}, 600.0', file=out)\n"
              "    time.sleep(0.02)\n")
    with gpu_clock.ClockLog(period_ms=20, command=[sys.executable, "-c", script]) as log:
        deadline = time.time() + 1.5  # through a pipe the first ~200 lines (4 s) would wait in a buffer
        while len(log.samples) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert len(log.samples) >= 3, "no sample before the sampler exited"
        with log.window("w"):
            time.sleep(0.3)
    summary = log.summary()
    assert summary["w"]["samples"] >= 5 and summary["w"]["power_w"] == 600.0
    assert log._proc is None


def test_moe_fwd_writes_the_alternated_ratio(tmp_path):
    """benchmarks/moe_fwd.py's report: a row measured in alternation with base gets the paired table."""
    from benchmarks import moe_fwd

    row = dict(routing="uniform", scope="layer", mode="forward", tokens=1024, method="ours", eager_us=300.0,
               graph_us=290.0, floor_us=200.0, extra_mb=1.0, max_abs_err=0.01, hot_share=0.1, ratio_base=1.2,
               ratio_floor=1.45, paired_ratio_base=1.187, paired_low=1.15, paired_high=1.22, paired_rounds=20)
    base = dict(row, method="base", graph_us=240.0, ratio_base=1.0, max_abs_err=float("nan"))
    for key in ("paired_ratio_base", "paired_low", "paired_high", "paired_rounds"):
        base.pop(key)
    results = dict(device="test", torch=torch.__version__, hardware=dict(copy_bandwidth_gbs=1.0, bf16_tflops=1.0),
                   experts=28, rank=8, top_k=2, dtype="bfloat16", shapes="q:4096x4096", expert_columns="narrow",
                   rows=[base, row])
    moe_fwd.write_outputs(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| uniform | layer | 1024 | ours | 1.187 | 1.150-1.220 |" in text
    assert text.count("1.187") == 1 and json.loads((tmp_path / "results.json").read_text())["rows"][1]["paired_rounds"] == 20


def test_dense_floor_runs_the_dense_designs_gemms(monkeypatch):
    """benchmarks/dense_floor.py: the concat floor runs per group one routing GEMM over every
    member's padded [gate; A_all] rows and per linear one GEMM over K = d_in + N r; the stacked floor
    per group one GEMM over [W0s; gates; A_alls] and per linear the expand over K = N r into its
    columns of that output."""
    from types import SimpleNamespace

    from benchmarks import dense_floor

    gen = torch.Generator().manual_seed(0)

    def lin(name, d_in, d_out, experts, rank):
        return SimpleNamespace(name=name, d_in=d_in, d_out=d_out, gate=torch.zeros(experts, d_in),
                               a=torch.zeros(experts, rank, d_in))

    linears = [lin("q_proj", 16, 16, 3, 2), lin("k_proj", 16, 8, 3, 2), lin("o_proj", 16, 16, 5, 1),
               lin("down_proj", 24, 16, 3, 2)]
    xs = {16: torch.randn(5, 16, generator=gen), 24: torch.randn(5, 24, generator=gen)}
    run_concat, run_stacked = dense_floor.dense_work(linears, xs, gen)
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(dense_floor.F, "linear", lambda x, w: (seen.append((tuple(x.shape), tuple(w.shape))),
                                                             real_linear(x, w))[1])
    run_concat()
    # q / k: 3 + 6 = 9 rows -> 16 each; o: 5 + 5 -> 16; down: 9 -> 16
    assert seen == [((5, 16), (32, 16)), ((5, 22), (16, 22)), ((5, 22), (8, 22)),
                    ((5, 16), (16, 16)), ((5, 21), (16, 21)),
                    ((5, 24), (16, 24)), ((5, 30), (16, 30))]
    seen.clear()
    added = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda y, h, b: (added.append((tuple(y.shape), tuple(h.shape),
                                                                                tuple(b.shape))),
                                                                  real_addmm(y, h, b))[1])
    run_stacked()
    assert seen == [((5, 16), (32 + 24, 16)), ((5, 16), (16 + 16, 16)), ((5, 24), (16 + 16, 24))]
    assert added == [((5, 16), (5, 6), (6, 16)), ((5, 8), (5, 6), (6, 8)), ((5, 16), (5, 5), (5, 16)),
                     ((5, 16), (5, 6), (6, 16))]
