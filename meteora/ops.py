"""Python face of the meteora ops: fake (meta) kernels, autograd, and the choice of kernel.

The ops live in ``torch.ops.meteora`` (declared in csrc/ops.cpp, CPU kernels in csrc/cpu/, CUDA
kernels in csrc/cuda/). They are torch custom ops, so they trace under torch.compile and CUDA
graph capture. When the compiled extension is missing, or was built without the kernels for a
tensor's device, the same functions run ``meteora.reference`` (plain PyTorch) instead.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import torch

from . import reference

log = logging.getLogger("meteora")

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.meteora.*)

    HAS_EXTENSION = True
    WITH_CUDA = bool(_C.WITH_CUDA)
    # the Hopper prefill GEMM with the experts' expand inside (csrc/sm90; built for sm_90a with CUTLASS)
    WITH_FUSED_EXPAND = bool(getattr(_C, "WITH_FUSED_EXPAND", 0))
except ImportError as err:  # pragma: no cover - depends on how the package was installed
    HAS_EXTENSION = False
    WITH_CUDA = False
    WITH_FUSED_EXPAND = False
    log.warning(
        "meteora: compiled kernels not available (%s); using the plain-PyTorch reference. "
        "Build them with `pip install --no-build-isolation .`",
        err,
    )

IMPLS = ("auto", "kernel", "reference")


def kernel_available(device: torch.device | str) -> bool:
    """Whether compiled meteora kernels exist for tensors on ``device``."""
    device_type = torch.device(device).type
    return HAS_EXTENSION and (device_type == "cpu" or (device_type == "cuda" and WITH_CUDA))


def fused_expand_launches() -> int:
    """How many fused prefill GEMMs this process has launched (0 without them).

    The fused GEMM (the experts' expand inside the base GEMM, sm_90 builds with CUTLASS) is opt-in:
    ``METEORA_FUSED_EXPAND=1`` runs it for every prefill-sized call (T > 32) of linears without
    bias whose B is kept as columns (the default layout), ``=N`` from N tokens. Off by default: on
    the H200 it loses 2-4% of whole-model prefill speed (docs/performance.md)."""
    return int(_C.fused_expand_launches()) if HAS_EXTENSION else 0


def _use_kernel(impl: str, device: torch.device) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"meteora: impl={impl!r} must be one of {IMPLS}")
    if impl == "reference":
        return False
    available = kernel_available(device)
    if impl == "kernel" and not available:
        raise RuntimeError(f"meteora: no compiled kernel for device {device} (impl='kernel')")
    return available


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
    top_k: int = 2,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(gate_logits (T, N), expert_weight (T, k), expert_idx (T, k))``.

    x: (T, d_in); gate_weight: (N, d_in); expert_mask: (N,) bool, False = absent expert.
    gate_logits and expert_weight are fp32 (fp64 for fp64 x); see ``meteora.reference.route``.
    """
    if _use_kernel(impl, x.device):
        return torch.ops.meteora.route(x, gate_weight, expert_mask, int(top_k), float(temperature))
    check_routing(gate_weight.shape[0], top_k, temperature)
    return reference.route(x, gate_weight, expert_mask, top_k, temperature)


def lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weight: torch.Tensor,
    base: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``base + sum_j w_j s_{i_j} B_{i_j} A_{i_j} x`` for every token: (T, d_out) in x's dtype.

    x: (T, d_in); lora_a: (N, r, d_in); lora_b: (N, d_out, r); scaling: (N,);
    expert_idx: (T, k) int64; expert_weight: (T, k); base: (T, d_out) or None.
    """
    if _use_kernel(impl, x.device):
        out, _ = torch.ops.meteora.lora_experts(
            x, lora_a, lora_b, scaling, expert_idx, expert_weight, base
        )
        return out
    out, _ = reference.lora_experts(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base)
    return out


def linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
    top_k: int = 2,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole MeteoRA linear for inference (no autograd):
    ``(out (T, d_out), gate_logits (T, N), expert_weight (T, k), expert_idx (T, k))`` with
    out = x W0^T (+ bias) + the routed experts. The compiled op reads ``gate_weight`` and ``lora_a``
    with one GEMM when they are adjacent rows of one buffer (``MeteoRALinear.pack_``)."""
    if _use_kernel(impl, x.device):
        return torch.ops.meteora.linear(
            x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, int(top_k), float(temperature)
        )
    check_routing(gate_weight.shape[0], top_k, temperature)
    logits, weight, idx = reference.route(x, gate_weight, expert_mask, top_k, temperature)
    base = torch.nn.functional.linear(x, base_weight, base_bias)
    out, _ = reference.lora_experts(x, lora_a, lora_b, scaling, idx, weight, base)
    return out, logits, weight, idx


class LinearArgs(NamedTuple):
    """One member of ``linear_group``: meteora.linear's arguments after x."""

    base_weight: torch.Tensor
    base_bias: torch.Tensor | None
    gate_weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor
    expert_mask: torch.Tensor | None
    top_k: int
    temperature: float


def linear_group(
    x: torch.Tensor, members: Sequence[LinearArgs], impl: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``linear`` for several linears that read the same x (q, k, v; gate, up): one
    ``(out, gate_logits, expert_weight, expert_idx)`` per member, the values ``linear`` gives. The
    compiled CUDA op computes every member's routing with one GEMM (beside all the base GEMMs) when
    their [gate; A] rows are consecutive blocks of one buffer (``LinearGroup.pack_``)."""
    if not members:
        raise ValueError("meteora: linear_group needs at least one member")
    if _use_kernel(impl, x.device):
        return _per_member(torch.ops.meteora.linear_group(x, *_member_lists(members)))
    return [linear(x, *m, impl=impl) for m in members]


def _member_lists(members: Sequence[LinearArgs]) -> list[list]:
    """The members' arguments as the compiled group ops take them: one list per LinearArgs field."""
    cols = list(zip(*members))
    return [list(c) for c in cols[:7]] + [[int(k) for k in cols[7]], [float(t) for t in cols[8]]]


def _per_member(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A group op's flat [out_0, logits_0, weight_0, idx_0, out_1, ...] as one tuple per member."""
    return [tuple(flat[i: i + 4]) for i in range(0, len(flat), 4)]


def linear_group_in(
    x_cat: torch.Tensor, x_col: int, d_in: int, members: Sequence[LinearArgs], impl: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``linear_group`` on x = x_cat[:, x_col : x_col + d_in], free to write x_cat's other columns:
    on CUDA, at prefill sizes, a pair of members kept as [B_all | W0] and [W0 | B_all] (gate / up,
    MeteoRALinear._left) writes its selections H on either side of x there and reads [H | x] and
    [x | H] in place, with no copy of x (``LinearGroup.input_columns`` gives the columns it needs).
    Not for torch.compile: torch cannot functionalize an op that writes an input and returns a list."""
    if not members:
        raise ValueError("meteora: linear_group_in needs at least one member")
    if _use_kernel(impl, x_cat.device):
        return _per_member(torch.ops.meteora.linear_group_in(x_cat, int(x_col), int(d_in), *_member_lists(members)))
    return linear_group(x_cat[:, x_col: x_col + d_in], members, impl=impl)


def check_routing(num_experts: int, top_k: int, temperature: float) -> None:
    """The routing settings every path accepts (the compiled ops check the same in C++)."""
    if not isinstance(top_k, int) or not 1 <= top_k <= min(num_experts, 8):
        raise ValueError(f"meteora: top_k={top_k!r} must be an int in [1, min(N={num_experts}, 8)]")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"meteora: temperature={temperature!r} must be a finite number > 0")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if HAS_EXTENSION:

    @torch.library.register_fake("meteora::route")
    def _route_fake(x, gate_weight, expert_mask, top_k, temperature):
        torch._check(x.dim() == 2 and gate_weight.dim() == 2 and x.shape[1] == gate_weight.shape[1])
        torch._check(1 <= top_k <= gate_weight.shape[0])
        tokens, experts = x.shape[0], gate_weight.shape[0]
        dtype = _compute_dtype(x)
        return (
            x.new_empty((tokens, experts), dtype=dtype),
            x.new_empty((tokens, top_k), dtype=dtype),
            x.new_empty((tokens, top_k), dtype=torch.long),
        )

    @torch.library.register_fake("meteora::linear")
    def _linear_fake(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k, temperature):
        torch._check(x.dim() == 2 and base_weight.dim() == 2 and x.shape[1] == base_weight.shape[1])
        torch._check(gate_weight.dim() == 2 and gate_weight.shape[1] == x.shape[1])
        torch._check(1 <= top_k <= gate_weight.shape[0])
        tokens, experts = x.shape[0], gate_weight.shape[0]
        dtype = _compute_dtype(x)
        return (
            x.new_empty((tokens, base_weight.shape[0])),
            x.new_empty((tokens, experts), dtype=dtype),
            x.new_empty((tokens, top_k), dtype=dtype),
            x.new_empty((tokens, top_k), dtype=torch.long),
        )

    @torch.library.register_fake("meteora::linear_group")
    def _linear_group_fake(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                           temperature):
        torch._check(len(base_weight) >= 1)
        outs = []
        for i in range(len(base_weight)):
            outs.extend(_linear_fake(x, base_weight[i], base_bias[i], gate_weight[i], lora_a[i], lora_b[i],
                                     scaling[i], expert_mask[i], top_k[i], temperature[i]))
        return outs

    @torch.library.register_fake("meteora::linear_group_in")
    def _linear_group_in_fake(x_cat, x_col, d_in, *members):
        torch._check(x_cat.dim() == 2 and x_col >= 0 and x_col + d_in <= x_cat.shape[1])
        return _linear_group_fake(x_cat.narrow(1, x_col, d_in), *members)

    @torch.library.register_fake("meteora::route_backward")
    def _route_backward_fake(grad_logits, grad_weight, x, gate_weight, expert_weight, expert_idx, temperature):
        return torch.empty_like(x), torch.empty_like(gate_weight)

    @torch.library.register_fake("meteora::lora_experts")
    def _lora_experts_fake(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base):
        torch._check(x.dim() == 2 and lora_a.dim() == 3 and lora_b.dim() == 3)
        torch._check(lora_a.shape[2] == x.shape[1] and lora_b.shape[2] == lora_a.shape[1])
        torch._check(expert_idx.shape[0] == x.shape[0])
        tokens, top_k = expert_idx.shape
        return (
            x.new_empty((tokens, lora_b.shape[1])),
            x.new_empty((tokens, top_k, lora_a.shape[1]), dtype=_compute_dtype(x)),
        )

    @torch.library.register_fake("meteora::lora_experts_backward")
    def _lora_experts_backward_fake(
        grad_out, grad_hidden, x, lora_a, lora_b, scaling, expert_idx, expert_weight, hidden,
        need_x, need_weight, need_lora,
    ):
        empty = x.new_empty((0,))
        return (
            torch.empty_like(x) if need_x else empty,
            torch.empty_like(expert_weight) if need_weight else empty,
            torch.empty_like(lora_a) if need_lora else empty,
            torch.empty_like(lora_b) if need_lora else empty,
        )

    def _route_setup_context(ctx, inputs, output):
        x, gate_weight, _mask, _top_k, temperature = inputs
        _logits, expert_weight, expert_idx = output
        ctx.save_for_backward(x, gate_weight, expert_weight, expert_idx)
        ctx.temperature = temperature

    def _route_backward(ctx, grad_logits, grad_weight, _grad_idx):
        x, gate_weight, expert_weight, expert_idx = ctx.saved_tensors
        grad_x, grad_gate = torch.ops.meteora.route_backward(
            grad_logits, grad_weight, x, gate_weight, expert_weight, expert_idx, ctx.temperature
        )
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_gate if needs[1] else None, None, None, None)

    torch.library.register_autograd(
        "meteora::route", _route_backward, setup_context=_route_setup_context
    )

    def _lora_setup_context(ctx, inputs, output):
        x, lora_a, lora_b, scaling, expert_idx, expert_weight, base = inputs
        _out, hidden = output
        ctx.save_for_backward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, hidden)
        ctx.base_dtype = None if base is None else base.dtype

    def _lora_backward(ctx, grad_out, grad_hidden):
        x, lora_a, lora_b, scaling, expert_idx, expert_weight, hidden = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x, need_lora, need_weight = needs[0], needs[1] or needs[2], needs[5]
        if grad_out is None:
            grad_out = x.new_zeros((x.shape[0], lora_b.shape[1]))
        grad_x, grad_w, grad_a, grad_b = torch.ops.meteora.lora_experts_backward(
            grad_out, grad_hidden, x, lora_a, lora_b, scaling, expert_idx, expert_weight, hidden,
            need_x, need_weight, need_lora,
        )
        grad_base = None
        if ctx.base_dtype is not None and needs[6]:
            grad_base = grad_out.to(ctx.base_dtype)
        return (
            grad_x if need_x else None,
            grad_a if needs[1] else None,
            grad_b if needs[2] else None,
            None,
            None,
            grad_w if need_weight else None,
            grad_base,
        )

    torch.library.register_autograd(
        "meteora::lora_experts", _lora_backward, setup_context=_lora_setup_context
    )
