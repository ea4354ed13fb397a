"""End-to-end speed of MeteoRA in a LLaMA-3-8B-shaped model, side by side in one run.

The model is LLaMA-3-8B's shape (32 layers, d=4096, 32 query / 8 key-value heads, SwiGLU 14336,
vocabulary 128256) with random bf16 weights, written here in plain PyTorch with a static KV cache
so that a whole decode step (sampling included) is one CUDA graph on every side; speed does not
depend on the weights' values. Every one of the 7 linears of every layer gets 28 random rank-8
adapters and a gate calibrated so that routing is concentrated as after training (most tokens on
two adapters; the run measures and reports the share). Systems:

  base        the model alone
  merged      base + one LoRA merged into the weights (what serving one adapter costs)
  gather_bmm  the authors' default inference path: per-token copies of the selected A and B + bmm
  meteora     MeteoRALinear (the meteora.linear op)

Measured: prefill throughput at 1 x 4096 and 8 x 1024 tokens (CUDA-graph replay and eager), decode
latency per token at batch 1 and 16 (128 new tokens after a 128-token prompt, greedy, every step
one graph replay; eager beside it), and peak memory (its excess over the base model against the
adapters' and gates' own bytes). Then each prefill shape again with base and meteora alternated
(`--paired-rounds`, default 10 each): the ratio of those pairs does not carry the GPU's clock drift
between the two systems' separate measurements.

    python benchmarks/e2e.py --out benchmarks/results/e2e_h100
    python benchmarks/e2e.py --layers 4 --out /tmp/e2e      # a quick look

Writes results.json, results.md and results.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_clock import ClockLog, attribute  # noqa: E402
from benchmarks.moe_fwd import alternate, capture as graph_of, stacked_linears  # noqa: E402
from meteora import MeteoRALinear  # noqa: E402
from meteora.layer import NormIntoGroup, group_linears  # noqa: E402
from meteora._files import atomic_write  # noqa: E402

SYSTEMS = ("base", "merged", "gather_bmm", "meteora")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- the model
class Config:
    def __init__(self, layers=32, dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, rope_theta=500000.0):
        self.layers, self.dim, self.heads, self.kv_heads, self.ffn, self.vocab = layers, dim, heads, kv_heads, ffn, vocab
        self.head_dim, self.rope_theta = dim // heads, rope_theta


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * hd, d, bias=False)

    def forward(self, x, cos, sin, cache, positions):
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, s, self.cfg.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.cfg.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.cfg.kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:  # prefill without a cache: causal attention over the prompt
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # static cache: write this step's keys and values at `positions`, attend to <= positions
            cache_k, cache_v = cache
            cache_k.index_copy_(2, positions, k)
            cache_v.index_copy_(2, positions, v)
            span = torch.arange(cache_k.shape[2], device=x.device)
            mask = torch.where(span[None, :] <= positions[:, None], 0.0, -math.inf).to(q.dtype)
            out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.dim), Attention(cfg)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.dim), MLP(cfg)

    def forward(self, x, cos, sin, cache, positions):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, ids, positions, caches=None, last_only=True):
        """ids (B, S); positions (S,) int64, the same for every row; caches: per layer (k, v) or None."""
        x = self.embed_tokens(ids)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], positions)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


def build_model(cfg: Config, dtype, gen: torch.Generator) -> Llama:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no fp32 copy of 8B parameters
    try:
        with torch.device("cuda"):
            model = Llama(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * fan_in**-0.5)
        # A direction every token shares, as trained models' hidden states have: it lets a gate
        # prefer two adapters for most tokens (concentrated routing).
        shared = torch.randn(cfg.dim, generator=gen, device="cuda") * cfg.dim**-0.5
        model.embed_tokens.weight.add_(shared.to(dtype))
    return model.requires_grad_(False).eval()


def linears(model: Llama):
    """(parent module, attribute, module) of the 7 adapted linears of every layer."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if hasattr(parent, name):
                    yield parent, name, getattr(parent, name)


