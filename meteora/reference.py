"""The MeteoRA math in plain PyTorch: the oracle every kernel is tested against, and the path
used when the compiled extension is missing.

One MeteoRA linear wraps a frozen base linear ``W0 (d_out, d_in)`` and N LoRA experts.
Expert e has ``A_e (r, d_in)``, ``B_e (d_out, r)`` (zero-padded to the largest rank r, which is
exact) and scaling ``s_e``. The gate is ``G (N, d_in)``. For every token x (a row of ``x``)::

    z    = G x                              gate logits, accumulated in fp32
    v, i = topk(z, k)                       ties broken toward the lower expert index
    w    = softmax(v / tau)                 over the k selected logits (k = 1 gives w = 1)
    y    = W0 x (+ bias) + sum_j w_j s_{i_j} B_{i_j} A_{i_j} x

Experts absent from a module are masked (``expert_mask`` False): their logit is -inf for top-k,
so they are picked only when k exceeds the number of present experts, and then get weight 0.
Gradients flow to x, G (through w and v, not the indices), A and B; autograd derives them here.
"""

from __future__ import annotations

import torch


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_mask: torch.Tensor | None,
    top_k: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of every token.

    x: (T, d_in); gate_weight: (N, d_in); expert_mask: (N,) bool or None.
    Returns gate_logits (T, N) fp32 (raw, before the mask), expert_weight (T, k) fp32 and
    expert_idx (T, k) int64, the selected experts in descending logit order.
    """
    gate_logits = x.float() @ gate_weight.float().t()
    masked = gate_logits
    if expert_mask is not None:
        masked = gate_logits.masked_fill(~expert_mask.bool(), float("-inf"))
    # A stable descending sort keeps the lower index first among equal logits.
    _, order = torch.sort(masked.detach(), dim=-1, descending=True, stable=True)
    expert_idx = order[:, :top_k]
    selected = masked.gather(1, expert_idx)
    expert_weight = torch.softmax(selected / temperature, dim=-1)
    # A token whose every expert is masked adds nothing (softmax of all -inf would be NaN).
    expert_weight = torch.where(torch.isneginf(selected[:, :1]), 0.0, expert_weight)
    return gate_logits, expert_weight, expert_idx


def lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weight: torch.Tensor,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of the selected LoRA experts, added to ``base`` when given.

    x: (T, d_in); lora_a: (N, r, d_in); lora_b: (N, d_out, r); scaling: (N,);
    expert_idx: (T, k) int; expert_weight: (T, k); base: (T, d_out) or None.
    Returns out (T, d_out) in x's dtype and hidden (T, k, r) = A_{i_j} x, the experts' shrunk
    activations in fp32 (fp64 for fp64 x), kept for the backward pass.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, af, bf = x.to(compute), lora_a.to(compute), lora_b.to(compute)
    # Every expert's shrink, then keep the selected ones: O(T * N * r) memory, no weight copies.
    hidden_all = torch.einsum("ti,nri->tnr", xf, af)  # (T, N, r)
    hidden = hidden_all.gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, af.shape[1]))
    # coef[t, e] = w_j * s_e where e = expert_idx[t, j], zero for experts not selected.
    coef = torch.zeros(x.shape[0], af.shape[0], dtype=compute, device=x.device)
    coef = coef.scatter_add(1, expert_idx, expert_weight.to(compute) * scaling.to(compute)[expert_idx])
    out = torch.einsum("tnr,nor->to", hidden_all * coef.unsqueeze(-1), bf)
    if base is not None:
        out = out + base.to(compute)
    return out.to(x.dtype), hidden


def meteora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    top_k: int,
    temperature: float,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One whole MeteoRA linear on x (T, d_in) without dropout: the contract in one call."""
    _, expert_weight, expert_idx = route(x, gate_weight, expert_mask, top_k, temperature)
    base = torch.nn.functional.linear(x, weight, bias)
    out, _ = lora_experts(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base)
    return out
