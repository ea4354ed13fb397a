"""The meteora ops (compiled kernels and the plain-PyTorch reference) against a float64
evaluation of the math, gradients included. CUDA cases skip without a GPU and run on the GPU box."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from meteora import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
IMPLS = [
    pytest.param("kernel", marks=pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")),
    "reference",
]
# (rtol, atol) against the float64 evaluation, by dtype.
TOL = {torch.float32: (3e-4, 1e-4), torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 5e-2)}
GRAD_TOL = {torch.float32: (1e-3, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (3e-2, 2e-2)}
RANK_CYCLE = (4, 8, 16)


def fresh_seed() -> int:
    """A new seed for every case (printed on failure); METEORA_TEST_SEED pins it to reproduce."""
    return int(os.environ.get("METEORA_TEST_SEED", random.randrange(1 << 30)))


def _skip_unless_available(impl: str, device: str) -> None:
    if impl == "kernel" and not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")


def make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=False, ranks=None):
    """Random MeteoRA-linear inputs; experts have mixed ranks, zero-padded to the largest."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or [RANK_CYCLE[e % len(RANK_CYCLE)] for e in range(experts)]
    rank, d_in, d_out = max(ranks), 24 + seed % 9, 20 + seed % 7

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if noncontiguous:  # every other column of a wider tensor
        x = randn(tokens, 2 * d_in)[:, ::2]
        assert not x.is_contiguous() or tokens <= 1
    else:
        x = randn(tokens, d_in)
    lora_a = randn(experts, rank, d_in, scale=d_in**-0.5)
    lora_b = randn(experts, d_out, rank, scale=rank**-0.5)
    for e, r in enumerate(ranks):  # padding rows/columns are exactly zero
        lora_a[e, r:] = 0
        lora_b[e, :, r:] = 0
    return dict(
        x=x,
        gate_weight=randn(experts, d_in, scale=d_in**-0.5),
        lora_a=lora_a,
        lora_b=lora_b,
        scaling=torch.rand(experts, generator=gen).add(0.5).to(device),
        weight=randn(d_out, d_in, scale=d_in**-0.5),
        top_k=top_k,
    )


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def assert_close(actual, expected, dtype, tol=TOL, what="", scaled=False):
    """Elementwise closeness; with scaled=True atol is relative to the largest |expected| (sums
    over many tokens cancel, so a small element may carry the rounding of large terms)."""
    rtol, atol = tol[dtype]
    if scaled and expected.numel():
        atol = atol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


SHAPES = [
    (tokens, experts, top_k)
    for tokens, experts in itertools.product((0, 1, 7, 129), (1, 3, 28))
    for top_k in sorted({1, min(2, experts), min(experts, 8)})
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts,top_k", SHAPES)
def test_forward_matches_float64(device, impl, dtype, tokens, experts, top_k):
    _skip_unless_available(impl, device)
    seed = fresh_seed()
    inp = make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=True)
    x = inp["x"]

    logits, weight, idx = ops.route(x, inp["gate_weight"], None, top_k, 0.7, impl=impl)
    ref_logits, _, ref_idx = reference.route(f64(x), f64(inp["gate_weight"]), None, top_k, 0.7)
    assert logits.shape == (tokens, experts) and logits.dtype == torch.float32
    assert weight.shape == idx.shape == (tokens, top_k) and idx.dtype == torch.long
    assert_close(logits, ref_logits, torch.float32, what=f"gate logits (seed {seed})")
    # Near-ties may order differently in low precision: compare the selected logit values.
    assert_close(ref_logits.gather(1, idx), ref_logits.gather(1, ref_idx), torch.float32, what="top-k values")
    assert_close(weight, torch.softmax(ref_logits.gather(1, idx) / 0.7, -1), torch.float32, what="weights")
    if tokens:
        assert (idx.unique(dim=1).shape[1] == top_k) if tokens else True  # distinct experts per token

    base = torch.nn.functional.linear(x, inp["weight"])
    out = ops.lora_experts(x, inp["lora_a"], inp["lora_b"], inp["scaling"], idx, weight, base, impl=impl)
    ref_out, _ = reference.lora_experts(
        f64(x), f64(inp["lora_a"]), f64(inp["lora_b"]), f64(inp["scaling"]), idx, f64(weight), f64(base)
    )
    assert out.shape == (tokens, inp["lora_b"].shape[1]) and out.dtype == dtype
    assert_close(out, ref_out, dtype, what=f"lora_experts out (seed {seed})")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k", [s for s in SHAPES if s[0] in (0, 1, 129)])