# ----------------------------------------------------------------------------- the systems
class GatherBmmLinear(nn.Module):
    """The authors' default inference path, on the same tensors as a MeteoRALinear: bf16 gate,
    top-k, per-token copies of the selected A and B, two bmm."""

    def __init__(self, layer: MeteoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        logits = F.linear(x2, m.gate.weight).float()
        val, idx = logits.topk(m.top_k, dim=-1)
        w = torch.softmax(val, -1)
        flat = idx.reshape(-1)
        a, b = m.lora_A[flat], m.lora_B[flat]  # (T k, r, d_in), (T k, d_out, r)
        h = torch.bmm(a, x2.repeat_interleave(m.top_k, 0).unsqueeze(-1))
        y = torch.bmm(b, h).squeeze(-1) * (w.reshape(-1) * m.scaling[flat]).unsqueeze(1).to(x.dtype)
        out = F.linear(x2, m.base_layer.weight) + y.view(x2.shape[0], m.top_k, -1).sum(1)
        return out.reshape(*lead, out.shape[-1])


def add_meteora(model: Llama, experts: int, rank: int, top_k: int, gen: torch.Generator,
                expert_columns: str = "wide", groups: bool = True, stack_base: bool | set | None = None,
                wide_linears: frozenset = frozenset()) -> dict:
    """Put a MeteoRALinear with random experts in place of every adapted linear; returns them.
    With ``groups``, q/k/v and gate/up run as one op each (LinearGroup, as MeteoRAModel does);
    ``stack_base``: MeteoRALinear.stack_base (the base weights in the rows before [gate; A]), for
    every linear, or for those named in a set (q_proj, ..., down_proj; a group stacks only if all
    of its members do); None: the library's default. ``wide_linears``: linears (q_proj, ...) whose B
    goes beside W0 whatever their shape (MeteoRALinear.wide_columns = "always")."""
    layers = {}
    with torch.no_grad():
        for parent, name, lin in list(linears(model)):
            m = MeteoRALinear(lin, experts, rank, top_k=top_k).to("cuda")
            d_in, d_out = lin.in_features, lin.out_features
            for e in range(experts):
                a = torch.randn(rank, d_in, generator=gen, device="cuda") * d_in**-0.5
                b = torch.randn(d_out, rank, generator=gen, device="cuda") * rank**-0.5 * 0.05
                m.set_expert(e, a.to(lin.weight.dtype), b.to(lin.weight.dtype), scaling=2.0)
            m.gate.weight.copy_(torch.randn(experts, d_in, generator=gen, device="cuda") * d_in**-0.5)
            m.requires_grad_(False)
            m.expert_columns = expert_columns in ("wide", "narrow")
            m.wide_columns = "always" if name in wide_linears else expert_columns == "wide"
            m.stack_base = name in stack_base if isinstance(stack_base, set) else stack_base  # None: default
            setattr(parent, name, m)
            layers[(parent, name)] = m
        # The inference layout, as the first CUDA forward would make it: each group's [gate; A] rows
        # (and stacked base weights) in one buffer, then every linear's B columns (in a group, the
        # first of gate / up keeps B before W0: MeteoRALinear._left), lone linears' rows too.
        for group in group_linears(model, groups):
            group.pack_()
        for m in layers.values():
            m.pack_(base=m.expert_columns)
    return layers


def calibrate_gates(model: Llama, layers: dict, ids: torch.Tensor, strength: float = 4.0) -> None:
    """Make experts 0 and 1 the likely choice of every gate: add (strength / median projection)
    times each linear's mean input direction to their gate rows, measured on `ids`."""
    means = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: means.__setitem__(
        key, args[0].reshape(-1, args[0].shape[-1]).float())) for key, m in layers.items()]
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1], device="cuda"))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for key, m in layers.items():
            x = means[key]
            direction = x.mean(0)
            direction /= direction.norm()
            proj = (x @ direction).median().clamp_min(1e-3)
            m.gate.weight[0] += (strength / proj * direction).to(m.gate.weight.dtype)
            m.gate.weight[1] += (0.9 * strength / proj * direction).to(m.gate.weight.dtype)


def routing_share(model: Llama, layers: dict, ids: torch.Tensor) -> float:
    """Share of (token, slot) pairs on experts 0 and 1 over every MeteoRA linear."""
    hits, total = [], []
    for m in layers.values():
        m.routing_hook = lambda r: (hits.append(((r.expert_idx == 0) | (r.expert_idx == 1)).sum()),
                                    total.append(r.expert_idx.numel()))
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1], device="cuda"))
    for m in layers.values():
        m.routing_hook = None
    return float(torch.stack(hits).sum()) / sum(total)


