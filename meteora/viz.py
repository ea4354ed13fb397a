"""Pictures of routing: which adapter each token used (HTML and PNG), and adapter usage per layer and
module (PNG heatmaps)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

import torch

from ._files import atomic_write as _atomic_write

# Distinct colours (a qualitative palette); adapters beyond it reuse it.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
_LAYER = re.compile(r"layers\.(\d+)\.(?:[^.]+\.)?([^.]+)$")


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.2f})"


def routing_html(tokens: Sequence[str], weights: torch.Tensor, names: Sequence[str], path: str | Path,
                 title: str = "", prompt_tokens: int = 0) -> Path:
    """A self-contained HTML page: each token on the colour of its dominant adapter, shaded by that
    adapter's mean gate weight; hovering shows every adapter's weight. The first ``prompt_tokens``
    are the prompt (drawn with a dotted underline)."""
    path = Path(path)
    legend = " ".join(f'<span class="tok" style="background:{_rgba(colour(i), 0.8)}">{html.escape(n)}</span>'
                      for i, n in enumerate(names))
    spans = []
    for position, (token, w) in enumerate(zip(tokens, weights.tolist())):
        best = max(range(len(w)), key=w.__getitem__)
        tip = ", ".join(f"{n} {v:.2f}" for n, v in zip(names, w))
        text = html.escape(token).replace("\n", "&#8629;<br>")
        cls = "tok prompt" if position < prompt_tokens else "tok"
        spans.append(f'<span class="{cls}" style="background:{_rgba(colour(best), 0.15 + 0.85 * w[best])}" '
                     f'title="{html.escape(tip)}">{text}</span>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or "MeteoRA routing")}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}}
.tok{{white-space:pre-wrap;border-radius:3px;padding:1px 0}} .prompt{{text-decoration:underline dotted}}
.legend{{margin-bottom:1em}}</style></head>
<body><h3>{html.escape(title or "Which adapter each token used")}</h3>
<div class="legend">adapters: {legend}<br><small>colour: the adapter with the largest gate weight, averaged over
every MeteoRA linear; shade: that weight; dotted: prompt tokens; hover for all weights.</small></div>
<div>{"".join(spans)}</div></body></html>
"""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def routing_png(tokens: Sequence[str], weights: torch.Tensor, names: Sequence[str], path: str | Path,
                title: str = "", prompt_tokens: int = 0, width: float = 100.0) -> Path:
    """The same picture as routing_html, drawn with matplotlib: tokens as coloured boxes in lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    placed, x, line = [], 0.0, 0
    for token in tokens:
        text = token.replace("\n", "\u21b5")
        size = max(1.0, len(text)) + 0.6
        if x + size > width:
            x, line = 0.0, line + 1
        placed.append((x, line, size, text))
        x += size
        if "\n" in token:
            x, line = 0.0, line + 1
    lines = line + 1
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.32 * lines))
    for position, ((x, line, size, text), w) in enumerate(zip(placed, weights.tolist())):
        best = max(range(len(w)), key=w.__getitem__)
        ax.add_patch(plt.Rectangle((x, -line - 0.85), size - 0.15, 0.8, color=colour(best),
                                   alpha=0.15 + 0.85 * w[best], linewidth=0))
        ax.text(x + 0.2, -line - 0.45, text, fontsize=8, va="center", family="monospace",
                style="italic" if position < prompt_tokens else "normal")
    ax.set_xlim(0, width)
    ax.set_ylim(-lines - 0.2, 0.2)
    ax.axis("off")
    ax.legend(handles=[Patch(color=colour(i), label=n) for i, n in enumerate(names)], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=min(len(names), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def module_usage(trace, names: Sequence[str]) -> tuple[list[int], list[str], torch.Tensor]:
    """(layers, modules, usage (layers, modules, N)): each MeteoRA linear's mean gate weight per adapter
    over every token the trace saw."""
    cells = {}
    for name in trace.steps:
        match = _LAYER.search(name)
        if match:
            cells[(int(match.group(1)), match.group(2))] = trace.expert_weights(name).float().mean(0).cpu()
    layers = sorted({l for l, _ in cells})
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    modules = sorted({m for _, m in cells}, key=lambda m: (order.index(m) if m in order else len(order), m))
    usage = torch.zeros(len(layers), len(modules), len(names))
    for (l, m), w in cells.items():
        usage[layers.index(l), modules.index(m)] = w
    return layers, modules, usage


def usage_heatmap(trace, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One heatmap per adapter: its mean gate weight in every layer (rows) and module (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, modules, usage = module_usage(trace, names)
    n = len(names)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 1.9 * n, 1.5 + 0.18 * max(1, len(layers))), squeeze=False)
    for i, ax in enumerate(axes[0]):
        image = ax.imshow(usage[:, :, i].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(names[i], fontsize=9, color=colour(i))
        ax.set_xticks(range(len(modules)), [m.replace("_proj", "") for m in modules], rotation=90, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers] if i == 0 else [], fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate weight")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path
