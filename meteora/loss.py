"""The MeteoRA training objective: L = L_LM + lambda * CE_gate (DESIGN.md section 1).

CE_gate is the cross-entropy of every gate's logits against each token's task label (the index of
the adapter whose task the token came from), averaged over all gates and labelled tokens. Labels
< 0 (padding, prompt tokens you choose to skip) are ignored, and so are tokens at a gate whose
module their adapter does not adapt (that expert is masked there and cannot be chosen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import MeteoRAModel


def _recorded(model: MeteoRAModel, task_labels: torch.Tensor):
    labels = task_labels.reshape(-1)
    layers = model.meteora_layers()
    for name, layer in layers.items():
        if layer.routing is None:
            raise RuntimeError(
                f"meteora: layer '{name}' recorded no routing; call model.record_routing() before the forward"
            )
        logits = layer.routing.gate_logits
        if logits.shape[0] != labels.numel():
            raise ValueError(
                f"meteora: task_labels has {labels.numel()} tokens but layer '{name}' routed {logits.shape[0]} "
                f"in the last forward (labels must have the input_ids' shape)"
            )
        valid = labels >= 0
        valid &= layer.expert_mask[labels.clamp(min=0)]
        yield logits.masked_fill(~layer.expert_mask, float("-inf")), labels, valid


def gate_loss(model: MeteoRAModel, task_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every gate's logits vs the tokens' task labels (B, S) or (T,)."""
    total, count = None, 0
    labels_dev = task_labels.to(next(iter(model.meteora_layers().values())).expert_mask.device)
    for logits, labels, valid in _recorded(model, labels_dev):
        ce = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
        total = ce if total is None else total + ce
        count += valid.sum()
    if total is None:
        raise RuntimeError("meteora: the model has no MeteoRA layers")
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1)


def meteora_loss(
    lm_loss: torch.Tensor, model: MeteoRAModel, task_labels: torch.Tensor, gate_weight: float = 50.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_LM + gate_weight * CE_gate`` (the authors use 50) and its parts, detached."""
    ce = gate_loss(model, task_labels)
    loss = lm_loss + gate_weight * ce
    return loss, {"lm": lm_loss.detach(), "gate": ce.detach()}


@torch.no_grad()
def gate_hits(model: MeteoRAModel, task_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (task_labels flattened): how many gates pick its task adapter first, and how many
    gates count for it (labelled, and its adapter present at that gate). One pass over the layers;
    sums over any set of tokens give that set's gate accuracy."""
    hits = gates = None
    labels_dev = task_labels.to(next(iter(model.meteora_layers().values())).expert_mask.device)
    for logits, labels, valid in _recorded(model, labels_dev):
        hit = (logits.argmax(-1) == labels) & valid
        hits = hit.long() if hits is None else hits + hit
        gates = valid.long() if gates is None else gates + valid
    if hits is None:
        raise RuntimeError("meteora: the model has no MeteoRA layers")
    return hits, gates


@torch.no_grad()
def gate_accuracy(model: MeteoRAModel, task_labels: torch.Tensor) -> torch.Tensor:
    """Share of (gate, labelled token) pairs whose top-1 expert is the token's task adapter."""
    hits, gates = gate_hits(model, task_labels)
    return (hits.sum() / max(int(gates.sum()), 1)).float()