def test_gradients_match_float64_autograd(device, impl, dtype, tokens, experts, top_k):
    """dx, d gate, dA, dB of route -> lora_experts (+ the gate-logit loss path) vs float64 autograd."""
    _skip_unless_available(impl, device)
    seed = fresh_seed()
    inp = make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=True)
    gen = torch.Generator().manual_seed(seed + 1)
    d_out = inp["lora_b"].shape[1]
    # Upstream gradients exactly representable in dtype, so only the kernels' rounding is measured.
    grad_out = torch.randn(tokens, d_out, generator=gen).to(dtype).to(device, torch.float64)
    grad_logits = torch.randn(tokens, experts, generator=gen).to(device, torch.float64)

    def run(fn_route, fn_lora, cast):
        leaves = {k: cast(inp[k]).detach().requires_grad_() for k in ("x", "gate_weight", "lora_a", "lora_b")}
        logits, weight, idx = fn_route(leaves["x"], leaves["gate_weight"])
        base = torch.nn.functional.linear(leaves["x"], cast(inp["weight"]))
        out = fn_lora(leaves["x"], leaves["lora_a"], leaves["lora_b"], cast(inp["scaling"]), idx, weight, base)
        loss = (out.double() * grad_out).sum() + (logits.double() * grad_logits).sum()
        loss.backward()
        return idx, {k: v.grad for k, v in leaves.items()}

    idx, grads = run(
        lambda x, g: ops.route(x, g, None, top_k, 1.3, impl=impl),
        lambda *a: ops.lora_experts(*a, impl=impl),
        lambda t: t,
    )

    def ref_route(x, g):  # same selection as the op under test, float64 weights
        logits = x @ g.t()
        return logits, torch.softmax(logits.gather(1, idx) / 1.3, -1), idx

    _, ref_grads = run(ref_route, lambda *a: reference.lora_experts(*a)[0], f64)
    for name in grads:
        assert grads[name] is not None, name
        assert_close(grads[name], ref_grads[name], dtype, tol=GRAD_TOL, what=f"grad {name} (seed {seed})", scaled=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_lower_index_and_mask(device, impl):
    _skip_unless_available(impl, device)
    # Integer logits: ties are exact in fp32.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=device)
    gate = torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 1.0]], device=device)
    _, w, idx = ops.route(x, gate, None, 3, 1.0, impl=impl)
    assert idx.tolist() == [[1, 2, 4], [3, 4, 0], [4, 1, 2]]
    # Mask experts 1 and 4: they are never picked while enough others are present.
    mask = torch.tensor([True, False, True, True, False], device=device)
    _, w, idx = ops.route(x, gate, mask, 3, 1.0, impl=impl)
    assert idx.tolist() == [[2, 0, 3], [3, 0, 2], [2, 3, 0]]
    # k larger than the number of present experts: absent ones come last with weight exactly 0.
    mask = torch.tensor([False, False, True, False, False], device=device)
    _, w, idx = ops.route(x, gate, mask, 2, 1.0, impl=impl)
    assert idx[:, 0].tolist() == [2, 2, 2]
    assert w[:, 0].tolist() == [1.0, 1.0, 1.0] and w[:, 1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_and_k(device, impl):
    _skip_unless_available(impl, device)
    inp = make_inputs(33, 6, 3, torch.float32, device, seed=fresh_seed())
    x, gate = inp["x"], inp["gate_weight"]
    logits, w1, idx1 = ops.route(x, gate, None, 1, 1.0, impl=impl)
    assert torch.equal(w1, torch.ones_like(w1)) and torch.equal(idx1[:, 0], logits.argmax(-1))
    _, w_cold, idx_cold = ops.route(x, gate, None, 3, 0.05, impl=impl)
    _, w_hot, idx_hot = ops.route(x, gate, None, 3, 50.0, impl=impl)
    assert torch.equal(idx_cold, idx_hot)  # temperature changes weights, not the selection
    assert (w_cold[:, 0] > w_hot[:, 0]).all() and (w_hot.max(-1).values - w_hot.min(-1).values < 0.05).all()
    torch.testing.assert_close(w_cold.sum(-1), torch.ones(33, device=device))
    torch.testing.assert_close(w_hot, torch.softmax(logits.gather(1, idx_hot) / 50.0, -1))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_named(impl):
    inp = make_inputs(5, 3, 2, torch.float32, "cpu", seed=0)
    x, gate = inp["x"], inp["gate_weight"]
    with pytest.raises((RuntimeError, ValueError), match="top_k=4"):
        ops.route(x, gate, None, 4, 1.0, impl=impl)
    with pytest.raises((RuntimeError, ValueError), match="temperature"):
        ops.route(x, gate, None, 2, 0.0, impl=impl)
    if impl == "kernel":
        with pytest.raises(RuntimeError, match="gate_weight must be"):
            ops.route(x, gate[:, :-1], None, 2, 1.0, impl=impl)
        _, w, idx = ops.route(x, gate, None, 2, 1.0, impl=impl)
        with pytest.raises(RuntimeError, match="lora_a must be"):
            ops.lora_experts(x, inp["lora_a"][:, :, :-1], inp["lora_b"], inp["scaling"], idx, w, impl=impl)
        with pytest.raises(RuntimeError, match="lora_b must be"):
            ops.lora_experts(x, inp["lora_a"], inp["lora_b"][:, :, :-1], inp["scaling"], idx, w, impl=impl)
        with pytest.raises(RuntimeError, match=r"expert_idx holds \d+, outside \[0, N=3\)"):
            ops.lora_experts(x, inp["lora_a"], inp["lora_b"], inp["scaling"], idx + 7, w, impl=impl)


def _opcheck_samples(device):
    for tokens, experts, top_k in [(0, 3, 2), (1, 1, 1), (7, 3, 3), (17, 28, 8)]:
        inp = make_inputs(tokens, experts, top_k, torch.float32, device, seed=tokens * 31 + experts)
        x = inp["x"].requires_grad_()
        gate = inp["gate_weight"].requires_grad_()
        yield "route", (x, gate, None, top_k, 0.9)
        _, w, idx = torch.ops.meteora.route(x.detach(), gate.detach(), None, top_k, 0.9)
        base = torch.randn(tokens, inp["lora_b"].shape[1], device=device, requires_grad=True)
        args = (x, inp["lora_a"].requires_grad_(), inp["lora_b"].requires_grad_(), inp["scaling"], idx, w.requires_grad_(), base)
        yield "lora_experts", args


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.meteora, name).default, args)
