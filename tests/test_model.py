"""MeteoRA on a real LLaMA-family model: SmolLM2-135M with real PEFT adapters (and tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import meteora
from conftest import ALL_LINEARS, make_adapter, tiny_model
from meteora.layer import LinearGroup, _stacked, stacks_by_default

PROMPT = "The three primary colours are red, yellow and"


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def peft_logits(base_model, adapters, active, input_ids):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base_model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.set_adapter(active)
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.slow
def test_forced_routing_equals_peft(smollm2_adapters):
    base, tok = meteora.load_base_model()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    model = meteora.from_adapters(base, smollm2_adapters, top_k=2).eval()
    layers = model.meteora_layers()
    assert len(layers) == 30 * 7
    # The r=16 adapter is absent from k/gate/up projections: a masked zero expert there.
    assert layers["model.layers.0.self_attn.k_proj"].expert_mask.tolist() == [True, False]
    assert layers["model.layers.0.self_attn.q_proj"].ranks.tolist() == [8, 16]
    with torch.no_grad():
        base_logits = meteora.load_base_model()[0](ids).logits
        for name in smollm2_adapters:
            model.force_adapter(name)
            ours = model(ids).logits
            theirs = peft_logits(meteora.load_base_model()[0], smollm2_adapters, name, ids)
            assert max_rel_error(ours, theirs) <= 1e-4, name
            assert max_rel_error(theirs, base_logits) > 1e-2  # the adapter really changes the output
        model.force_adapter(None)
        mixed = model(ids).logits
    assert max_rel_error(mixed, ours) > 1e-3  # the gates route differently from forcing one adapter


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_forced_routing_equals_peft_tiny(arch, device, tmp_path):
    base = tiny_model(arch)
    adapters = {
        "a": make_adapter(base, tmp_path / "a", r=4, alpha=8, targets=ALL_LINEARS, seed=3),
        "b": make_adapter(base, tmp_path / "b", r=12, alpha=12, targets=["q_proj", "down_proj"], seed=4),
        "c": make_adapter(base, tmp_path / "c", r=8, alpha=4, targets=["v_proj", "up_proj"], seed=5, use_rslora=True),
    }
    ids = torch.randint(0, 97, (2, 11), device=device)
    model = meteora.from_adapters(tiny_model(arch).to(device), adapters, top_k=3).eval()
    with torch.no_grad():
        for name in adapters:
            model.force_adapter(name)
            theirs = peft_logits(tiny_model(arch).to(device), adapters, name, ids)
            assert max_rel_error(model(ids).logits, theirs) <= 1e-4


def test_routing_settings(tmp_path):
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i) for i, n in enumerate("abc")}
    model = meteora.from_adapters(tiny_model(), adapters, top_k=2, temperature=1.0).eval()
    ids = torch.randint(0, 97, (1, 9))
    model.record_routing()
    model.set_routing(top_k=1)
    with torch.no_grad():
        model(ids)
    for layer in model.meteora_layers().values():
        assert layer.top_k == 1 and torch.equal(layer.routing.expert_weight, torch.ones(9, 1))
        assert torch.equal(layer.routing.expert_idx[:, 0], layer.routing.gate_logits.argmax(-1))
    model.set_routing(top_k=3, temperature=15.0)
    with torch.no_grad():
        model(ids)
    layer = model.meteora_layers()["model.layers.1.mlp.down_proj"]
    r = layer.routing
    torch.testing.assert_close(r.expert_weight, torch.softmax(r.gate_logits.gather(1, r.expert_idx) / 15.0, -1))
    with pytest.raises(ValueError, match="top_k=4"):
        model.set_routing(top_k=4)
    with pytest.raises(ValueError, match="temperature=0"):
        model.set_routing(temperature=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        meteora.from_adapters(tiny_model(), adapters, temperature=-1)
    with pytest.raises(ValueError, match="top_k=4"):
        meteora.from_adapters(tiny_model(), adapters, top_k=4)
    assert model.top_k == 3 and model.temperature == 15.0  # failed calls changed nothing


@pytest.mark.slow
def test_save_load_roundtrip_and_generate(smollm2_adapters, tmp_path):
    base, tok = meteora.load_base_model()
    model = meteora.from_adapters(base, smollm2_adapters, top_k=2, temperature=2.0).eval()
    with torch.no_grad():  # gates away from their initialisation, so the round trip checks them
        for layer in model.meteora_layers().values():
            layer.gate.weight.normal_(0, 0.05)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "meteora_config.json").read_text())
    assert config["adapters"] == ["all7_r8", "qvod_r16"] and config["top_k"] == 2 and config["temperature"] == 2.0
    assert config["base_model"] == "smollm2"
    assert config["modules"]["model.layers.3.mlp.up_proj"]["ranks"] == [8, 0]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ckpt").iterdir())

    loaded = meteora.load(tmp_path / "ckpt")  # base model from the config: the embedded default
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)

    # generate() with the KV cache: deterministic under greedy, same tokens as without the cache.
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    with loaded.trace_routing() as trace:
        out1 = loaded.generate(ids, **kwargs)
    out2 = loaded.generate(ids, **kwargs)
    out3 = loaded.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(out1, out2) and torch.equal(out1, out3)
    steps = trace.steps["model.layers.0.self_attn.q_proj"]
    assert steps[0].expert_idx.shape[0] == ids.shape[1] and all(s.expert_idx.shape[0] == 1 for s in steps[1:])
    weights = trace.token_adapter_weights()
    assert weights.shape == (out1.shape[1] - 1, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


def test_gate_loss_trains_only_gates(tmp_path):
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i) for i, n in enumerate("ab")}
    model = meteora.from_adapters(tiny_model(), adapters, top_k=1)
    model.train()
    model.record_routing()
    ids = torch.randint(0, 97, (4, 16))
    task = torch.tensor([0, 1, 0, 1])[:, None].expand(4, 16).clone()
    task[:, :3] = -100  # ignored tokens
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p is g for p, g in zip(params, model.gate_parameters()))
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        loss, parts = meteora.meteora_loss(out.loss, model, task, gate_weight=50.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["gate"].item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        model(ids)
    assert meteora.gate_accuracy(model, task).item() > 0.9
    with pytest.raises(ValueError, match="task_labels has 8 tokens"):
        meteora.gate_loss(model, task[:, :2])


def test_local_gate_loss_reaches_each_gate_only(tmp_path):
    """record_routing(local=True): the same gate logits and routing, but the gate loss's gradient stops
    at each gate: none for the experts (trainable here) and none from a later gate to an earlier one."""
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i) for i, n in enumerate("abc")}
    model = meteora.from_adapters(tiny_model(), adapters, top_k=2)
    model.set_trainable(gates=True, loras=True)
    with torch.no_grad():
        for layer in model.meteora_layers().values():
            layer.gate.weight.normal_(0, 0.5)
    ids = torch.randint(0, 97, (3, 9))
    task = torch.tensor([0, 1, 2])[:, None].expand(3, 9)
    grads = {}
    for local in (False, True):
        model.zero_grad(set_to_none=True)
        model.record_routing(True, local=local)
        out = model(ids, labels=ids)
        grads[local] = {n: l.routing.gate_logits.detach().clone() for n, l in model.meteora_layers().items()}
        meteora.gate_loss(model, task).backward()
        grads[local]["lora"] = [p.grad for p in model.lora_parameters()]
        grads[local]["gate"] = [p.grad.clone() for p in model.gate_parameters()]
        grads[local]["lm"] = out.logits.detach()
    model.record_routing(False)
    for name in model.meteora_layers():
        torch.testing.assert_close(grads[True][name], grads[False][name])  # the same logits
    torch.testing.assert_close(grads[True]["lm"], grads[False]["lm"])  # the same forward
    assert any(g is not None and g.abs().sum() > 0 for g in grads[False]["lora"])  # the full loss reaches them
    assert all(g is None or g.abs().sum() == 0 for g in grads[True]["lora"])
    # each gate's own term: the last gate's gradient is the same, an earlier one's differs
    torch.testing.assert_close(grads[True]["gate"][-1], grads[False]["gate"][-1])
    assert not torch.allclose(grads[True]["gate"][0], grads[False]["gate"][0])


# ---- bad input: one clear line naming the culprit ----------------------------------------------

def test_missing_adapter_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(meteora.AdapterError, match=r"adapter 'x': .*empty/adapter_config.json not found"):
        meteora.from_adapters(tiny_model(), {"x": tmp_path / "empty"})
    path = make_adapter(tiny_model(), tmp_path / "noweights", r=4, alpha=8, targets=["q_proj"], seed=0)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(meteora.AdapterError, match="no adapter_model.safetensors"):
        meteora.from_adapters(tiny_model(), {"y": path})
    with pytest.raises(meteora.AdapterError, match="not a local folder"):
        meteora.load_adapter("z", tmp_path / "does-not-exist")


def test_adapter_for_another_base_model(tmp_path):
    other = make_adapter(tiny_model(hidden=32), tmp_path / "other", r=4, alpha=8, targets=["q_proj"], seed=0)
    with pytest.raises(meteora.AdapterError, match=r"adapter 'other'.*q_proj.*base linear is 64 -> 64.*different base model"):
        meteora.from_adapters(tiny_model(), {"other": other})


def test_unsupported_modules_and_config(tmp_path):
    path = make_adapter(tiny_model(), tmp_path / "lm_head", r=4, alpha=8, targets=["q_proj", "lm_head"], seed=0)
    with pytest.raises(meteora.AdapterError, match=r"adapts 'lm_head'; meteora supports only the linears q_proj"):
        meteora.from_adapters(tiny_model(), {"h": path})
    path = make_adapter(tiny_model(), tmp_path / "dora", r=4, alpha=8, targets=["q_proj"], seed=0)
    config = json.loads((path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(meteora.AdapterError, match="field 'use_dora'"):
        meteora.from_adapters(tiny_model(), {"d": path})


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i) for i, n in enumerate("ab")}
    model = meteora.from_adapters(tiny_model(), adapters)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(meteora.load(ckpt, base_model=tiny_model()).meteora_state_dict()["model.layers.0.mlp.up_proj.gate"],
                       model.meteora_state_dict()["model.layers.0.mlp.up_proj.gate"])
    config_file = ckpt / "meteora_config.json"
    config = json.loads(config_file.read_text())
    config["modules"]["model.layers.1.mlp.up_proj"]["ranks"] = [8, 4]
    config_file.write_text(json.dumps(config))
    with pytest.raises(meteora.CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.lora_A' has shape \(2, 4, 64\)"):
        meteora.load(ckpt, base_model=tiny_model())
    del config["modules"]["model.layers.1.mlp.up_proj"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(meteora.CheckpointError, match="unexpected tensors"):
        meteora.load(ckpt, base_model=tiny_model())
    with pytest.raises(meteora.CheckpointError, match="meteora_config.json not found"):
        meteora.load(tmp_path / "a", base_model=tiny_model())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_inference_op_matches_training_path(device, tmp_path):
    """Without autograd MeteoRALinear runs the one meteora.linear op; with it, route + lora_experts.
    Both give the same model output; gate and lora_A stay packed in one buffer, or pack again."""
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4 + 4 * i, alpha=8, targets=ALL_LINEARS, seed=i)
                for i, n in enumerate("abc")}
    model = meteora.from_adapters(tiny_model().to(device), adapters, top_k=2).eval()
    for layer in model.meteora_layers().values():
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    ids = torch.randint(0, 97, (3, 13), device=device)
    with torch.no_grad():
        inference = model(ids).logits
    training = model(ids).logits  # the gates require grad: the autograd path
    assert training.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5)

    layer = model.meteora_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.is_packed()
    gate, lora_a = layer.gate.weight.detach().clone(), layer.lora_A.detach().clone()
    layer.to(torch.float64)
    assert not layer.is_packed() and not layer.is_packed(base=True)
    assert layer.pack_() and layer.is_packed()
    torch.testing.assert_close(layer.gate.weight.float(), gate)
    torch.testing.assert_close(layer.lora_A.float(), lora_a)
    layer.packable = False  # as under FSDP
    layer.to(torch.float32)
    assert not layer.pack_()
    layer.packable = True
    if device == "cuda":  # the inference path packs again by itself, B's columns too (the default)
        model.set_expert_columns(False)
        # .to kept B's columns order (its strides' permutation): make it the (N, d_out, r) tensor again
        layer.lora_B.data = layer.lora_B.detach().contiguous()
        with torch.no_grad():
            model(ids)
        assert layer.is_packed() and not layer.is_packed(base=True)
        model.set_expert_columns()
        with torch.no_grad():
            model(ids)
        assert layer.is_packed(base=True)

    # lora_B as columns beside the base weight's where d_out > d_in: same outputs, both paths.
    model.set_expert_columns(wide=True)
    for layer in model.meteora_layers().values():
        assert layer.pack_(base=True) and layer.is_packed(base=True)
    up = model.meteora_layers()["model.layers.0.mlp.up_proj"]
    w, b = up.base_layer.weight, up.lora_B
    assert w.shape[0] > w.shape[1] and w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.stride() == (b.shape[2], w.stride(0), 1)
    down = model.meteora_layers()["model.layers.0.mlp.down_proj"]  # d_out < d_in: B in a buffer of its own
    assert down.lora_B.untyped_storage().data_ptr() != down.base_layer.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, inference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, training, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "ckpt")  # shared storage is copied apart for safetensors

    # "always": B beside W0 in every linear (q / k / v too: q keeps B before W0, k reads q's buffer)
    model.set_expert_columns(wide="always")
    for layer in model.meteora_layers().values():
        assert layer.pack_(base=True) and layer.is_packed(base=True)
        w, b = layer.base_layer.weight, layer.lora_B
        assert w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    q = model.meteora_layers()["model.layers.0.self_attn.q_proj"]
    assert q.base_layer.weight.storage_offset() == q.lora_B.storage_offset() + q.lora_B.shape[0] * q.lora_B.shape[2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, inference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="wide"):
        model.set_expert_columns(wide="sometimes")

    # Narrow columns: B's columns in a buffer of their own everywhere, W0 out of [W0 | B_all] again.
    model.set_expert_columns(wide=False)
    assert not up.is_packed(base=True)
    for layer in model.meteora_layers().values():
        assert layer.pack_(base=True) and layer.is_packed(base=True)
    w, b = up.base_layer.weight, up.lora_B
    assert w.is_contiguous() and w.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert b.stride() == (b.shape[2], -(-b.shape[0] * b.shape[2] // 8) * 8, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, inference, rtol=1e-5, atol=1e-5)


def _grouped_model(device, tmp_path, monkeypatch):
    """(bf16 MeteoRAModel of two adapters with sharp gates, its base, the list that gets an entry per
    meteora.ops.linear_group_in call); on the CPU with LinearGroup.on_cpu set, so that the groups
    and the norms writing into gate / up's buffer take their paths there too."""
    if device == "cpu":
        monkeypatch.setattr(LinearGroup, "on_cpu", True)
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i) for i, n in enumerate("ab")}
    model = meteora.from_adapters(tiny_model().to(device=device, dtype=torch.bfloat16), adapters, top_k=1).eval()
    for layer in model.meteora_layers().values():
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    calls = []
    monkeypatch.setattr(meteora.ops, "linear_group_in",
                        lambda *a, _f=meteora.ops.linear_group_in, **kw: calls.append(1) or _f(*a, **kw))
    return model, base, calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_norm_into_group(device, tmp_path, monkeypatch):
    """set_norm_into_group (on by default): the post-attention RMSNorm writes its output into the
    gate / up group's [H_gate | x | H_up] buffer at prefill sizes (one linear_group_in per layer),
    the logits stay the same bits as with the norms' own forward (enabled=False), the state_dict
    keys too; decode sizes take the usual path; a deep copy's norms write into its own groups."""
    model, base, calls = _grouped_model(device, tmp_path, monkeypatch)
    keys = list(model.state_dict())
    prefill, decode = (torch.randint(0, 97, shape, device=device) for shape in ((2, 40), (2, 5)))
    with torch.no_grad():
        for layer in model.meteora_layers().values():
            layer.pack_(base=True)
        default = model(prefill).logits
        assert len(calls) == 2  # on by default: one per layer
        assert model.set_norm_into_group(False) == 0 and not model.norm_into_group
        expected = {n: model(ids).logits for n, ids in (("prefill", prefill), ("decode", decode))}
        assert len(calls) == 2
        torch.testing.assert_close(default, expected["prefill"], rtol=0, atol=0)
        assert model.set_norm_into_group() == 2
        torch.testing.assert_close(model(prefill).logits, expected["prefill"], rtol=0, atol=0)
        assert len(calls) == 4
        torch.testing.assert_close(model(decode).logits, expected["decode"], rtol=0, atol=0)
        assert len(calls) == 4
        twin = copy.deepcopy(model)
        norm = twin.model.model.layers[0].post_attention_layernorm
        assert norm.forward.norm is norm and norm.forward.mlp is twin.model.model.layers[0].mlp
        torch.testing.assert_close(twin(prefill).logits, expected["prefill"], rtol=0, atol=0)
        assert len(calls) == 6
        del twin
    assert list(model.state_dict()) == keys
    model.add_adapter("c", make_adapter(base, tmp_path / "c", r=4, alpha=8, targets=ALL_LINEARS, seed=7))
    model.to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():  # the new linears' group is found (the norms look it up at each call)
        model(prefill)
    assert len(calls) == 8
    model.force_adapter("a")
    with torch.no_grad():
        forced = model(prefill).logits
        model.set_norm_into_group(False)
        torch.testing.assert_close(model(prefill).logits, forced, rtol=0, atol=0)
    model.force_adapter(None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_model_compiles_with_its_default_paths(device, tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) of a MeteoRAModel as built (groups, the norms writing into gate /
    up's buffer) traces: both leave to the plain per-linear ops while compiling, and the logits
    match eager's (which took those paths: one linear_group_in per layer)."""
    model, _, calls = _grouped_model(device, tmp_path, monkeypatch)
    ids = torch.randint(0, 97, (2, 40), device=device)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        assert len(calls) == 2
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert len(calls) == 2
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_expert_columns_survive_add_adapter(tmp_path):
    """lora_B kept as columns (the prefill layout): adding an adapter keeps the setting, and the
    old adapters' outputs, before and after the new layer packs its own buffers."""
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4, alpha=8, targets=ALL_LINEARS, seed=i)
                for i, n in enumerate("ab")}
    model = meteora.from_adapters(tiny_model(), adapters, top_k=1).eval()
    assert all(layer.expert_columns and layer.wide_columns for layer in model.meteora_layers().values())
    model.set_expert_columns(wide=False)  # not the default: add_adapter must carry it over
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model.force_adapter("a")
        before = model(ids).logits
        for layer in model.meteora_layers().values():
            assert layer.pack_(base=True)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        model.add_adapter("c", make_adapter(base, tmp_path / "c", r=8, alpha=8, targets=ALL_LINEARS, seed=7))
        assert all(layer.expert_columns and not layer.wide_columns for layer in model.meteora_layers().values())
        model.force_adapter("a")
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        for layer in model.meteora_layers().values():
            assert layer.pack_(base=True) and layer.is_packed(base=True)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_linear_groups(device, tmp_path, monkeypatch):
    """q/k/v and gate/up run as one linear_group op (on CUDA inference; on the CPU here too, where
    it is off by default): the model's outputs and every layer's routing
    equal those of each linear on its own; a member called on a changed or another input computes
    its own; groups follow add_adapter and can be turned off."""
    monkeypatch.setattr(LinearGroup, "on_cpu", True)
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4 + 4 * i, alpha=8, targets=ALL_LINEARS, seed=i)
                for i, n in enumerate("abc")}
    model = meteora.from_adapters(tiny_model().to(device), adapters, top_k=2).eval()
    layers = model.meteora_layers()
    q, k, v = (layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert q.group is k.group is v.group and q.group.members == [q, k, v]
    assert layers["model.layers.1.mlp.gate_proj"].group is layers["model.layers.1.mlp.up_proj"].group
    assert layers["model.layers.1.mlp.down_proj"].group is None and layers["model.layers.1.self_attn.o_proj"].group is None
    for layer in layers.values():
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    ids = torch.randint(0, 97, (3, 13), device=device)
    calls = []
    monkeypatch.setattr(meteora.ops, "linear_group", lambda *a, _f=meteora.ops.linear_group, **kw: calls.append(1) or _f(*a, **kw))
    with torch.no_grad():
        model.record_routing()
        grouped = model(ids).logits
        routing = {n: layer.routing for n, layer in layers.items()}
        assert len(calls) == 4 and q.group.is_packed()  # 2 layers x (q/k/v, gate/up)
        assert q.gate.weight.untyped_storage().data_ptr() == v.lora_A.untyped_storage().data_ptr()
        assert model.group_linears(False) == 0 and q.group is None
        alone = model(ids).logits
        assert len(calls) == 4
        for n, layer in layers.items():
            for mine, theirs in zip(routing[n], layer.routing):
                torch.testing.assert_close(mine, theirs, msg=n)
        torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-5)
        assert model.group_linears() == 4

        def alone(m, inp):
            group, m.group = m.group, None
            try:
                return m(inp)
            finally:
                m.group = group

        x = torch.randn(2, 5, q.lora_A.shape[-1], device=device)
        torch.testing.assert_close(q(x), alone(q, x))  # k and v wait on x
        assert set(q.group._waiting) == {id(k), id(v)}
        torch.testing.assert_close(k(x), alone(k, x))
        torch.testing.assert_close(v(x), alone(v, x))
        assert not q.group._waiting and q.group._input is None  # nothing kept once taken
        q(x)
        x.add_(1.0)  # changed in place: k and v must not take what was computed before
        torch.testing.assert_close(k(x), alone(k, x))
        torch.testing.assert_close(v(x), alone(v, x))
        q(x)
        y = torch.randn_like(x)  # another input
        torch.testing.assert_close(k(y), alone(k, y))
        assert len(calls) == 8

        # B as columns: in buffers of their own, or beside W0's where d_out > d_in (gate / up, the
        # default): the groups still run (and pack B: [B_all | W0] for gate, [W0 | B_all] for up).
        gate, up = layers["model.layers.0.mlp.gate_proj"], layers["model.layers.0.mlp.up_proj"]
        for wide in (False, True):
            model.set_expert_columns(wide=wide)
            before = len(calls)
            torch.testing.assert_close(model(ids).logits, grouped, rtol=1e-5, atol=1e-5)
            assert len(calls) - before == 4
            assert q.is_packed(base=True) and up.is_packed(base=True) and gate.is_packed(base=True)
            for m in (gate, up):
                assert (m.lora_B.untyped_storage().data_ptr() == m.base_layer.weight.untyped_storage().data_ptr()) == wide
            if wide:
                nr = gate.lora_B.shape[0] * gate.lora_B.shape[2]
                assert gate.base_layer.weight.storage_offset() == gate.lora_B.storage_offset() + nr
                assert up.lora_B.storage_offset() == up.base_layer.weight.storage_offset() + up.base_layer.in_features
        model.set_expert_columns(False)

    model.add_adapter("d", make_adapter(base, tmp_path / "d", r=4, alpha=8, targets=ALL_LINEARS, seed=9))
    layers = model.meteora_layers()
    assert layers["model.layers.0.self_attn.k_proj"].group.members[0] is layers["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_new_experts_route_by_labels_and_save_as_peft(tmp_path, device):
    """new_experts starts as the base model; under route_by_labels each row runs its own expert
    (equal to that adapter alone, saved by save_adapter and read back by PEFT and by meteora), a
    label of -1 runs none, and each expert's gradient comes only from its own rows."""
    from peft import PeftModel

    torch.manual_seed(3)
    ids = torch.randint(0, 97, (3, 11), device=device)
    base_logits = tiny_model().to(device)(ids).logits
    model = meteora.new_experts(tiny_model().to(device), ["a", "b"], rank=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    layers = model.meteora_layers()
    assert len(layers) == 8 and all(layer.lora_A.requires_grad and not layer.gate.weight.requires_grad
                                    for layer in layers.values())
    labels = torch.tensor([[0] * 11, [1] * 11, [0] * 5 + [-1] * 6], device=device)
    with model.route_by_labels(labels):
        torch.testing.assert_close(model(ids).logits, base_logits)  # B starts at zero
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.2)
    with model.route_by_labels(labels):
        logits = model(ids).logits
    assert all(layer.token_experts is None for layer in layers.values())  # cleared on exit
    for index, name in enumerate("ab"):
        folder = model.save_adapter(name, tmp_path / name)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8.0)
        assert config["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
        peft = PeftModel.from_pretrained(tiny_model().to(device), folder).eval()
        alone = meteora.from_adapters(tiny_model().to(device), {name: folder}, top_k=1).eval()
        with torch.no_grad():
            expected = peft(ids).logits
            torch.testing.assert_close(alone(ids).logits, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[index], expected[index], rtol=1e-4, atol=1e-4)  # row 0: a, row 1: b
            if name == "a":  # row 2: a on its first 5 tokens (causal: they see nothing of the rest)
                torch.testing.assert_close(logits[2, :5], peft(ids[2:, :5]).logits[0], rtol=1e-4, atol=1e-4)

    # Gradients: rows of a alone give b's rows of lora_A / lora_B no gradient, and the other way round.
    with model.route_by_labels(torch.zeros_like(ids)):
        model(ids).logits.square().mean().backward()
    for layer in layers.values():
        assert layer.lora_A.grad[1].abs().sum() == 0 and layer.lora_B.grad[1].abs().sum() == 0
        assert layer.lora_B.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 2\), got \[0, 2\]"):
        with model.route_by_labels(torch.full_like(ids, 2).index_fill_(1, torch.tensor([0], device=device), 0)):
            pass
    with pytest.raises(ValueError, match="token_experts holds 5 labels for 33 tokens"):
        with model.route_by_labels(torch.zeros(5, dtype=torch.long, device=device)):
            model(ids)


