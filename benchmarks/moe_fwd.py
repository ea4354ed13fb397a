"""Side-by-side speed of MeteoRA linears: ours against the alternatives and the hardware floor.

One run measures, on the same inputs and the same GPU:
  base        the base linears alone (F.linear)
  lora1       base + one unmerged LoRA (what PEFT runs for a single adapter)
  loop        Mixtral-style loop over experts with token gathers (the authors' training path)
  gather_bmm  per-token copies of the selected A and B + bmm (the authors' default inference path)
  dense       all experts as one shrink GEMM, masked, one expand GEMM (plain torch)
  ours        what MeteoRALinear runs: the one meteora.linear op per linear (forward without
              autograd), one meteora.linear_group op for q/k/v and for gate/up (one routing GEMM
              per group, LinearGroup); meteora.route + meteora.lora_experts + addmm when training
  ours_each   ours without the groups: one meteora.linear op per linear
  ours_separate  ours with the base weights kept apart from the [gate; A] rows (MeteoRALinear.stack_base
              = False; ours stacks them, the default): at decode sizes the base GEMMs then run beside a
              routing GEMM on a side stream instead of being one GEMM with it
  authors     the authors' Triton kernel (v4), when --reference points at their checkout
for one linear and one LLaMA layer (7 linears), T tokens, uniform or concentrated routing
(90% of tokens on experts 0 and 1), eager and CUDA-graph replay (median of many runs), plus
forward+backward for training. The floor of every case is max(bytes / copy bandwidth,
flops / bf16 GEMM rate), both measured in the same run; bytes count x, W0, the output, the gate
and the distinct experts the tokens selected. Ours and base are then replayed again in
alternation (`--paired-rounds`): the ratio of those pairs, which the GPU's clock drift between
separate measurements does not enter, is reported beside the plain ratio.

    python benchmarks/moe_fwd.py                       # LLaMA-3-8B layer, N=28, r=8, top-2
    python benchmarks/moe_fwd.py --reference external/njude-meteora --out benchmarks/results/h100
    python benchmarks/moe_fwd.py --shapes q:4096x4096 --tokens 1,4096 --experts 8

Writes results.json, results.md and results.png under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meteora import ops, reference  # noqa: E402
from meteora.layer import (  # noqa: E402
    GROUPS, NormIntoGroup, Routing, column_layout, meteora_linear, pack_rows, stacks_by_default, wide_input_columns)

LLAMA3_8B = (
    "q_proj:4096x4096,k_proj:4096x1024,v_proj:4096x1024,o_proj:4096x4096,"
    "gate_proj:4096x14336,up_proj:4096x14336,down_proj:14336x4096"
)
METHODS = ("base", "lora1", "loop", "gather_bmm", "dense", "ours", "ours_each", "ours_separate", "authors")
GRAPHABLE = {"base", "lora1", "gather_bmm", "dense", "ours", "ours_each", "ours_separate", "authors"}  # loop syncs on the host


def parse_shapes(spec: str) -> list[tuple[str, int, int]]:
    shapes = []
    for item in spec.split(","):
        name, _, dims = item.partition(":")
        try:
            d_in, d_out = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"moe_fwd: --shapes item {item!r} must be name:D_INxD_OUT") from None
        shapes.append((name, d_in, d_out))
    return shapes


class Linear:
    """One base linear with N rank-r experts and a gate, in every layout the methods need."""

    def __init__(self, name, d_in, d_out, experts, rank, dtype, gen, hot: torch.Tensor | None, columns="wide",
                 always_wide=False):
        dev = "cuda"
        self.name, self.d_in, self.d_out = name, d_in, d_out

        def randn(*shape, scale):
            return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

        self.w0 = randn(d_out, d_in, scale=d_in**-0.5)
        gate = torch.randn(experts, d_in, generator=gen, device=dev) * d_in**-0.5
        if hot is not None:  # experts 0 and 1 answer the "hot" direction of the inputs
            gate[0] += hot
            gate[1] += 0.9 * hot
        # gate and A as adjacent rows of one buffer, as MeteoRALinear keeps them (one shrink GEMM)
        (self.gate, self.a), = pack_rows([(gate.to(dtype), randn(experts, rank, d_in, scale=d_in**-0.5))])[0]
        self.b = randn(experts, d_out, rank, scale=rank**-0.5)
        self.s = torch.full((experts,), 2.0, device=dev)
        self.a_cat = self.a.reshape(experts * rank, d_in)  # dense: one shrink GEMM
        self.b_cat = self.b.permute(1, 0, 2).reshape(d_out, experts * rank).contiguous()
        # ours: lora_B as MeteoRALinear keeps it for inference (--expert-columns): "wide" (the
        # default, pack_(base=True)) as columns beside W0's where d_out > d_in, of a buffer of their
        # own elsewhere (``always_wide``: beside W0's whatever the shape, --wide-linears); "narrow": of a
        # buffer of their own everywhere; "none": the (N, d_out, r) tensor
        self.w0_ours, self.b_ours = column_layout(self.w0, self.b, columns == "wide" and (d_out > d_in or always_wide)) \
            if columns in ("wide", "narrow") else (self.w0, self.b)
        self.stacked = None  # (w0, gate, a) as views of one buffer [W0; gate; A] (stack_layout)
        self.authors = None

    def routing_torch(self, x, k):
        # fp32 logits from one bf16 GEMM, as ours: all methods then pick the same experts.
        if torch.is_grad_enabled() and (x.requires_grad or self.gate.requires_grad):
            logits = F.linear(x, self.gate).float()  # the fp32-output mm has no autograd formula
        else:
            logits = torch.mm(x, self.gate.t(), out_dtype=torch.float32)
        val, idx = logits.topk(k, dim=-1)
        return torch.softmax(val, -1), idx


# ----------------------------------------------------------------------------- the methods
def run_base(lin, x, k):
    return F.linear(x, lin.w0)


def run_lora1(lin, x, k):
    return F.linear(x, lin.w0) + F.linear(F.linear(x, lin.a[0]), lin.b[0]) * 2.0


def run_loop(lin, x, k):
    w, idx = lin.routing_torch(x, k)
    out = F.linear(x, lin.w0)
    for e in range(lin.a.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        h = F.linear(F.linear(x[tok], lin.a[e]), lin.b[e])
        out.index_add_(0, tok, h * (w[tok, slot] * lin.s[e]).unsqueeze(1).to(h.dtype))
    return out


def run_gather_bmm(lin, x, k):
    w, idx = lin.routing_torch(x, k)
    flat = idx.reshape(-1)
    a_sel, b_sel = lin.a[flat], lin.b[flat]  # (T k, r, d_in), (T k, d_out, r): per-token copies
    xr = x.repeat_interleave(k, 0).unsqueeze(-1)
    y = torch.bmm(b_sel, torch.bmm(a_sel, xr)).squeeze(-1)
    coef = (w.reshape(-1) * lin.s[flat]).unsqueeze(1).to(y.dtype)
    return F.linear(x, lin.w0) + (y * coef).view(x.shape[0], k, -1).sum(1)


def run_dense(lin, x, k):
    w, idx = lin.routing_torch(x, k)
    experts, rank = lin.a.shape[:2]
    coef = torch.zeros(x.shape[0], experts, device=x.device).scatter_(1, idx, w) * lin.s
    a_cat, b_cat = lin.a_cat, lin.b_cat
    if lin.a.requires_grad:  # training: the stacked views must carry the gradient
        a_cat = lin.a.reshape(experts * rank, -1)
        b_cat = lin.b.permute(1, 0, 2).reshape(lin.d_out, experts * rank)
    h = F.linear(x, a_cat).view(-1, experts, rank) * coef.unsqueeze(-1).to(x.dtype)
    return torch.addmm(F.linear(x, lin.w0), h.view(x.shape[0], -1), b_cat.t())


def run_ours(lin, x, k):
    if torch.is_grad_enabled() and lin.b.requires_grad:  # training: the parameters as they are
        out, _ = meteora_linear(x, lin.w0, None, lin.gate, lin.a, lin.b, lin.s, None, k, 1.0, impl="kernel")
    else:
        out, _ = meteora_linear(x, lin.w0_ours, None, lin.gate, lin.a, lin.b_ours, lin.s, None, k, 1.0, impl="kernel")
    return out


def pack_groups(linears) -> None:
    """The [gate; A] rows of the linears MeteoRALinear groups (q/k/v, gate/up: LinearGroup) as
    consecutive blocks of one buffer, each padded to a multiple of 8 rows, as LinearGroup.pack_
    keeps them; every linear's gate / a become views of it and ``group`` lists its members."""
    by_name = {lin.name: lin for lin in linears}
    for names in GROUPS:
        members = [by_name[n] for n in names if n in by_name]
        if len(members) < 2 or len({m.d_in for m in members}) != 1:
            continue
        for m, (gate, a) in zip(members, pack_rows([(m.gate, m.a) for m in members])[0]):
            m.gate, m.a = gate, a
            m.a_cat = a.reshape(-1, m.d_in)
            m.group = members
        left_first(members)


