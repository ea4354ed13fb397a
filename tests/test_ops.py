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
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (3e-4, 1e-4), torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 5e-2)}
GRAD_TOL = {torch.float32: (1e-3, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (3e-2, 2e-2)}
RANK_CYCLE = (4, 8, 16)


def fresh_seed() -> int:
    """A new seed for every case (printed on failure); METEORA_TEST_SEED pins it to reproduce."""
    return int(os.environ.get("METEORA_TEST_SEED", random.randrange(1 << 30)))


def _skip_unless_available(impl: str, device: str) -> None:
    if impl == "kernel" and not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")


def make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=False, ranks=None, d_in=None, d_out=None):
    """Random MeteoRA-linear inputs; experts have mixed ranks, zero-padded to the largest."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or [RANK_CYCLE[e % len(RANK_CYCLE)] for e in range(experts)]
    rank = max(ranks)
    d_in = d_in or 24 + seed % 9
    d_out = d_out or 20 + seed % 7

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


def _ref_weight(logits64, idx, mask, temperature):
    """softmax over the selected logits, absent (masked) experts at -inf; all absent: weight 0."""
    selected = logits64.gather(1, idx)
    if mask is not None:
        selected = selected.masked_fill(~mask[idx], -torch.inf)
    weight = torch.softmax(selected / temperature, -1)
    return torch.where(torch.isneginf(selected[:, :1]), 0.0, weight)


def packed(gate, lora_a):
    """gate and lora_a as adjacent rows of one buffer (the layout MeteoRALinear.pack_ keeps), with
    NaN in the padding rows (never used)."""
    return packed_group([(gate, lora_a)])[0]


def column_layout(w0, lora_b, wide, aligned=True, left=False):
    """lora_b (N, d_out, r) as the columns of a row-major buffer, after w0's when ``wide``, before
    them with ``left`` too ([B_all | W0]; the layouts MeteoRALinear.pack_(base=True) keeps), with NaN
    in the padding columns (never used): rows a multiple of 8 elements apart (16-byte loads), or
    not; with ``left``, 3 NaN columns before B_all."""
    n, d_out, r = lora_b.shape
    d_in = w0.shape[1] if wide else 0
    pad = 8 + -(d_in + n * r) % 8 if aligned else 5
    start = 3 if left else d_in  # B_all's first column
    buffer = torch.full((d_out, d_in + n * r + pad), float("nan"), dtype=w0.dtype, device=w0.device)
    buffer[:, start: start + n * r] = lora_b.permute(1, 0, 2).reshape(d_out, n * r)
    cols = buffer[:, start: start + n * r].view(d_out, n, r).permute(1, 0, 2)
    if wide:
        w_start = start + n * r if left else 0
        buffer[:, w_start: w_start + d_in] = w0
        w0 = buffer[:, w_start: w_start + d_in]
    return w0, cols


def check_linear(inp, top_k, temperature, mask=None, bias=None, pack=None, impl="kernel", what=""):
    """meteora.linear (inference op) against a float64 evaluation at the op's own selection.
    pack: None, "rows" ([gate; A] one buffer), "cols" (and B_all's columns), "wide" ([W0 | B_all]),
    "left" ([B_all | W0]); "cols5" / "wide5" / "left5": their rows not a multiple of 8 elements
    apart; "stacked": [W0; gate; A] one
    buffer, B's columns (MeteoRALinear.pack_(base=True)'s default)."""
    x, gate, lora_a, lora_b, scaling, w0 = (inp[k] for k in ("x", "gate_weight", "lora_a", "lora_b", "scaling", "weight"))
    if pack == "stacked":
        [(gate, lora_a)], [w0] = packed_group([(gate, lora_a)], [w0])
    elif pack:
        gate, lora_a = packed(gate, lora_a)
    if pack and pack != "rows":
        w0, lora_b = column_layout(w0, lora_b, pack.startswith(("wide", "left")), aligned=not pack.endswith("5"),
                                   left=pack.startswith("left"))
    result = ops.linear(x, w0, bias, gate, lora_a, lora_b, scaling, mask, top_k, temperature, impl=impl)
    verify_linear(result, x, w0, bias, gate, lora_a, lora_b, scaling, mask, top_k, temperature, what)


def verify_linear(result, x, w0, bias, gate, lora_a, lora_b, scaling, mask, top_k, temperature, what):
    """One meteora.linear result (out, logits, weight, idx) against float64 at its own selection."""
    out, logits, weight, idx = result
    tokens, experts, d_out = x.shape[0], gate.shape[0], w0.shape[0]
    assert out.shape == (tokens, d_out) and out.dtype == x.dtype, what
    assert logits.shape == (tokens, experts) and logits.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32), what
    assert weight.shape == idx.shape == (tokens, top_k) and idx.dtype == torch.long, what
    logits64 = f64(x) @ f64(gate).t()
    assert_close(logits, logits64, torch.float32, what=f"linear logits {what}")
    if tokens:
        assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), f"repeated expert {what}"
        present = logits64 if mask is None else logits64.masked_fill(~mask, -torch.inf)
        chosen = present.gather(1, idx)
        assert_close(chosen.max(-1).values, present.max(-1).values, torch.float32, what=f"linear top-1 {what}")
        assert_close(chosen[:, -1], present.topk(top_k, -1).values[:, -1], torch.float32, what=f"linear k-th {what}")
    ref_weight = _ref_weight(logits64, idx, mask, temperature)
    assert_close(weight, ref_weight, torch.float32, what=f"linear weights {what}")
    base = f64(x) @ f64(w0).t() + (0 if bias is None else f64(bias))
    ref_out, _ = reference.lora_experts(f64(x), f64(lora_a), f64(lora_b), f64(scaling), idx, ref_weight, base)
    assert_close(out, ref_out, x.dtype, what=f"linear out {what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 32, 33, 129])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (3, 3), (28, 2), (64, 8)])
def test_linear_matches_float64(device, impl, dtype, tokens, experts, top_k):
    """The inference op on both sides of its decode/prefill split (T = 32), packed and not, with a
    bias, a mask and strided x."""
    _skip_unless_available(impl, device)
    seed = fresh_seed()
    inp = make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=seed % 2 == 0)
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(experts, generator=gen) < 0.6).to(device)
    bias = (torch.randn(inp["weight"].shape[0], generator=gen)).to(device=device, dtype=dtype)
    for pack, use_mask, use_bias in [(None, False, False), ("rows", True, True), ("cols", False, True),
                                     ("wide", True, False), ("wide5", False, True), ("cols5", True, False),
                                     ("left", False, True), ("left5", True, False),
                                     ("stacked", True, True), ("stacked", False, False)]:
        check_linear(inp, top_k, 0.8, mask if use_mask else None, bias if use_bias else None, pack, impl,
                     what=f"pack={pack} mask={use_mask} bias={use_bias} seed {seed}")


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 16, 17, 32])
@pytest.mark.parametrize("d_in", [8, 40, 1032, 4096])
def test_linear_decode_shapes(device, dtype, tokens, d_in):
    """Decode-sized T through the inference op's routing GEMM (cuBLAS on the side stream with its
    own workspace) and route_expand: d_in from 8 to 4096, [gate; A] rows not a multiple of 16
    (3 experts of mixed ranks) and 28 x 8, x in rows wider than d_in (a multiple of 8 elements
    apart, and not), and a single row whose row stride is 1 (cuBLAS still needs ld >= d_in)."""
    _skip_unless_available("kernel", device)
    seed = fresh_seed()
    for experts, top_k in [(3, 2), (28, 2)]:
        inp = make_inputs(tokens, experts, top_k, dtype, device, seed, d_in=d_in, d_out=72)
        wider = {"x": inp["x"]}
        for extra in (8, 3):
            wide_x = torch.zeros(tokens, d_in + extra, device=device, dtype=dtype)
            wide_x[:, :d_in] = inp["x"]
            wider[f"x in rows of {d_in + extra}"] = wide_x[:, :d_in]
        if tokens == 1:  # one row whose row stride says nothing (cuBLAS still needs ld >= d_in)
            wider["x with row stride 1"] = inp["x"].reshape(-1).as_strided((1, d_in), (1, 1))
        for name, x in wider.items():
            for pack in (None, "rows", "stacked"):
                check_linear(dict(inp, x=x), top_k, 1.0, pack=pack,
                             what=f"{name} experts={experts} pack={pack} seed {seed}")


def packed_group(pairs, bases=()):
    """(gate, lora_a) pairs as consecutive blocks [gate_i; A_i; NaN rows up to a multiple of 8] of
    one buffer (the layout LinearGroup.pack_ keeps, with the padding never read); with ``bases``
    (base weights), those first in the same buffer (the stacked layout), returned after the pairs."""
    blocks, views, start = list(bases), [], sum(w.shape[0] for w in bases)
    for gate, lora_a in pairs:
        rows = gate.shape[0] + lora_a.shape[0] * lora_a.shape[1]
        pad = torch.full((-rows % 8, gate.shape[1]), float("nan"), dtype=gate.dtype, device=gate.device)
        blocks.append(torch.cat([gate, lora_a.reshape(-1, lora_a.shape[-1]), pad]))
        views.append((start, gate.shape[0], rows, lora_a.shape))
        start += rows + pad.shape[0]
    buffer = torch.cat(blocks)
    out = [(buffer[s: s + n], buffer[s + n: s + rows].view(shape)) for s, n, rows, shape in views]
    if not bases:
        return out
    starts = [0]
    for w in bases:
        starts.append(starts[-1] + w.shape[0])
    return out, [buffer[a:b] for a, b in zip(starts, starts[1:])]


# Members of a linear_group case: (d_out, experts, top_k, ranks, bias, mask).
GROUP_MEMBERS = [(40, 3, 2, [4, 8, 2], True, False), (24, 28, 2, None, False, True), (72, 5, 5, [1, 3, 8, 8, 2], True, True)]


def group_members(tokens, dtype, device, seed, d_in, gen):
    """GROUP_MEMBERS as LinearArgs on d_in (mixed N, k, ranks, biases, masks, temperatures)."""
    members = []
    for i, (d_out, experts, top_k, ranks, use_bias, use_mask) in enumerate(GROUP_MEMBERS):
        inp = make_inputs(tokens, experts, top_k, dtype, device, seed + i, ranks=ranks, d_in=d_in, d_out=d_out)
        bias = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype) if use_bias else None
        mask = (torch.rand(experts, generator=gen) < 0.6).to(device) if use_mask else None
        members.append(ops.LinearArgs(inp["weight"], bias, inp["gate_weight"], inp["lora_a"], inp["lora_b"],
                                      inp["scaling"], mask, top_k, 0.5 + i * 0.3))
    return members


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 32, 33, 129, 300])
def test_linear_group_matches_float64(device, impl, dtype, tokens):
    """linear_group: every member's result is meteora.linear's (against float64 at its own
    selection), with the members' [gate; A] in one buffer (one routing GEMM on CUDA, from every
    block's columns), in two members' buffers and one's own (one op per member), in buffer order
    other than the list's, with B as columns for one member and [W0 | B_all] for another (wide at
    prefill: one op per member) or for every member (one op: one routing GEMM), [B_all | W0] for
    the first of them (its [H | x] and the next one's [x | H] one buffer) or the last, biases, masks,
    mixed N, k and ranks, strided x; with the members' base weights first in that buffer (stacked:
    at decode sizes one GEMM for the bases and the routing), in list order and in another; and in
    another order (the member without bias last), B as rows and as columns."""
    _skip_unless_available(impl, device)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    d_in = 24 + seed % 17
    x = make_inputs(tokens, 1, 1, dtype, device, seed, noncontiguous=seed % 2 == 0, d_in=d_in)["x"]
    members = group_members(tokens, dtype, device, seed, d_in, gen)
    pairs = [(m.gate_weight, m.lora_a) for m in members]
    layouts = {
        "one buffer": packed_group(pairs),
        "reversed buffer": packed_group(pairs[::-1])[::-1],
        "two buffers": packed_group(pairs[:2]) + [packed(*pairs[2])],
        "unpacked": pairs,
    }
    bases = [m.base_weight for m in members]
    stacked = {"stacked": packed_group(pairs, bases),
               "stacked, bases reversed": (lambda v, w: (v, w[::-1]))(*packed_group(pairs, bases[::-1]))}
    for name, (views, base_views) in stacked.items():
        layouts[name] = views
    for name, views in layouts.items():
        for b_layout in ("rows", "cols", "wide", "all wide", "left pair", "left last"):
            group = [m._replace(gate_weight=g, lora_a=a) for m, (g, a) in zip(members, views)]
            if name in stacked:  # B as columns of its own beside every stacked layout but wide's
                group = [m._replace(base_weight=w) for m, w in zip(group, stacked[name][1])]
            # member 0's B as columns (beside W0's: wide), or every member's beside its W0's (all
            # wide: at prefill one routing GEMM, then a GEMM of [x | H] with [W0 | B_all] each;
            # left pair: member 0's before its W0's, so that members 0 and 1 read one
            # [H_0 | x | H_1]; left last: the last member's before, its [H | x] alone)
            left = {"left pair": 0, "left last": len(group) - 1}.get(b_layout, -1)
            for i in range(1 if b_layout in ("cols", "wide") else 0 if b_layout == "rows" else len(group)):
                w0, b = column_layout(group[i].base_weight, group[i].lora_b, b_layout != "cols", left=i == left)
                group[i] = group[i]._replace(base_weight=w0, lora_b=b)
            results = ops.linear_group(x, group, impl=impl)
            assert len(results) == len(group)
            for i, (m, result) in enumerate(zip(group, results)):
                verify_linear(result, x, *m, what=f"member {i}, {name}, B {b_layout}, seed {seed}")
    for b_layout in ("rows", "cols"):  # the member without bias last
        order = [members[2], members[0], members[1]]
        views = packed_group([(m.gate_weight, m.lora_a) for m in order])
        group = [m._replace(gate_weight=g, lora_a=a) for m, (g, a) in zip(order, views)]
        if b_layout == "cols":
            group = [m._replace(base_weight=w0, lora_b=b) for m in group
                     for w0, b in [column_layout(m.base_weight, m.lora_b, False)]]
        for i, (m, result) in enumerate(zip(group, ops.linear_group(x, group, impl=impl))):
            verify_linear(result, x, *m, what=f"member {i} (bias-free last), B {b_layout}, seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 7, 33, 300])
def test_linear_group_in_matches_float64(device, dtype, tokens):
    """linear_group_in: x given inside a wider buffer x_cat. Members 0 and 1 as [B_all | W0] and
    [W0 | B_all] (on CUDA at prefill sizes their selections go beside x in x_cat, no copy; member 2
    [W0 | B_all] with a copy of its own), every result against float64 at its own selection, x's
    columns unchanged; an x_cat too narrow for the H on both sides, and other layouts, give the
    same results through linear_group on the view."""
    _skip_unless_available("kernel", device)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    d_in = 24 + seed % 17
    members = group_members(tokens, dtype, device, seed, d_in, gen)
    views = packed_group([(m.gate_weight, m.lora_a) for m in members])
    group = [m._replace(gate_weight=g, lora_a=a) for m, (g, a) in zip(members, views)]
    for i in range(len(group)):
        w0, b = column_layout(group[i].base_weight, group[i].lora_b, True, left=i == 0)
        group[i] = group[i]._replace(base_weight=w0, lora_b=b)
    nr = [m.lora_b.shape[0] * m.lora_b.shape[2] for m in group]
    x = make_inputs(tokens, 1, 1, dtype, device, seed, d_in=d_in)["x"]
    x_col = -(-nr[0] // 8) * 8
    for width, what in ((x_col + d_in + nr[1] + 3, "room on both sides"), (x_col + d_in, "too narrow"),
                        (x_col + d_in + nr[1], "just wide enough")):
        x_cat = torch.full((tokens, width), float("nan"), dtype=dtype, device=device)
        x_cat[:, x_col: x_col + d_in] = x
        results = ops.linear_group_in(x_cat, x_col, d_in, group)
        assert torch.equal(x_cat[:, x_col: x_col + d_in], x), what
        for i, (m, result) in enumerate(zip(group, results)):
            verify_linear(result, x, *m, what=f"member {i}, {what}, seed {seed}")
    with pytest.raises(RuntimeError, match="x_cat"):
        torch.ops.meteora.linear_group_in(x_cat, x_col, d_in + 1000, *[list(c) for c in list(zip(*group))[:7]],
                                          [m.top_k for m in group], [m.temperature for m in group])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [3, 40, 300])
def test_linear_group_many_members(device, tokens):
    """Eleven members in one buffer: more than one route_expand launch at decode sizes (4 members
    a launch, their experts, ranks and k differing) and more than one add_delta launch (8 pieces a
    launch), one member with a single output column (its piece is too short for 16-byte steps);
    at T = 300 eleven side-stream expands, each after its own base GEMM."""
    _skip_unless_available("kernel", device)
    seed = fresh_seed()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d_in = 16 + seed % 9
    x = make_inputs(tokens, 1, 1, dtype, device, seed, d_in=d_in)["x"]
    members = []
    for i in range(11):
        inp = make_inputs(tokens, 2 + i % 3, 1 + i % 2, dtype, device, seed + i, d_in=d_in, d_out=1 if i == 4 else 8 + i)
        members.append(ops.LinearArgs(inp["weight"], None, inp["gate_weight"], inp["lora_a"], inp["lora_b"],
                                      inp["scaling"], None, 1 + i % 2, 1.0))
    views = packed_group([(m.gate_weight, m.lora_a) for m in members])
    members = [m._replace(gate_weight=g, lora_a=a) for m, (g, a) in zip(members, views)]
    for i, (m, result) in enumerate(zip(members, ops.linear_group(x, members))):
        verify_linear(result, x, *m, what=f"member {i} of 11, seed {seed}")


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA only; "cuda" in its id, for -k filters
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [33, 300, 2048])
def test_linear_fused_expand(device, dtype, tokens, monkeypatch):
    """The Hopper prefill GEMM with the experts' expand inside (opt-in; METEORA_FUSED_EXPAND=1: at
    every prefill size, =N: from N tokens), against float64 at the op's own selection: lone linears (stacked, B as columns of
    its own) and a group of three stacked members (N = 3 with k = N, 28 and 5, mixed ranks), d_in
    not a multiple of the 64-wide k-tile, d_out and T not multiples of the output tiles, N = 1,
    x in rows wider than d_in. Where the build has it and the GPU is sm_90, it counts one fused
    launch per member, and none with =0, a bias, B as an (N, d_out, r) tensor, or x's rows not
    16 bytes apart (those run the cuBLAS path, checked the same)."""
    _skip_unless_available("kernel", device)
    seed = fresh_seed()
    fused = ops.WITH_FUSED_EXPAND and torch.cuda.get_device_capability() == (9, 0)
    d_in = 8 * (5 + seed % 130)  # 40 ... 1072
    monkeypatch.setenv("METEORA_FUSED_EXPAND", "1")

    def lone(experts, top_k, d_out, layout, bias=False, x_extra=0, env="1", what=""):
        inp = make_inputs(tokens, experts, top_k, dtype, "cuda", seed, ranks=[8] * experts, d_in=d_in, d_out=d_out)
        x = inp["x"]
        if x_extra:
            wide_x = torch.zeros(tokens, d_in + x_extra, device="cuda", dtype=dtype)
            wide_x[:, :d_in] = x
            x = wide_x[:, :d_in]
        gate, lora_a, lora_b, w0 = inp["gate_weight"], inp["lora_a"], inp["lora_b"], inp["weight"]
        if layout == "stacked":
            [(gate, lora_a)], [w0] = packed_group([(gate, lora_a)], [w0])
        if layout != "rows":
            w0, lora_b = column_layout(w0, lora_b, False)
        b = torch.randn(d_out, device="cuda", dtype=dtype) if bias else None
        monkeypatch.setenv("METEORA_FUSED_EXPAND", env)
        before = ops.fused_expand_launches()
        result = ops.linear(x, w0, b, gate, lora_a, lora_b, inp["scaling"], None, top_k, 0.9)
        torch.cuda.synchronize()
        launched = ops.fused_expand_launches() - before
        verify_linear(result, x, w0, b, gate, lora_a, lora_b, inp["scaling"], None, top_k, 0.9,
                      what=f"{what} d_in {d_in} seed {seed}")
        return launched

    expect = int(fused)
    assert lone(28, 2, 1032, "stacked", what="stacked, 28 experts") == expect
    assert lone(1, 1, 40, "cols", what="B as columns, N = 1") == expect
    assert lone(3, 3, 72, "stacked", x_extra=8, what="x in rows of d_in + 8, k = N") == expect
    assert lone(28, 2, 1032, "stacked", env="0", what="METEORA_FUSED_EXPAND=0") == 0
    assert lone(3, 2, 72, "stacked", env=str(tokens), what="from T tokens") == expect
    assert lone(3, 2, 72, "stacked", env=str(tokens + 1), what="from T + 1 tokens") == 0
    with pytest.raises(RuntimeError, match="METEORA_FUSED_EXPAND must be"):
        lone(3, 2, 72, "stacked", env="yes")
    assert lone(3, 2, 72, "stacked", bias=True, what="with a bias") == 0
    assert lone(3, 2, 72, "rows", what="B as (N, d_out, r)") == 0
    assert lone(3, 2, 72, "stacked", x_extra=3, what="x in rows of d_in + 3") == 0

    monkeypatch.setenv("METEORA_FUSED_EXPAND", "1")
    x = make_inputs(tokens, 1, 1, dtype, "cuda", seed, d_in=d_in)["x"]
    members = []
    for i, (d_out, experts, top_k, ranks) in enumerate([(40, 3, 3, [4, 8, 2]), (24, 28, 2, None), (72, 5, 5, [1, 3, 8, 8, 2])]):
        inp = make_inputs(tokens, experts, top_k, dtype, "cuda", seed + i, ranks=ranks, d_in=d_in, d_out=d_out)
        members.append(ops.LinearArgs(inp["weight"], None, inp["gate_weight"], inp["lora_a"], inp["lora_b"],
                                      inp["scaling"], None, top_k, 0.5 + i * 0.3))
    views, bases = packed_group([(m.gate_weight, m.lora_a) for m in members], [m.base_weight for m in members])
    group = []
    for m, (g, a), w in zip(members, views, bases):
        w0, b = column_layout(w, m.lora_b, False)
        group.append(m._replace(gate_weight=g, lora_a=a, base_weight=w0, lora_b=b))
    before = ops.fused_expand_launches()
    results = ops.linear_group(x, group)
    torch.cuda.synchronize()
    assert ops.fused_expand_launches() - before == 3 * expect
    for i, (m, result) in enumerate(zip(group, results)):
        verify_linear(result, x, *m, what=f"group member {i}, d_in {d_in}, seed {seed}")


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
def test_linear_group_bad_lists():
    inp = make_inputs(3, 2, 1, torch.float32, "cpu", 0)
    args = [inp["x"], [inp["weight"]] * 2, [None] * 2, [inp["gate_weight"]] * 2, [inp["lora_a"]] * 2,
            [inp["lora_b"]] * 2, [inp["scaling"]], [None] * 2, [1] * 2, [1.0] * 2]
    with pytest.raises(RuntimeError, match=r"every list needs one entry per member \(2 base_weight\).*scaling 1"):
        torch.ops.meteora.linear_group(*args)
    with pytest.raises(ValueError, match="at least one member"):
        ops.linear_group(inp["x"], [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens", [1, 7, 129])
@pytest.mark.parametrize("experts,top_k,ranks", [(1, 1, [8]), (3, 3, [4, 8, 2]), (4, 2, [8, 8, 8, 8])])
def test_linear_dense_cpu_path(dtype, tokens, experts, top_k, ranks):
    """The CPU op's dense path (few small experts next to a wide base weight: one GEMM for the gate
    and every shrink, H of the selected experts, the expand as one GEMM (T = 7, 129) or over the
    selected experts only (T = 1)), every layout, mask and bias."""
    seed = fresh_seed()
    inp = make_inputs(tokens, experts, top_k, dtype, "cpu", seed, noncontiguous=seed % 2 == 0, ranks=ranks,
                      d_in=400 + seed % 9, d_out=384 + seed % 7)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(experts, generator=gen) < 0.6
    bias = torch.randn(inp["weight"].shape[0], generator=gen).to(dtype)
    for pack, use_mask, use_bias in [(None, False, False), ("rows", True, True), ("wide", True, False),
                                     ("cols5", False, True)]:
        check_linear(inp, top_k, 0.8, mask if use_mask else None, bias if use_bias else None, pack, "kernel",
                     what=f"pack={pack} mask={use_mask} bias={use_bias} seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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
        gate_p, a_p = packed(inp["gate_weight"].detach(), inp["lora_a"].detach())
        bias = torch.randn(inp["weight"].shape[0], device=device) if tokens % 2 else None
        mask = torch.arange(experts, device=device) != experts - 1
        yield "linear", (inp["x"].detach(), inp["weight"], bias, gate_p, a_p, inp["lora_b"].detach(), inp["scaling"], mask, top_k, 0.9)
    # linear_group and linear_group_in: on CUDA in bf16 at a prefill size, gate / up's layouts
    # ([B_all | W0], [W0 | B_all]: x_cat's columns beside x written), else fp32 (one op per member)
    dtype, tokens = (torch.bfloat16, 40) if device == "cuda" else (torch.float32, 9)
    seed = 5
    members = group_members(tokens, dtype, device, seed, 32, torch.Generator().manual_seed(seed))[:2]
    views = packed_group([(m.gate_weight, m.lora_a) for m in members])
    members = [m._replace(gate_weight=g, lora_a=a) for m, (g, a) in zip(members, views)]
    members = [m._replace(base_weight=w0, lora_b=b) for i, m in enumerate(members)
               for w0, b in [column_layout(m.base_weight, m.lora_b, True, left=i == 0)]]
    lists = [list(c) for c in zip(*members)]
    x = make_inputs(tokens, 1, 1, dtype, device, seed, d_in=32)["x"]
    yield "linear_group", (x, *lists)
    nr = members[0].lora_b.shape[0] * members[0].lora_b.shape[2]
    x_col = -(-nr // 8) * 8
    x_cat = torch.zeros(tokens, x_col + 32 + members[1].lora_b.shape[0] * members[1].lora_b.shape[2], dtype=dtype,
                        device=device)
    x_cat[:, x_col: x_col + 32] = x
    yield "linear_group_in", (x_cat, x_col, 32, *lists)


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")
    for name, args in _opcheck_samples(device):
        # linear_group_in writes x_cat and returns a list: torch cannot functionalize such an op (no
        # torch.compile; LinearGroup and NormIntoGroup call it only outside compilation), so its
        # check leaves out the AOT-dispatch test
        utils = ("test_schema", "test_autograd_registration", "test_faketensor") if name == "linear_group_in" \
            else torch.library._OPCHECK_DEFAULT_UTILS
        torch.library.opcheck(getattr(torch.ops.meteora, name).default, args, test_utils=utils)


def _fuzz_case(rng: random.Random, device: str):
    """One random problem: sizes on both sides of every kernel threshold (tile vs decode shrink,
    32- vs 64-token tiles, 16-byte vectors vs scalar loads, unions wider than one 256-row pass)."""
    experts = rng.choice([1, 2, 3, 5, 8, 17, 28, 64])
    top_k = rng.randint(1, min(experts, 8))
    tokens = rng.choice([0, 1, 2, 5, 31, 32, 33, 64, 65, 127, 200, 513] + ([1500, 8600] if device == "cuda" else []))
    aligned = rng.random() < 0.6
    d_in = rng.choice([8, 64, 136, 512]) if aligned else rng.randint(1, 150)
    d_out = rng.choice([8, 40, 136, 264]) if aligned else rng.randint(1, 150)
    ranks = [rng.choice([8, 16, 64]) if aligned else rng.randint(1, 64) for _ in range(experts)]
    return dict(
        tokens=tokens, experts=experts, top_k=top_k, d_in=d_in, d_out=d_out, ranks=ranks,
        dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]),
        strided=rng.random() < 0.3, masked=rng.random() < 0.3, temperature=rng.choice([0.5, 1.0, 2.0]),
    )


def _run_fuzz_case(case, device, seed):
    dtype, tokens, experts, top_k = case["dtype"], case["tokens"], case["experts"], case["top_k"]
    inp = make_inputs(tokens, experts, top_k, dtype, device, seed, noncontiguous=case["strided"],
                      ranks=case["ranks"], d_in=case["d_in"], d_out=case["d_out"])
    x, gate, lora_a, lora_b, scaling = (inp[k] for k in ("x", "gate_weight", "lora_a", "lora_b", "scaling"))
    gen = torch.Generator().manual_seed(seed + 1)
    mask = None
    if case["masked"]:
        mask = torch.rand(experts, generator=gen) < 0.7
        mask[0] = True
        mask = mask.to(device)
    base = torch.randn(tokens, case["d_out"], generator=gen).to(dtype).to(device)
    grad_out = torch.randn(tokens, case["d_out"], generator=gen).to(dtype).to(device).double()

    leaves = [t.detach().requires_grad_() for t in (x, gate, lora_a, lora_b)]
    _, weight, idx = ops.route(leaves[0], leaves[1], mask, top_k, case["temperature"], impl="kernel")
    out = ops.lora_experts(leaves[0], leaves[2], leaves[3], scaling, idx, weight, base, impl="kernel")
    (out.double() * grad_out).sum().backward()

    ref_leaves = [f64(t).requires_grad_() for t in (x, gate, lora_a, lora_b)]
    logits = ref_leaves[0] @ ref_leaves[1].t()
    ref_w = torch.softmax(logits.gather(1, idx) / case["temperature"], -1)
    if mask is not None:  # absent experts picked only when k exceeds the present ones: weight 0
        present = mask[idx]
        ref_w = torch.where(present, torch.softmax(logits.gather(1, idx).masked_fill(~present, -torch.inf) / case["temperature"], -1), 0.0)
    ref_out, _ = reference.lora_experts(ref_leaves[0], ref_leaves[2], ref_leaves[3], f64(scaling), idx, ref_w, f64(base))
    (ref_out * grad_out).sum().backward()
    what = f"{case} seed {seed}"
    if tokens:  # the selection is the top-k of the present experts (near-ties may swap order)
        z = logits.detach()
        present_z = z if mask is None else z.masked_fill(~mask, -torch.inf)
        chosen = present_z.gather(1, idx).max(-1).values
        assert_close(chosen, present_z.max(-1).values, torch.float32, what="top-1 " + what)
    assert_close(out, ref_out, dtype, what="out " + what)
    for name, leaf, ref in zip(("x", "gate", "lora_a", "lora_b"), leaves, ref_leaves):
        assert_close(leaf.grad, ref.grad, dtype, tol=GRAD_TOL, what=f"grad {name} {what}", scaled=True)
    bias = base[0] if tokens and case["masked"] else None
    layout = [None, "rows", "cols", "wide", "cols5", "wide5", "stacked", "left"][seed % 8]
    check_linear(inp, top_k, case["temperature"], mask, bias, pack=layout, what=f"{what} layout {layout}")


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_against_reference(device):
    """Randomized problems through route + lora_experts (forward and every gradient): a few hundred
    on CUDA, where the kernels have the most paths; METEORA_FUZZ_CASES overrides the count."""
    if not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")
    seed = fresh_seed()
    rng = random.Random(seed)
    cases = int(os.environ.get("METEORA_FUZZ_CASES", 300 if device == "cuda" else 40))
    for i in range(cases):
        case = _fuzz_case(rng, device)
        _run_fuzz_case(case, device, seed + i)


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_and_cuda_graph(device):
    """The ops trace under torch.compile (fullgraph) and replay inside a captured CUDA graph."""
    if not ops.kernel_available(device):
        pytest.skip(f"no compiled kernel for {device}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inp = make_inputs(70, 5, 2, dtype, device, seed=fresh_seed())

    gate_p, a_p = packed(inp["gate_weight"], inp["lora_a"])
    (g1, a1), (g2, a2) = packed_group([(inp["gate_weight"], inp["lora_a"])] * 2)
    group_args = ([inp["weight"]] * 2, [None] * 2, [g1, g2], [a1, a2], [inp["lora_b"]] * 2, [inp["scaling"]] * 2,
                  [None] * 2, [2, 1], [1.0, 0.5])
    # The stacked layout (base weights before [gate; A]): one GEMM and one routing kernel at decode sizes.
    [(gate_s, a_s)], [w_s] = packed_group([(inp["gate_weight"], inp["lora_a"])], [inp["weight"]])
    [(gs1, as1), (gs2, as2)], [ws1, ws2] = packed_group([(inp["gate_weight"], inp["lora_a"])] * 2, [inp["weight"]] * 2)
    stacked_args = ([ws1, ws2], [None] * 2, [gs1, gs2], [as1, as2], [inp["lora_b"]] * 2, [inp["scaling"]] * 2,
                    [None] * 2, [2, 1], [1.0, 0.5])

    def layer(x):
        _, w, idx = torch.ops.meteora.route(x, inp["gate_weight"], None, 2, 1.0)
        out, _ = torch.ops.meteora.lora_experts(x, inp["lora_a"], inp["lora_b"], inp["scaling"], idx, w, None)
        # The inference ops on both sides of their decode/prefill split. Each output is returned as the
        # op wrote it: a sum over them in bf16 is free to round differently once inductor fuses it.
        outs = [out]
        for rows in (x[:5], x):
            outs.append(torch.ops.meteora.linear(rows, inp["weight"], None, gate_p, a_p, inp["lora_b"], inp["scaling"],
                                                 None, 2, 1.0)[0])
            outs.extend(torch.ops.meteora.linear_group(rows, *group_args))
            outs.append(torch.ops.meteora.linear(rows, w_s, None, gate_s, a_s, inp["lora_b"], inp["scaling"],
                                                 None, 2, 1.0)[0])
            outs.extend(torch.ops.meteora.linear_group(rows, *stacked_args))
        return tuple(outs)

    x = inp["x"]
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    if device != "cuda":
        return
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_out, layer(fresh))