def test_save_adapter_round_trips_an_embedded_adapter(tmp_path):
    """save_adapter on a model made from PEFT adapters of different ranks and modules gives each
    adapter back (same A, B, rank, alpha and modules); bad calls name what is wrong."""
    base = tiny_model()
    sources = {"a": make_adapter(base, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "down_proj"], seed=1),
               "b": make_adapter(base, tmp_path / "b", r=8, alpha=4, targets=ALL_LINEARS, seed=2)}
    model = meteora.from_adapters(tiny_model(), sources)
    for name, source in sources.items():
        original, copy = meteora.load_adapter(name, source), meteora.load_adapter(name, model.save_adapter(name, tmp_path / f"{name}2"))
        assert copy.modules == original.modules and copy.config["r"] == original.config["r"]
        assert copy.config["lora_alpha"] == original.config["lora_alpha"]
        for module in original.modules:
            torch.testing.assert_close(copy.lora_a[module], original.lora_a[module])
            torch.testing.assert_close(copy.lora_b[module], original.lora_b[module])
            assert copy.scaling[module] == pytest.approx(original.scaling[module])
    with pytest.raises(ValueError, match="needs at least one name"):
        meteora.new_experts(tiny_model(), [])
    with pytest.raises(ValueError, match="no linear of the base model is named nope"):
        meteora.new_experts(tiny_model(), ["a"], target_modules=["nope"])
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        model.save_adapter("c", tmp_path / "c")