def layer_linears(shapes, routing, gen, hot_dirs, experts=28, rank=8, dtype=torch.bfloat16, columns="wide",
                  wide=frozenset(), stacked=None) -> list:
    """One Linear per (name, d_in, d_out) of ``shapes``, packed as MeteoRALinear groups and stacked
    (stack_layout's ``stacked``); with ``routing`` "concentrated", experts 0 and 1 answer each d_in's
    direction of ``hot_dirs`` (make_inputs then sends 90% of the tokens there). ``wide``: names whose B
    goes beside W0 whatever their shape (--wide-linears)."""
    hot = {d: v / v.norm() * 3.0 for d, v in hot_dirs.items()} if routing == "concentrated" else None
    linears = [Linear(n, di, do, experts, rank, dtype, gen, hot[di] if hot else None, columns, n in wide)
               for n, di, do in shapes]
    pack_groups(linears)
    stack_layout(linears, stacked)
    return linears


def left_first(members) -> None:
    """The first of two adjacent members in the [W0 | B_all] layout gets [B_all | W0] instead, as
    LinearGroup does (MeteoRALinear._left: gate / up then read one [H_gate | x | H_up])."""
    for m, nxt in zip(members, members[1:]):
        if not m.w0_ours.is_contiguous() and not nxt.w0_ours.is_contiguous():
            m.w0_ours, m.b_ours = column_layout(m.w0, m.b, True, left=True)
            return