def set_system(layers: dict, system: str) -> None:
    for (parent, name), m in layers.items():
        setattr(parent, name, m.base_layer if system in ("base", "merged") else
                GatherBmmLinear(m) if system == "gather_bmm" else m)


@torch.no_grad()
def merge_first_adapter(layers: dict, sign: float) -> None:
    for m in layers.values():
        m.base_layer.weight.add_((m.lora_B[0] @ m.lora_A[0]) * (sign * float(m.scaling[0])))


# ----------------------------------------------------------------------------- measuring
def timed(fn, repeats: int) -> float:
    """Median seconds of fn over `repeats` runs (each synchronised)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prefill(model: Llama, batch: int, tokens: int, gen: torch.Generator, repeats: int) -> dict:
    ids = torch.randint(0, model.cfg.vocab, (batch, tokens), generator=gen, device="cuda")
    positions = torch.arange(tokens, device="cuda")
    step = lambda: model(ids, positions)  # noqa: E731
    eager = timed(step, repeats)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    graph = graph_of(step)
    replay = timed(graph.replay, repeats)
    del graph
    return dict(eager_s=eager, graph_s=replay, tokens_per_s=batch * tokens / replay,
                eager_tokens_per_s=batch * tokens / eager, peak_gb=peak / 1e9, peak_over_weights_gb=(peak - before) / 1e9)


@torch.no_grad()
def paired_prefill(model: Llama, layers: dict, batch: int, tokens: int, gen: torch.Generator, rounds: int,
                   clocks: ClockLog | None = None) -> dict:
    """Base and meteora prefill graphs replayed in alternation, ``rounds`` times each: the GPU's
    clock drift over a run (the same GEMM moved by up to 13% between runs minutes apart on the
    H200) then falls on both sides alike. Returns both medians and the median of the per-round
    ratios meteora tokens/s / base tokens/s; with ``clocks``, each system's median SM clock and
    power over its replays too (``clock``: {system: {clock_mhz, power_w, samples}})."""
    device = model.embed_tokens.weight.device
    ids = torch.randint(0, model.cfg.vocab, (batch, tokens), generator=gen, device=device)
    positions = torch.arange(tokens, device=device)
    graphs = {}
    for system in ("base", "meteora"):
        set_system(layers, system)
        graphs[system] = graph_of(lambda: model(ids, positions))
    set_system(layers, "meteora")
    log = clocks if clocks is not None else ClockLog()
    first = len(log.windows)

    def labelled(system):
        def replay():
            with log.window(system):
                graphs[system].replay()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
        return replay

    t_base, t_meteora = alternate(labelled("base"), labelled("meteora"), rounds, lambda fn: timed(fn, 1))
    del graphs
    ratios = sorted(b / m for b, m in zip(t_base, t_meteora))
    return dict(batch=batch, tokens=tokens, rounds=rounds, base_s=statistics.median_high(t_base),
                meteora_s=statistics.median_high(t_meteora), ratio=ratios[len(ratios) // 2], ratio_low=ratios[0],
                ratio_high=ratios[-1], clock=attribute(log.samples, log.windows[first:]))


@torch.no_grad()
def decode(model: Llama, batch: int, prompt: int, new: int, gen: torch.Generator, repeats: int) -> dict:
    cfg = model.cfg
    span = prompt + new
    caches = [(torch.zeros(batch, cfg.kv_heads, span, cfg.head_dim, device="cuda", dtype=torch.bfloat16),
               torch.zeros(batch, cfg.kv_heads, span, cfg.head_dim, device="cuda", dtype=torch.bfloat16))
              for _ in range(cfg.layers)]
    prompt_ids = torch.randint(0, cfg.vocab, (batch, prompt), generator=gen, device="cuda")
    ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")

    def start():  # the prompt into the cache; the first new token
        logits = model(prompt_ids, torch.arange(prompt, device="cuda"), caches)
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.fill_(prompt)

    def step():  # one new token per row, greedy; everything stays on the GPU
        logits = model(ids, pos, caches)
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start()
    graph = graph_of(step)
    peak = torch.cuda.max_memory_allocated()

    def generate():
        start()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            graph.replay()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate()
    total = sorted(generate() for _ in range(repeats))[repeats // 2]
    del graph
    start()  # eager, as generate() runs without graphs: every kernel launched from Python
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new):
        step()
    torch.cuda.synchronize()
    eager = time.perf_counter() - t0
    return dict(ms_per_token=total / new * 1e3, tokens_per_s=batch * new / total, eager_ms_per_token=eager / new * 1e3,
                eager_tokens_per_s=batch * new / eager, peak_gb=peak / 1e9, peak_over_weights_gb=(peak - before) / 1e9)


def persistent_allocations(layers: dict, top: int = 12, frames: int = 14) -> list[dict]:
    """The largest live blocks allocated while memory history was recorded, other than the storage
    of the meteora modules' own tensors (their weights and packed buffers), with their stacks
    (Python frames first, innermost first; the C++ frames when there are none), or one entry naming
    the error."""
    try:
        own = {t.untyped_storage().data_ptr() for m in layers.values() for t in
               [*m.parameters(), *m.buffers(), *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]}
        snapshot = torch.cuda.memory._snapshot()
        blocks = [b for seg in snapshot["segments"] for b in seg["blocks"]
                  if b.get("state") == "active_allocated" and b.get("frames") and b.get("address") not in own]
        blocks.sort(key=lambda b: -b["size"])

        def stack(b):
            python = [f for f in b["frames"] if str(f.get("filename", "")).endswith(".py")]
            return [f"{f.get('name', '?')} ({Path(f.get('filename', '?')).name}:{f.get('line', 0)})"
                    for f in (python or b["frames"])[:frames]]

        return [dict(mib=b["size"] / 2**20, stack=stack(b)) for b in blocks[:top]]
    except Exception as err:  # a diagnostic: it must not stop the benchmark
        return [dict(error=f"{type(err).__name__}: {err}")]


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prefill", default="1x4096,8x1024", help="BATCHxTOKENS,...")
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paired-rounds", type=int, default=10,
                    help="prefill of base and meteora again, alternated this many times each (0: not)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--expert-columns", default="wide", choices=["narrow", "wide", "none"],
                    help="lora_B's layout (MeteoRALinear.expert_columns / wide_columns): beside W0's where d_out > d_in "
                         "(wide, the library's default), columns in a buffer of their own everywhere (narrow), or "
                         "the (N, d_out, r) tensor (none)")
    ap.add_argument("--wide-linears", default="",
                    help="comma list of linears (q_proj, ..., down_proj) whose B goes beside W0 whatever their shape "
                         "(MeteoRALinear.wide_columns = 'always'; default: gate_proj / up_proj only, d_out > d_in)")
    ap.add_argument("--no-norm-into-group", dest="norm_into_group", action="store_false",
                    help="each block's post-attention RMSNorm its own forward again, not writing into gate / up's "
                         "[H_gate | x | H_up] buffer (MeteoRAModel.set_norm_into_group, the library's default)")
    ap.add_argument("--no-groups", action="store_true",
                    help="one meteora.linear per linear (no LinearGroup for q/k/v and gate/up)")
    ap.add_argument("--separate-base", action="store_true",
                    help="keep every base weight in a buffer of its own (MeteoRALinear.stack_base = False), not "
                         "in the rows before its [gate; A]: decode then runs the base GEMMs beside a side-stream "
                         "routing GEMM")
    ap.add_argument("--stacked-linears", default="",
                    help="stack only these linears' base weights (comma list: q_proj,...,down_proj; a group stacks "
                         "only if all its members are named), or 'all'; default: the library's (all but down_proj, "
                         "meteora.layer.stacks_by_default)")
    ap.add_argument("--trace-memory", action="store_true",
                    help="record the stacks of the allocations that outlive meteora's set-up and first calls "
                         "(results.json: persistent_allocations)")
    ap.add_argument("--out", default="benchmarks/results/e2e_latest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("e2e: needs a CUDA GPU", file=sys.stderr)
        return 2
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"e2e: --systems: unknown {bad}; choose from {SYSTEMS}", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    cfg = Config(layers=args.layers)
    t0 = time.time()
    model = build_model(cfg, torch.bfloat16, gen)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    device = torch.cuda.get_device_name()
    print(f"{device}: LLaMA-3-8B-shaped model, {cfg.layers} layers, {weights_gb:.2f} GB of bf16 weights "
          f"({time.time() - t0:.0f} s to build)", flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",") if s]
    batches = [int(b) for b in args.decode_batches.split(",") if b]
    results = dict(device=device, torch=torch.__version__, layers=cfg.layers, experts=args.experts, rank=args.rank,
                   top_k=args.top_k, expert_columns=args.expert_columns, groups=not args.no_groups, prompt=args.prompt,
                   new_tokens=args.new_tokens, weights_gb=weights_gb, rows=[])

    def run(system: str) -> None:
        for batch, tokens in shapes:
            r = prefill(model, batch, tokens, gen, args.repeats)
            results["rows"].append(dict(system=system, mode="prefill", batch=batch, tokens=tokens, **r))
            print(f"  {system:>10} prefill {batch}x{tokens}: {r['tokens_per_s']:9.0f} tok/s (graph), "
                  f"{r['eager_tokens_per_s']:9.0f} tok/s (eager), peak {r['peak_gb']:.2f} GB", flush=True)
            torch.cuda.empty_cache()
        for batch in batches:
            r = decode(model, batch, args.prompt, args.new_tokens, gen, args.repeats)
            results["rows"].append(dict(system=system, mode="decode", batch=batch, tokens=args.new_tokens, **r))
            print(f"  {system:>10} decode batch {batch}: {r['ms_per_token']:7.2f} ms/token (graph), "
                  f"{r['eager_ms_per_token']:7.2f} ms/token (eager), {r['tokens_per_s']:8.0f} tok/s, "
                  f"peak {r['peak_gb']:.2f} GB", flush=True)
            torch.cuda.empty_cache()

    # One capture first, so that the capture stream's cuBLAS workspace exists before any
    # measurement (else the base model's first case would be measured without it).
    warm = torch.randn(64, cfg.dim, device="cuda", dtype=torch.bfloat16)
    graph_of(lambda: model.lm_head(warm))
    del warm
    if "base" in systems:
        run("base")
    allocated_before = torch.cuda.memory_allocated()
    if args.trace_memory:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="all")
    stacked = False if args.separate_base else stacked_linears(args.stacked_linears)
    wide = frozenset(n for n in args.wide_linears.split(",") if n)
    layers = add_meteora(model, args.experts, args.rank, args.top_k, gen, args.expert_columns, not args.no_groups,
                         stack_base=stacked, wide_linears=wide)
    results["wide_linears"] = sorted(wide)
    if args.norm_into_group:  # as MeteoRAModel does by default for Hugging Face models
        results["norm_into_group"] = sum(NormIntoGroup.install(blk.post_attention_layernorm, blk.mlp)
                                         for blk in model.layers)
    results["stack_base"] = sorted(stacked) if isinstance(stacked, set) else "default" if stacked is None else stacked
    # The adapters' and gates' own weights (issue 7's memory budget), and what the packed layout
    # adds to them: the [gate; A] buffer's rows up to a multiple of 8 (B's columns beside W0's in
    # gate_proj / up_proj, MeteoRALinear.pack_(base=True), take no more than B itself).
    adapter_gb = sum(sum(t.numel() * t.element_size() for t in (m.gate.weight, m.lora_A, m.lora_B))
                     for m in layers.values()) / 1e9
    rows_buffers = {m.gate.weight.untyped_storage().data_ptr(): m.gate.weight.untyped_storage().nbytes()
                    for m in layers.values()}  # one per linear, or one per group
    stacked_w0 = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers.values()
                     if m.base_layer.weight.untyped_storage().data_ptr() in rows_buffers)  # stack_base
    packed_gb = (sum(rows_buffers.values()) - stacked_w0 + sum(m.lora_B.numel() * m.lora_B.element_size()
                                                               for m in layers.values())) / 1e9
    results["adapters_gb"] = adapter_gb
    results["packed_adapters_gb"] = packed_gb
    set_system(layers, "meteora")
    calib = torch.randint(0, cfg.vocab, (1, 512), generator=gen, device="cuda")
    calibrate_gates(model, layers, calib)
    probe = torch.randint(0, cfg.vocab, (2, 512), generator=gen, device="cuda")
    results["routing_share_top2"] = routing_share(model, layers, probe)
    # What meteora keeps allocated once set up and called (the adapters, and whatever its first
    # calls leave behind, such as cuBLAS workspaces).
    results["meteora_static_gb"] = (torch.cuda.memory_allocated() - allocated_before) / 1e9
    if args.trace_memory:
        results["persistent_allocations"] = persistent_allocations(layers)
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f"adapters + gates: {adapter_gb:.2f} GB; pairs on experts 0/1 (fresh tokens): "
          f"{results['routing_share_top2']:.0%}", flush=True)
    for system in systems:
        if system == "base":
            continue
        set_system(layers, system)
        if system == "merged":
            merge_first_adapter(layers, +1.0)
        run(system)
        if system == "merged":
            merge_first_adapter(layers, -1.0)
    if args.paired_rounds and "base" in systems and "meteora" in systems:
        results["paired_prefill"] = []
        # the SM clock and power of each system's replays; nvidia-smi names the GPU by PCI address
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        smi_id = None
        if torch.cuda.device_count() > 1 and isinstance(getattr(props, "pci_bus_id", None), int):
            smi_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        with ClockLog(device=smi_id) as clocks:
            for batch, tokens in shapes:
                r = paired_prefill(model, layers, batch, tokens, gen, args.paired_rounds, clocks)
                results["paired_prefill"].append(r)
                c = r["clock"]
                clock = (f"; SM clock base {c['base']['clock_mhz']:.0f} / meteora {c['meteora']['clock_mhz']:.0f} MHz, "
                         f"power {c['base']['power_w']:.0f} / {c['meteora']['power_w']:.0f} W"
                         if "base" in c and "meteora" in c else "")
                print(f"  paired prefill {batch}x{tokens}: meteora / base tokens/s {r['ratio']:.3f} (rounds "
                      f"{r['ratio_low']:.3f}-{r['ratio_high']:.3f}, {args.paired_rounds} alternations){clock}",
                      flush=True)
                torch.cuda.empty_cache()
    write_outputs(results, Path(args.out))
    return 0


def summary(results: dict) -> list[dict]:
    rows = results["rows"]
    base = {(r["mode"], r["batch"], r["tokens"]): r for r in rows if r["system"] == "base"}
    authors = {(r["mode"], r["batch"], r["tokens"]): r for r in rows if r["system"] == "gather_bmm"}
    out = []
    for r in rows:
        key = (r["mode"], r["batch"], r["tokens"])
        b, a = base.get(key), authors.get(key)
        out.append(dict(r, vs_base=r["tokens_per_s"] / b["tokens_per_s"] if b else None,
                        vs_gather_bmm=r["tokens_per_s"] / a["tokens_per_s"] if a else None,
                        vs_gather_bmm_eager=r["eager_tokens_per_s"] / a["eager_tokens_per_s"] if a else None,
                        peak_over_base_gb=r["peak_gb"] - b["peak_gb"] if b else None))
    return out


def verdicts(results: dict, rows: list[dict]) -> list[str]:
    """Issue 7's targets against this run's meteora rows."""
    ours = [r for r in rows if r["system"] == "meteora" and r["vs_base"] is not None]
    lines = []
    for r in ours:
        shape = f"{r['batch']}x{r['tokens']}" if r["mode"] == "prefill" else f"batch {r['batch']}"
        need = 0.90 if r["mode"] == "prefill" else 0.85
        lines.append(f"- {r['mode']} {shape}: {r['vs_base']:.3f}x the base model's tokens/s (target >= {need}): "
                     f"{'met' if r['vs_base'] >= need else 'NOT met'}")
        if r["vs_gather_bmm"] is not None:
            lines.append(f"- {r['mode']} {shape}: {r['vs_gather_bmm']:.2f}x gather-bmm with graphs on both sides, "
                         f"{r['vs_gather_bmm_eager']:.2f}x eager (target >= 5x)")
    for r in results.get("paired_prefill", []):
        lines.append(f"- prefill {r['batch']}x{r['tokens']}, base and meteora alternated {r['rounds']} times: "
                     f"{r['ratio']:.3f}x (rounds {r['ratio_low']:.3f}-{r['ratio_high']:.3f}; target >= 0.9): "
                     f"{'met' if r['ratio'] >= 0.90 else 'NOT met'}")
        c = r.get("clock", {})
        if "base" in c and "meteora" in c:
            lines.append(f"  (median SM clock over the replays: base {c['base']['clock_mhz']:.0f} MHz at "
                         f"{c['base']['power_w']:.0f} W, meteora {c['meteora']['clock_mhz']:.0f} MHz at "
                         f"{c['meteora']['power_w']:.0f} W)")
    if results.get("meteora_static_gb") is not None:
        lines.append(f"- kept allocated by meteora once set up and first called: {results['meteora_static_gb']:.3f} GB")
    over = max((r["peak_over_base_gb"] for r in ours if r["peak_over_base_gb"] is not None), default=None)
    if over is not None:
        limit = 1.05 * results["adapters_gb"]
        packed = results.get("packed_adapters_gb")
        held = f", held packed in {packed:.3f} GB" if packed else ""
        lines.append(f"- peak memory over the base model: at most {over:.3f} GB; adapters' and gates' own weights "
                     f"{results['adapters_gb']:.3f} GB{held} (+5%: {limit:.3f} GB): {'met' if over <= limit else 'NOT met'}")
    return lines


def write_outputs(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary(results)
    results = dict(results, rows=rows)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    lines = [f"# End to end: LLaMA-3-8B-shaped model, {results['device']}", "",
             f"torch {results['torch']}, bf16, {results['layers']} layers, {results['weights_gb']:.1f} GB of weights; "
             f"{results['experts']} adapters of rank {results['rank']} on all 7 linears of every layer, top-{results['top_k']} "
             f"({results['adapters_gb']:.2f} GB of adapters and gates); routing: {results['routing_share_top2']:.0%} of "
             f"(token, slot) pairs on the two favourite adapters.",
             f"Prefill: tokens/s of one forward (CUDA-graph replay; eager beside it). Decode: {results['new_tokens']} "
             f"greedy tokens after a {results['prompt']}-token prompt, static KV cache, one graph replay per token.", "",
             "| mode | batch x tokens | system | tokens/s | ms/token | x base | x gather_bmm | eager tokens/s | peak GB | over base GB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        shape = f"{r['batch']}x{r['tokens']}" if r["mode"] == "prefill" else f"{r['batch']} x {r['tokens']} new"
        lines.append(f"| {r['mode']} | {shape} | {r['system']} | {r['tokens_per_s']:.0f} | {f(r.get('ms_per_token'), '.2f')} "
                     f"| {f(r['vs_base'], '.2f')} | {f(r['vs_gather_bmm'], '.1f')} | {f(r.get('eager_tokens_per_s'), '.0f')} "
                     f"| {r['peak_gb']:.2f} | {f(r['peak_over_base_gb'], '.2f')} |")
    lines += ["", "Targets (issue 7):", *verdicts(results, rows)]
    text = "\n".join(lines) + "\n"
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("e2e: matplotlib missing; no plot")
    else:
        cases = sorted({(r["mode"], r["batch"], r["tokens"]) for r in rows})
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / max(1, len(systems))
        for i, s in enumerate(systems):
            vals = [next((r["vs_base"] or 0 for r in rows if r["system"] == s and (r["mode"], r["batch"], r["tokens"]) == c), 0)
                    for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=s)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{m}\n{b}x{t}" if m == "prefill" else f"{m}\nbatch {b}" for m, b, t in cases])
        ax.set_ylabel("tokens/s relative to base")
        ax.set_title(f"LLaMA-3-8B shape, {results['experts']} adapters, {results['device']}")
        ax.legend()
        fig.tight_layout()
        atomic_write(out_dir / "results.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"wrote {out_dir}/results.json, results.md, results.png")


if __name__ == "__main__":
    raise SystemExit(main())