def test_stacked_base_layout(tmp_path, monkeypatch):
    """stack_base: a lone linear's pack_(base=True) puts its base weight right before its [gate; A]
    rows, a group's pack_ every member's base weight before the members' blocks; by default every
    group and every lone linear but those narrowing their input (down_proj) stacks; the outputs do
    not change; set_stack_base(False) gives the base weights buffers of their own, which later packs
    keep; add_adapter carries the setting over."""
    monkeypatch.setattr(LinearGroup, "on_cpu", True)  # the group packs on the CPU too
    base = tiny_model()
    adapters = {n: make_adapter(base, tmp_path / n, r=4 + 4 * i, alpha=8, targets=ALL_LINEARS, seed=i)
                for i, n in enumerate("ab")}
    model = meteora.from_adapters(tiny_model(), adapters, top_k=2).eval()
    layers = model.meteora_layers()
    for layer in layers.values():
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    q, k, v, o = (layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qkvo")
    down = layers["model.layers.0.mlp.down_proj"]
    ids = torch.randint(0, 97, (2, 9))
    assert q.group is not None and k.stack_base and o.stack_base and not down.stack_base  # the defaults
    assert stacks_by_default(64, 32, True) and not stacks_by_default(64, 32, False) and stacks_by_default(64, 64, False)
    with torch.no_grad():
        model.set_stack_base(False)
        apart = model(ids).logits
        for layer in layers.values():
            assert layer.pack_(base=True)
        assert not _stacked([q.base_layer.weight, k.base_layer.weight, v.base_layer.weight], q.gate.weight)
        assert not _stacked([o.base_layer.weight], o.gate.weight)
        model.set_stack_base()
        stacked = model(ids).logits  # the groups' forward packs them (the CPU here: on_cpu)
        assert _stacked([q.base_layer.weight, k.base_layer.weight, v.base_layer.weight], q.gate.weight)
        assert q.group.is_packed() and not _stacked([o.base_layer.weight], o.gate.weight)
        for layer in layers.values():
            assert layer.pack_(base=True) and layer.is_packed(base=True)
        assert _stacked([o.base_layer.weight], o.gate.weight) and not _stacked([down.base_layer.weight], down.gate.weight)
        assert not _stacked([q.base_layer.weight], q.gate.weight)  # a member stacks with its group only
        model.set_stack_base(True)
        assert down.pack_(base=True) and _stacked([down.base_layer.weight], down.gate.weight)
        torch.testing.assert_close(stacked, apart, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, apart, rtol=0, atol=0)
        model.set_stack_base()  # back to the default: down_proj's base weight gets a buffer of its own
        assert not down.stack_base and not _stacked([down.base_layer.weight], down.gate.weight)
        assert down.base_layer.weight.untyped_storage().data_ptr() != down.gate.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(model(ids).logits, apart, rtol=0, atol=0)
        model.set_stack_base(False)
        assert not _stacked([o.base_layer.weight], o.gate.weight)
        assert o.base_layer.weight.untyped_storage().data_ptr() != o.gate.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(model(ids).logits, apart, rtol=0, atol=0)
        assert not _stacked([q.base_layer.weight, k.base_layer.weight, v.base_layer.weight], q.gate.weight)
        model.add_adapter("c", make_adapter(base, tmp_path / "c", r=4, alpha=8, targets=ALL_LINEARS, seed=5))
        assert not any(layer.stack_base for layer in model.meteora_layers().values())
        model.set_stack_base()
        model.add_adapter("d", make_adapter(base, tmp_path / "d", r=4, alpha=8, targets=ALL_LINEARS, seed=6))
        layers = model.meteora_layers()
        assert layers["model.layers.1.self_attn.o_proj"].stack_base and not layers["model.layers.1.mlp.down_proj"].stack_base