def stacked_linears(text: str) -> bool | set[str] | None:
    """--stacked-linears (moe_fwd and e2e): '' -> None (the library's default), 'all' -> True, else
    the set of linear names."""
    return None if not text else True if text == "all" else set(text.split(","))


def stack_layout(linears, names=None) -> None:
    """ours' default layout (MeteoRALinear.stack_base, LinearGroup.pack_): each group's base
    weights right before its members' [gate; A] blocks in one buffer, every other linear's right
    before its own; kept as copies beside the separate layout, which ours_separate reads.
    ``names``: only the linears (and groups) named there, or True for all; default: the library's
    (meteora.layer.stacks_by_default: all but down_proj)."""
    done = set()
    for lin in linears:
        if id(lin) in done:
            continue
        members = getattr(lin, "group", None) or [lin]
        if any(not m.w0_ours.is_contiguous() for m in members):  # [W0 | B_all] is never stacked (_stackable)
            continue
        if names is None:
            d_out, d_in = lin.w0_ours.shape
            if not stacks_by_default(d_in, d_out, len(members) > 1):
                continue
        elif names is not True and not all(m.name in names for m in members):
            continue
        views, bases = pack_rows([(m.gate, m.a) for m in members], [m.w0_ours for m in members])
        for m, (gate, a), w0 in zip(members, views, bases):
            m.stacked = (w0, gate, a)
            done.add(id(m))


def given_inputs(linears, xs) -> dict:
    """{first member's name: (x_cat, x_col)} for each group with a [B_all | W0] / [W0 | B_all] pair:
    its x copied once into the middle of a buffer with room for both H (LinearGroup.input_columns),
    as the library's post-attention RMSNorm writes it (MeteoRAModel.set_norm_into_group, the
    default, at prefill sizes only), outside the timed calls."""
    out = {}
    if next(iter(xs.values())).shape[0] <= NormIntoGroup.DECODE_TOKENS:
        return out
    for lin in linears:
        group = getattr(lin, "group", None)
        if not group or group[0].name in out:
            continue
        for m, nxt in zip(group, group[1:]):
            if not m.w0_ours.is_contiguous() and m.w0_ours.storage_offset() > m.b_ours.storage_offset():  # [B_all | W0]
                x_col, width = wide_input_columns(*(v.b.shape[0] * v.b.shape[2] for v in (m, nxt)), lin.d_in)
                x = xs[lin.d_in]
                x_cat = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
                x_cat[:, x_col: x_col + lin.d_in] = x
                out[group[0].name] = (x_cat, x_col)
                break
    return out


def run_ours_layer(lin_list, xs, k, routings=None, stacked=True, x_cats=None):
    """ours over lin_list: one meteora.linear_group per group whose members are all in lin_list,
    one meteora.linear per other linear; outputs in lin_list's order (routings, if a list, gets
    each linear's (weight, idx)). ``stacked``: the layout of stack_layout where there is one.
    ``x_cats``: {first member's name: (x_cat, x_col)}, that group's x given inside x_cat
    (meteora.linear_group_in, as MeteoRAModel.set_norm_into_group feeds gate / up)."""
    def parts(m):
        return m.stacked if stacked and m.stacked is not None else (m.w0_ours, m.gate, m.a)

    results = {}
    for lin in lin_list:
        if id(lin) in results:
            continue
        group = getattr(lin, "group", None)
        if group and all(any(m is l for l in lin_list) for m in group):
            args = [ops.LinearArgs(*parts(m)[:1], None, *parts(m)[1:], m.b_ours, m.s, None, k, 1.0) for m in group]
            given = (x_cats or {}).get(group[0].name)
            outs = ops.linear_group_in(*given, lin.d_in, args, impl="kernel") if given else \
                ops.linear_group(xs[lin.d_in], args, impl="kernel")
            for m, (out, logits, w, idx) in zip(group, outs):
                results[id(m)] = (out, Routing(logits, w, idx))
        else:
            w0, gate, a = parts(lin)
            results[id(lin)] = meteora_linear(xs[lin.d_in], w0, None, gate, a, lin.b_ours, lin.s, None, k, 1.0,
                                              impl="kernel")
    if routings is not None:
        routings.extend((results[id(l)][1].expert_weight, results[id(l)][1].expert_idx) for l in lin_list)
    return [results[id(l)][0] for l in lin_list]


def load_authors(path: str):
    """The authors' layer_ops package from a checkout of NJUDeepEngine/meteora (kept out of git)."""
    folder = Path(path) / "MoELoRA" / "layer_ops"
    if not (folder / "layer_ops_triton.py").exists():
        raise SystemExit(f"moe_fwd: --reference {path}: no MoELoRA/layer_ops/layer_ops_triton.py there")
    pkg = types.ModuleType("authors_layer_ops")
    pkg.__path__ = [str(folder)]
    sys.modules["authors_layer_ops"] = pkg
    spec = importlib.util.spec_from_file_location("authors_layer_ops.layer_ops_triton", folder / "layer_ops_triton.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module._moelinear_fwd_inner_bmm_triton_v4


def prepare_authors(lin, fn, group=16):
    """Their v4 layout: A split into `group` slices of d_in, pre-scaled, and two 0/1 masks."""
    experts, rank, d_in = lin.a.shape
    if rank * group > 128 or d_in % group:
        return None  # the kernel asserts r * group <= 128
    hm = d_in // group
    la = (lin.a.float().view(experts, rank, group, hm).permute(0, 3, 2, 1).reshape(experts, hm, group * rank)
          * lin.s.view(-1, 1, 1)).to(lin.a.dtype).contiguous()
    lb = lin.b.transpose(1, 2).contiguous()
    mask1 = torch.zeros(group, group * rank, device="cuda", dtype=lin.a.dtype)
    for g in range(group):
        mask1[g, g * rank:(g + 1) * rank] = 1
    mask2 = torch.eye(rank, device="cuda", dtype=lin.a.dtype).repeat(group, 1)
    lin.authors = (fn, la, lb, (mask1, mask2))
    return lin.authors


def run_authors(lin, x, k):
    fn, la, lb, masks = lin.authors
    w, idx = lin.routing_torch(x, k)
    result = F.linear(x, lin.w0)
    out, _ = fn(x, result, la, lb, lin.s, torch.nn.Identity(), w.to(x.dtype), idx, masks)
    return out


RUN = dict(base=run_base, lora1=run_lora1, loop=run_loop, gather_bmm=run_gather_bmm, dense=run_dense,
           ours=run_ours, ours_each=run_ours, authors=run_authors)


# ----------------------------------------------------------------------------- measurement
def event_ms(fn) -> float:
    """Milliseconds of one fn() on the current stream, between two CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median_ms(fn, budget_s=0.4, max_iters=200, min_iters=5) -> float:
    fn()
    torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < budget_s):
        times.append(event_ms(fn))
    return statistics.median(times)


_CAPTURE_STREAM: torch.cuda.Stream | None = None


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph after a warm-up on a side stream (the usual recipe). One stream
    for every capture: each new stream would get cuBLAS workspaces of its own, which memory
    comparisons would count."""
    global _CAPTURE_STREAM
    if _CAPTURE_STREAM is None:
        _CAPTURE_STREAM = torch.cuda.Stream()
    stream = _CAPTURE_STREAM
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn) -> float | None:
    try:
        graph = capture(fn)
        torch.cuda.synchronize()
        return median_ms(graph.replay)
    except Exception as err:  # a method that cannot be captured is reported as such
        print(f"    (no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None


def alternate(replay_a, replay_b, rounds: int, timer) -> tuple[list[float], list[float]]:
    """Each of two replays timed ``rounds`` times in alternation (a b, b a, a b, ...): the GPU's
    clock drift over a run falls on both alike. ``timer(fn)`` -> seconds (or ms) of one fn()."""
    times_a, times_b = [], []
    for i in range(rounds):
        pair = ((replay_a, times_a), (replay_b, times_b))
        for replay, times in (pair if i % 2 == 0 else pair[::-1]):
            times.append(timer(replay))
    return times_a, times_b


def paired_ratio(fn_base, fn_ours, rounds: int = 20, replays: int = 10) -> dict:
    """ours' graph time over base's, both captured and replayed in alternation (``replays`` back to
    back per timing): the median of the per-round ratios and their range."""
    g_base, g_ours = capture(fn_base), capture(fn_ours)
    torch.cuda.synchronize()

    def burst(graph):
        def run():
            for _ in range(replays):
                graph.replay()
        return run

    t_base, t_ours = alternate(burst(g_base), burst(g_ours), rounds, lambda fn: event_ms(fn) / replays)
    ratios = sorted(o / b for b, o in zip(t_base, t_ours))
    return dict(paired_ratio_base=ratios[len(ratios) // 2], paired_low=ratios[0], paired_high=ratios[-1],
                paired_rounds=rounds)


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_hardware() -> dict:
    n = 1 << 30  # 1 GiB copy
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), budget_s=0.5)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b, budget_s=0.5)
    return dict(copy_bandwidth_gbs=2 * n / copy_ms / 1e6, bf16_tflops=2 * m**3 / mm_ms / 1e9)


def floor_us(linears, tokens, k, idx_by_linear, hw, elem=2) -> float:
    total = 0.0
    for lin, idx in zip(linears, idx_by_linear):
        experts, rank = lin.a.shape[:2]
        distinct = int(idx.unique().numel()) if tokens else 0
        nbytes = elem * (tokens * lin.d_in + lin.d_in * lin.d_out + tokens * lin.d_out + experts * lin.d_in
                         + distinct * rank * (lin.d_in + lin.d_out))
        flops = 2 * tokens * (lin.d_in * lin.d_out + lin.d_in * experts + k * rank * (lin.d_in + lin.d_out))
        total += max(nbytes / (hw["copy_bandwidth_gbs"] * 1e3), flops / (hw["bf16_tflops"] * 1e6))
    return total


def make_inputs(linears, tokens, routing, dtype, gen, hot_dirs):
    xs = {}
    for lin in linears:
        if lin.d_in in xs:
            continue
        x = torch.randn(tokens, lin.d_in, generator=gen, device="cuda")
        if routing == "concentrated" and tokens:
            hot = torch.rand(tokens, generator=gen, device="cuda") < 0.9
            x[hot] += 6.0 * hot_dirs[lin.d_in] / hot_dirs[lin.d_in].norm() * math.sqrt(lin.d_in) ** 0.5
        xs[lin.d_in] = x.to(dtype)
    return xs


def reference_out(lin, x, k, routing=None):
    """fp32 reference with our routing (the methods that route in bf16 may differ on near-ties):
    meteora.route's, or the given (weight, idx)."""
    w, idx = routing if routing is not None else ops.route(x, lin.gate, None, k, 1.0, impl="kernel")[1:]
    out, _ = reference.lora_experts(x.float(), lin.a.float(), lin.b.float(), lin.s, idx, w, F.linear(x.float(), lin.w0.float()))
    return out, idx


def ours_routing(lin, x, k):
    """meteora.linear's own (weight, idx): its logits come from the GEMM of the packed [gate; A]
    rows, whose fp32 rounding may differ from meteora.route's at near-ties."""
    _, routing = meteora_linear(x, lin.w0_ours, None, lin.gate, lin.a, lin.b_ours, lin.s, None, k, 1.0, impl="kernel")
    return routing.expert_weight, routing.expert_idx


def train_step(method, lin_list, xs, k, grads):
    """Forward + backward of the linears. base: grads for x and W0 (or x only, frozen);
    the LoRA methods: grads for x, the gates, A and B (W0 frozen)."""
    outs = []
    for lin in lin_list:
        x = xs[lin.d_in]
        outs.append(RUN["base" if method.startswith("base") else method](lin, x, k))
    loss = sum((o.float() * g).sum() for o, g in zip(outs, grads))
    loss.backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=LLAMA3_8B, help="name:D_INxD_OUT,... (default: one LLaMA-3-8B layer)")
    ap.add_argument("--linear", default=None, help="which shape is timed alone (default: the first)")
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", default="1,16,128,1024,4096")
    ap.add_argument("--train-tokens", default="1024,4096", help="T for forward+backward ('' to skip)")
    ap.add_argument("--routing", default="uniform,concentrated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reference", default=None, help="checkout of NJUDeepEngine/meteora (for 'authors')")
    ap.add_argument("--wide-linears", default="",
                    help="comma list of shape names whose B goes beside W0 whatever their shape (MeteoRALinear."
                         "wide_columns = 'always'; default: those with d_out > d_in)")
    ap.add_argument("--expert-columns", default="wide", choices=["narrow", "wide", "none"],
                    help="ours' lora_B layout (MeteoRALinear.expert_columns / wide_columns): beside W0's where d_out > d_in "
                         "(wide, the library's default), columns in a buffer of their own everywhere (narrow), or "
                         "the (N, d_out, r) tensor (none)")
    ap.add_argument("--paired-rounds", type=int, default=20,
                    help="ours and base again, graphs replayed in alternation this many times each; the median "
                         "per-round ratio is the row's 'paired' column (0: not)")
    ap.add_argument("--stacked-linears", default="",
                    help="ours stacks only these linears' base weights (comma list of shape names, a group only if "
                         "all its members are named), or 'all'; default: as MeteoRALinear does (all but down_proj)")
    ap.add_argument("--out", default="benchmarks/results/latest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_fwd: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not ops.kernel_available("cuda"):
        print("moe_fwd: meteora was built without CUDA kernels (pip install --no-build-isolation .)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = parse_shapes(args.shapes)
    methods = [m for m in args.methods.split(",") if m]
    authors_fn = load_authors(args.reference) if args.reference and "authors" in methods else None
    if authors_fn is None:
        methods = [m for m in methods if m != "authors"]
    single = args.linear or shapes[0][0]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    hw = measure_hardware()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {hw['copy_bandwidth_gbs']:.0f} GB/s, bf16 GEMM {hw['bf16_tflops']:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    hot_dirs = {d: torch.randn(d, generator=gen, device="cuda") for d in {s[1] for s in shapes}}
    results = dict(device=device, torch=torch.__version__, hardware=hw, experts=args.experts, rank=args.rank,
                   top_k=args.top_k, dtype=args.dtype, shapes=args.shapes, expert_columns=args.expert_columns,
                   wide_linears=args.wide_linears, rows=[])
    for routing in args.routing.split(","):
        linears = layer_linears(shapes, routing, gen, hot_dirs, args.experts, args.rank, dtype, args.expert_columns,
                                {n for n in args.wide_linears.split(",") if n}, stacked_linears(args.stacked_linears))
        if authors_fn is not None:
            for lin in linears:
                prepare_authors(lin, authors_fn)
        for scope, lin_list in (("linear", [l for l in linears if l.name == single]), ("layer", linears)):
            for tokens in [int(t) for t in args.tokens.split(",")]:
                xs = make_inputs(lin_list, tokens, routing, dtype, gen, hot_dirs)
                x_cats = given_inputs(lin_list, xs)  # gate / up's x where the library's norm writes it
                refs = [reference_out(lin, xs[lin.d_in], args.top_k) for lin in lin_list]
                idx_all = torch.cat([r[1].reshape(-1) for r in refs]) if tokens else torch.zeros(0)
                hot_share = float(((idx_all == 0) | (idx_all == 1)).float().mean()) if tokens else 0.0
                floor = floor_us(lin_list, tokens, args.top_k, [r[1] for r in refs], hw)
                print(f"[{routing} {scope} T={tokens}] floor {floor:.0f} us, pairs on experts 0/1: {hot_share:.0%}")
                base_graph = base_eager = None
                for method in methods:
                    if method == "authors" and any(l.authors is None for l in lin_list):
                        continue
                    if method == "loop" and tokens > 4096:
                        continue
                    if method in ("ours_each", "ours_separate") and (scope == "linear" or "ours" not in methods):
                        continue  # the same calls as ours there
                    if method in ("ours", "ours_separate"):
                        fn = lambda st=method == "ours": run_ours_layer(lin_list, xs, args.top_k, stacked=st,  # noqa: E731
                                                                        x_cats=x_cats)
                    else:
                        fn = lambda m=method: [RUN[m](lin, xs[lin.d_in], args.top_k) for lin in lin_list]  # noqa: E731
                    try:
                        outs = fn()
                        refs_m = refs
                        if method in ("ours", "ours_separate") and tokens:  # at its own selection
                            own = []
                            run_ours_layer(lin_list, xs, args.top_k, own, stacked=method == "ours", x_cats=x_cats)
                            refs_m = [reference_out(lin, xs[lin.d_in], args.top_k, r) for lin, r in zip(lin_list, own)]
                        elif method == "ours_each" and tokens:
                            refs_m = [reference_out(lin, xs[lin.d_in], args.top_k, ours_routing(lin, xs[lin.d_in], args.top_k))
                                      for lin in lin_list]
                        err = max(float((o.float() - r[0]).abs().max()) if tokens else 0.0 for o, r in zip(outs, refs_m))
                        if method in ("base",):
                            err = float("nan")  # no LoRA term: not comparable
                        eager = median_ms(fn) * 1e3
                        g_ms = graph_ms(fn) if method in GRAPHABLE else None
                        graph = g_ms * 1e3 if g_ms else None
                        extra = peak_extra_mb(fn)
                    except torch.OutOfMemoryError:
                        print(f"  {method:>10}: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    if method == "base":
                        base_eager, base_graph = eager, graph
                    row = dict(routing=routing, scope=scope, mode="forward", tokens=tokens, method=method,
                               eager_us=eager, graph_us=graph, floor_us=floor, extra_mb=extra, max_abs_err=err,
                               hot_share=hot_share)
                    row["ratio_base"] = (graph / base_graph) if graph and base_graph else (eager / base_eager if base_eager else None)
                    row["ratio_floor"] = (graph or eager) / floor if floor else None
                    if method in ("ours", "ours_separate") and tokens and args.paired_rounds and "base" in methods:
                        row.update(paired_ratio(
                            lambda: [RUN["base"](lin, xs[lin.d_in], args.top_k) for lin in lin_list], fn,
                            args.paired_rounds))
                    results["rows"].append(row)
                    g = f"{graph:9.1f}" if graph else "        -"
                    paired = (f"  (alternated with base: x{row['paired_ratio_base']:.3f}, rounds "
                              f"{row['paired_low']:.3f}-{row['paired_high']:.3f})" if "paired_ratio_base" in row else "")
                    print(f"  {method:>10}: eager {eager:9.1f} us  graph {g} us  x{row['ratio_base'] or 0:6.2f} base"
                          f"  x{row['ratio_floor'] or 0:6.2f} floor  +{extra:8.1f} MB  err {err:.2e}{paired}")
                del xs
            # training: forward + backward
            for tokens in [int(t) for t in args.train_tokens.split(",") if t]:
                xs = make_inputs(lin_list, tokens, routing, dtype, gen, hot_dirs)
                grads = [torch.randn(tokens, lin.d_out, generator=gen, device="cuda") for lin in lin_list]
                base_t = None
                for method in ["base", "base_frozen"] + [m for m in ("dense", "gather_bmm", "ours") if m in methods]:
                    params = []
                    for lin in lin_list:
                        lin.w0.requires_grad_(method == "base")
                        if method not in ("base", "base_frozen"):
                            for t in (lin.gate, lin.a, lin.b):
                                t.requires_grad_(True)
                                params.append(t)
                    xg = {d: v.detach().requires_grad_() for d, v in xs.items()}
                    fn = lambda m=method: train_step(m, lin_list, xg, args.top_k, grads)  # noqa: E731
                    try:
                        t_us = median_ms(fn, budget_s=0.6, max_iters=50) * 1e3
                        extra = peak_extra_mb(fn)
                    except torch.OutOfMemoryError:
                        print(f"  train {method:>10}: out of memory")
                        t_us, extra = None, None
                        torch.cuda.empty_cache()
                    for lin in lin_list:
                        lin.w0.requires_grad_(False)
                        lin.w0.grad = None
                        for t in (lin.gate, lin.a, lin.b):
                            t.requires_grad_(False)
                            t.grad = None
                    if t_us is None:
                        continue
                    if method == "base":
                        base_t = t_us
                    row = dict(routing=routing, scope=scope, mode="train", tokens=tokens, method=method, eager_us=t_us,
                               graph_us=None, floor_us=None, extra_mb=extra, max_abs_err=None,
                               ratio_base=t_us / base_t if base_t else None, ratio_floor=None)
                    results["rows"].append(row)
                    print(f"  train T={tokens} {method:>11}: {t_us:9.1f} us  x{row['ratio_base'] or 0:5.2f} base (W0 trained)"
                          f"  +{extra:8.1f} MB")
                del xs
    write_outputs(results, out_dir)
    return 0


def write_outputs(results: dict, out_dir: Path) -> None:
    def atomic(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    atomic(out_dir / "results.json", json.dumps(results, indent=1))
    hw = results["hardware"]
    lines = [
        f"# MeteoRA linears: {results['device']}",
        "",
        f"torch {results['torch']}, {results['dtype']}, N={results['experts']} experts, r={results['rank']}, "
        f"top-{results['top_k']}; shapes {results['shapes']}"
        + f"; ours' lora_B layout: --expert-columns {results.get('expert_columns') or 'none'}.",
        f"Measured in the same run: copy bandwidth {hw['copy_bandwidth_gbs']:.0f} GB/s, "
        f"bf16 GEMM {hw['bf16_tflops']:.0f} TFLOP/s.",
        "Times are medians in microseconds; `x base` and `x floor` use the CUDA-graph time where the method "
        "can be captured (the loop cannot), else eager. `+MB`: peak memory over what was allocated before the call "
        "(outputs included). `err`: max |out - fp32 reference| (the reference routes with meteora.route, and for "
        "ours with meteora.linear's own selection; methods routing from bf16 logits can differ on near-ties).",
        "",
    ]
    rows = results["rows"]
    for mode in ("forward", "train"):
        keys = sorted({(r["routing"], r["scope"], r["tokens"]) for r in rows if r["mode"] == mode},
                      key=lambda k: (k[0], k[1] != "linear", k[2]))
        if not keys:
            continue
        lines.append(f"## {'Forward' if mode == 'forward' else 'Training (forward + backward, eager)'}")
        lines.append("")
        if mode == "forward":
            lines.append("| routing | scope | T | method | eager µs | graph µs | x base | x floor | +MB | err |")
            lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
        else:
            lines.append("| routing | scope | T | method | µs | x base (W0 trained) | +MB |")
            lines.append("|---|---|---:|---|---:|---:|---:|")
        for key in keys:
            for r in rows:
                if r["mode"] != mode or (r["routing"], r["scope"], r["tokens"]) != key:
                    continue
                fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
                if mode == "forward":
                    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['method']} | {fmt(r['eager_us'], '.1f')} | "
                                 f"{fmt(r['graph_us'], '.1f')} | {fmt(r['ratio_base'], '.2f')} | {fmt(r['ratio_floor'], '.2f')} | "
                                 f"{fmt(r['extra_mb'], '.1f')} | {fmt(r['max_abs_err'], '.1e')} |")
                else:
                    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['method']} | {fmt(r['eager_us'], '.1f')} | "
                                 f"{fmt(r['ratio_base'], '.2f')} | {fmt(r['extra_mb'], '.1f')} |")
        lines.append("")
    paired = [r for r in rows if r.get("paired_ratio_base") is not None]
    if paired:
        lines += ["## ours / base with the two graphs replayed in alternation", "",
                  f"Each of {paired[0]['paired_rounds']} rounds times a burst of replays of each, in turn (a b, b a, ...), "
                  "so that the GPU's clock drift between the separate measurements above does not enter the ratio: "
                  "the median of the per-round ratios and their range.", "",
                  "| routing | scope | T | method | method / base | range |", "|---|---|---:|---|---:|---|"]
        lines += [f"| {r['routing']} | {r['scope']} | {r['tokens']} | {r['method']} | {r['paired_ratio_base']:.3f} | "
                  f"{r['paired_low']:.3f}-{r['paired_high']:.3f} |" for r in paired]
        lines.append("")
    atomic(out_dir / "results.md", "\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("moe_fwd: matplotlib missing, no plot")
        return
    routings = sorted({r["routing"] for r in rows})
    fig, axes = plt.subplots(1, len(routings), figsize=(6 * len(routings), 4.2), squeeze=False)
    for ax, routing in zip(axes[0], routings):
        for method in METHODS:
            pts = sorted((r["tokens"], r["ratio_base"]) for r in rows if r["mode"] == "forward" and r["scope"] == "layer"
                         and r["routing"] == routing and r["method"] == method and r["ratio_base"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, linewidth=2.5 if method == "ours" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / base linears (CUDA graph where possible)")
        ax.set_title(f"one layer, {routing} routing")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MeteoRA layer (N={results['experts']}, r={results['rank']}, top-{results['top_k']}) on {results['device']}")
    fig.tight_layout()
    tmp = out_dir / "results.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out_dir / "results.png")
    print(f"wrote {out_dir}/results.json, results.md, results.png")


if __name__ == "__main__":
    raise SystemExit(main())
