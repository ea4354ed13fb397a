"""Embed N PEFT LoRA adapters in a Hugging Face causal LM as MeteoRA layers; save and load."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ._files import atomic_folder as _atomic_folder
from ._files import atomic_write as _atomic_write
from .adapters import TARGET_MODULES, AdapterError, LoraAdapter, load_adapter
from .layer import MeteoRALinear, NormIntoGroup, Routing, check_routing, group_linears

CONFIG_NAME = "meteora_config.json"
WEIGHTS_NAME = "meteora_model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A MeteoRA checkpoint that does not match its config or its base model."""


class MeteoRAModel(nn.Module):
    """A causal LM whose adapted linears are MeteoRALinear layers.

    Calls go to the wrapped Hugging Face model (``forward``, ``generate``, ``config``...). Experts are
    ordered as ``adapter_names``; a token's task label is its adapter's index in that list.
    """

    def __init__(self, model: nn.Module, adapter_names: Sequence[str], base_model_id: str, lora_dropout: float):
        super().__init__()
        self.model = model
        self.adapter_names = list(adapter_names)
        self.base_model_id = base_model_id
        self.lora_dropout = lora_dropout
        self.grouped = True
        self.group_linears()
        self.norm_into_group = True
        self.set_norm_into_group()

    # -- delegation -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- routing ----------------------------------------------------------------------------
    def meteora_layers(self) -> dict[str, MeteoRALinear]:
        """Every MeteoRA linear, by its module name in the wrapped model."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MeteoRALinear)}

    @property
    def num_experts(self) -> int:
        return len(self.adapter_names)

    @property
    def top_k(self) -> int:
        return next(iter(self.meteora_layers().values())).top_k

    @property
    def temperature(self) -> float:
        return next(iter(self.meteora_layers().values())).temperature

    def set_routing(self, top_k: int | None = None, temperature: float | None = None) -> None:
        """Change k and the softmax temperature of every gate (takes effect at the next forward)."""
        check_routing(self.num_experts, self.top_k if top_k is None else top_k,
                      self.temperature if temperature is None else temperature)
        for layer in self.meteora_layers().values():
            layer.set_routing(top_k, temperature)

    def adapter_index(self, adapter: str | int) -> int:
        if isinstance(adapter, int):
            if not 0 <= adapter < self.num_experts:
                raise ValueError(f"meteora: adapter index {adapter} outside [0, {self.num_experts})")
            return adapter
        if adapter not in self.adapter_names:
            raise ValueError(f"meteora: unknown adapter {adapter!r}; known: {', '.join(self.adapter_names)}")
        return self.adapter_names.index(adapter)

    @contextlib.contextmanager
    def route_by_labels(self, labels: torch.Tensor) -> Iterator[None]:
        """While the block runs, every token goes to the expert its label names ((B, S) or (T,),
        the input_ids' shape; -1: no expert), weight 1, the gates bypassed: N adapters trained side
        by side in one batch, each on its own rows (``python -m meteora.train --joint-adapters``)."""
        flat = labels.reshape(-1)
        low, high = (int(v) for v in torch.aminmax(flat)) if flat.numel() else (0, 0)
        if low < -1 or high >= self.num_experts:
            raise ValueError(f"meteora: route_by_labels: labels must be in [-1, {self.num_experts}), got "
                             f"[{low}, {high}]")
        labelled = flat[flat >= 0]
        single = int(labelled[0]) if labelled.numel() and bool((labelled == labelled[0]).all()) else None
        layers = list(self.meteora_layers().values())
        for layer in layers:
            layer.token_experts, layer.token_expert = flat, single
        try:
            yield
        finally:
            for layer in layers:
                layer.token_experts, layer.token_expert = None, None

    def save_adapter(self, adapter: str | int, path: str | os.PathLike, lora_alpha: float | None = None,
                     extra: Mapping[str, str] | None = None) -> Path:
        """Write one expert as a PEFT LoRA adapter folder (adapter_config.json +
        adapter_model.safetensors, written to a temporary folder, then renamed): its lora_A / lora_B at
        its rank in every module it adapts. ``lora_alpha`` defaults to scaling x rank (one value for
        every module, as PEFT's config holds one); ``extra``: more files {name: text} in the folder."""
        from safetensors.torch import save_file

        index = self.adapter_index(adapter)
        state, alphas, ranks, targets = {}, set(), set(), set()
        for name, layer in self.meteora_layers().items():
            if not bool(layer.expert_mask[index]):
                continue
            rank = int(layer.ranks[index])
            state[f"base_model.model.{name}.lora_A.weight"] = _full_tensor(layer.lora_A.detach())[index, :rank].cpu().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = _full_tensor(layer.lora_B.detach())[index, :, :rank].cpu().contiguous()
            alphas.add(round(float(layer.scaling[index]) * rank, 6))
            ranks.add(rank)
            targets.add(name.rsplit(".", 1)[-1])
        if not state:
            raise ValueError(f"meteora: adapter {self.adapter_names[index]!r} adapts no module")
        if len(ranks) != 1 or (lora_alpha is None and len(alphas) != 1):
            raise ValueError(f"meteora: adapter {self.adapter_names[index]!r} has ranks {sorted(ranks)} and alphas "
                             f"{sorted(alphas)} across modules; a PEFT config holds one of each")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(),
                  "lora_alpha": lora_alpha if lora_alpha is not None else alphas.pop(),
                  "lora_dropout": self.lora_dropout, "target_modules": sorted(targets), "bias": "none",
                  "base_model_name_or_path": self.base_model_id, "fan_in_fan_out": False, "inference_mode": True}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

        return _atomic_folder(Path(path), write)

    def force_adapter(self, adapter: str | int | None) -> None:
        """Send every token to one adapter with weight 1 (None restores the gates' choice).

        Uses the normal routing path with every other expert masked out, so the result equals
        running that adapter alone (a module it does not adapt gets no LoRA term).
        """
        for layer in self.meteora_layers().values():
            if adapter is None:
                layer.forced_mask = None
            else:
                mask = torch.zeros_like(layer.expert_mask)
                mask[self.adapter_index(adapter)] = True
                layer.forced_mask = mask

    def set_expert_columns(self, enabled: bool = True, wide: bool | str = True) -> None:
        """The CUDA inference layout of every layer's lora_B: as columns of a (d_out, N r) buffer
        (``enabled``, the default; with ``wide``, the default too, beside the base weight's where
        d_out > d_in; ``wide="always"``: beside it in every linear; ``wide=False``: in a buffer of
        their own everywhere), or (``enabled=False``) as the (N, d_out, r) tensor; see
        MeteoRALinear.expert_columns and wide_columns for the measured trade-off."""
        if wide not in (True, False, "always"):
            raise ValueError(f"meteora: set_expert_columns(wide=...) takes True, False or 'always', got {wide!r}")
        for layer in self.meteora_layers().values():
            layer.expert_columns = enabled
            layer.wide_columns = wide

    def set_stack_base(self, enabled: bool | None = None) -> None:
        """The CUDA inference layout of every layer's base weight: in the rows right before its
        [gate; A] (``enabled=True``; a group's base weights before its members' blocks), which lets
        decode-sized calls run the base GEMMs and the routing GEMM as one, or (``enabled=False``)
        in a buffer of its own again; None (the default): stacked except in the linears that
        narrow their input (down_proj; meteora.layer.stacks_by_default). See MeteoRALinear.stack_base."""
        for layer in self.meteora_layers().values():
            layer.stack_base = enabled  # False: unstacks (MeteoRALinear.unstack_)

    def group_linears(self, enabled: bool = True) -> int:
        """Let the linears that read one input (q, k, v; gate, up) run as one op on CUDA inference
        (``meteora.layer.LinearGroup``; on by default), or (``enabled=False``) each as its own.
        Returns the number of groups."""
        self.grouped = enabled
        return len(group_linears(self.model, enabled))

    def set_norm_into_group(self, enabled: bool = True) -> int:
        """Let each decoder layer's post-attention RMSNorm write its output straight into the buffer
        that its gate / up group's CUDA prefill reads ([H_gate | x | H_up], LinearGroup
        .input_columns), so that x is not copied there (meteora.layer.NormIntoGroup; the same bits;
        on by default: +0.3-0.7% whole-model prefill on an H200, docs/performance.md);
        ``enabled=False`` gives the norms their own forward back. Returns the norms changed."""
        self.norm_into_group = enabled
        count = 0
        for module in self.model.modules():
            norm, mlp = module._modules.get("post_attention_layernorm"), module._modules.get("mlp")
            if norm is None or mlp is None:
                continue
            gate = mlp._modules.get("gate_proj")
            count += NormIntoGroup.install(norm, mlp if enabled and isinstance(gate, MeteoRALinear) else None)
        return count

    def record_routing(self, enabled: bool = True, local: bool = False) -> None:
        """Keep each layer's last Routing (with autograd history) for the gate loss. ``local``: its
        gate logits computed again from the gate's input detached, so that the gate loss trains each
        gate alone (the experts, with ``set_trainable(loras=True)``, then learn from the LM loss only;
        the routing the forward uses is unchanged)."""
        for layer in self.meteora_layers().values():
            layer.record_routing = enabled
            layer.local_gate_loss = enabled and local
            if not enabled:
                layer.routing = None

    @torch.no_grad()
    def top1_votes(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, N) float: at each token, how many gates pick each expert as their top-1, over one
        forward of the decoder stack (no LM head, no cache); 0 at padding."""
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        backbone = getattr(self.model, "base_model", self.model)  # the decoder stack: no LM head
        with self.trace_routing() as trace:
            backbone(input_ids=ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        votes = sum((torch.nn.functional.one_hot(r.expert_idx[:, 0], self.num_experts).float()
                     for steps in trace.steps.values() for r in steps),  # (B S, N): each token's top-1 picks
                    torch.zeros(ids.numel(), self.num_experts, device=ids.device))
        votes = votes.view(*ids.shape, -1)
        return votes if attention_mask is None else votes * attention_mask.bool().unsqueeze(-1)

    @contextlib.contextmanager
    def trace_routing(self) -> Iterator["RoutingTrace"]:
        """Collect every routing decision (detached) while the block runs, e.g. over generate()."""
        trace = RoutingTrace(self.num_experts)
        layers = self.meteora_layers()
        before = {name: layer.routing_hook for name, layer in layers.items()}  # an outer trace's, if any
        for name, layer in layers.items():
            layer.routing_hook = trace.hook(name)
        try:
            yield trace
        finally:
            for name, layer in layers.items():
                layer.routing_hook = before[name]

    @contextlib.contextmanager
    def vote_prompts(self, window: int | None = None) -> Iterator["PromptVote"]:
        """While the block runs (e.g. over generate()), every forward over more than one token (a
        prompt's prefill) first lets the gates vote: each row's prompt then runs on the adapter its
        gates picked first most often over its tokens (or, with ``window``, each token on the one
        they picked most often within ``window`` tokens of it), and the one-token decode steps route
        token by token as usual. See PromptVote."""
        vote = PromptVote(self, window)
        vote.install()
        try:
            yield vote
        finally:
            vote.release()

    # -- parameters -------------------------------------------------------------------------
    def gate_parameters(self) -> list[nn.Parameter]:
        return [layer.gate.weight for layer in self.meteora_layers().values()]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.meteora_layers().values() for p in (layer.lora_A, layer.lora_B)]

    def set_trainable(self, gates: bool = True, loras: bool = False) -> None:
        """Freeze everything but the gates (the paper) or gates and LoRAs (the authors' script)."""
        self.model.requires_grad_(False)
        for p in self.gate_parameters():
            p.requires_grad_(gates)
        for p in self.lora_parameters():
            p.requires_grad_(loras)

    # -- growing ----------------------------------------------------------------------------
    @torch.no_grad()
    def add_adapter(self, name: str, adapter: str | os.PathLike | LoraAdapter) -> int:
        """Append one PEFT LoRA adapter as expert N; returns its index.

        Every existing expert, gate row, k and temperature is kept; each gate gets a new zero row
        for the newcomer (train it, e.g. ``python -m meteora.train --add-adapter``, keeping the old
        rows fixed). A module only the new adapter adapts becomes a MeteoRA linear in which the old
        experts are masked.
        """
        if name in self.adapter_names:
            raise ValueError(f"meteora: an adapter named {name!r} is already embedded")
        loaded = adapter if isinstance(adapter, LoraAdapter) else load_adapter(name, adapter)
        old_n, n = self.num_experts, self.num_experts + 1
        check_routing(n, self.top_k, self.temperature)
        layers = self.meteora_layers()
        for module in loaded.modules:
            linear = layers[module].base_layer if module in layers else _check_linear(
                self.model, module, f"adapter '{name}' ({loaded.source})")
            a, b = loaded.lora_a[module], loaded.lora_b[module]
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise AdapterError(f"adapter '{name}' ({loaded.source}): '{module}' has lora_A {tuple(a.shape)} and "
                                   f"lora_B {tuple(b.shape)} but the base linear is {linear.in_features} -> "
                                   f"{linear.out_features}")
        top_k, temperature = self.top_k, self.temperature
        for module in sorted(set(layers) | set(loaded.modules)):
            old = layers.get(module)
            linear = old.base_layer if old is not None else self.model.get_submodule(module)
            rank = max(old.max_rank if old is not None else 1,
                       loaded.lora_a[module].shape[0] if module in loaded.lora_a else 1)
            layer = MeteoRALinear(linear, n, rank, top_k, temperature, self.lora_dropout)
            layer.to(device=linear.weight.device)
            if old is not None:
                layer.lora_A.data = layer.lora_A.data.to(old.lora_A.dtype)
                layer.lora_B.data = layer.lora_B.data.to(old.lora_B.dtype)
                layer.gate.weight.data = layer.gate.weight.data.to(old.gate.weight.dtype)
                layer.lora_A[:old_n, :old.max_rank].copy_(old.lora_A)
                layer.lora_B[:old_n, :, :old.max_rank].copy_(old.lora_B)
                layer.scaling[:old_n] = old.scaling
                layer.ranks[:old_n] = old.ranks
                layer.expert_mask[:old_n] = old.expert_mask
                layer.gate.weight[:old_n].copy_(old.gate.weight)
                layer.impl = old.impl
                layer.expert_columns = old.expert_columns
                layer.wide_columns = old.wide_columns
                layer.stack_base = old._stack_base  # the setting (None: the default), not its value
                layer.pack_()  # the dtype changes above gave gate and lora_A buffers of their own
            layer.gate.weight[old_n:].zero_()
            if module in loaded.lora_a:
                layer.set_expert(old_n, loaded.lora_a[module], loaded.lora_b[module], loaded.scaling[module])
            _replace_module(self.model, module, layer)
        self.adapter_names.append(name)
        self.group_linears(self.grouped)  # the new layers
        self.set_norm_into_group(self.norm_into_group)  # a gate_proj that is MeteoRA only now
        self.model.requires_grad_(False)
        self.set_trainable(gates=True, loras=False)
        return old_n

    # -- persistence ------------------------------------------------------------------------
    def meteora_config(self) -> dict:
        layers = self.meteora_layers()
        return {
            "format": "meteora",
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model_id,
            "adapters": self.adapter_names,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "lora_dropout": self.lora_dropout,
            "modules": {
                name: {
                    "in_features": layer.lora_A.shape[2],
                    "out_features": layer.lora_B.shape[1],
                    "ranks": [int(r) for r in layer.ranks.tolist()],  # 0: adapter absent here
                    "scalings": [float(s) for s in layer.scaling.tolist()],
                }
                for name, layer in layers.items()
            },
        }

    def meteora_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what MeteoRA adds: per module lora_A, lora_B (padded) and the gate."""
        state = {}
        for name, layer in self.meteora_layers().items():
            state[f"{name}.lora_A"] = _full_tensor(layer.lora_A.detach())
            state[f"{name}.lora_B"] = _full_tensor(layer.lora_B.detach())
            state[f"{name}.gate"] = _full_tensor(layer.gate.weight.detach())
        return state

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write meteora_config.json + meteora_model.safetensors (each file written atomically;
        the config last, so a folder with a config is complete). The base model is not copied.
        ``state_dict``: a ``meteora_state_dict()`` already gathered (FSDP: every rank gathers, one writes)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.meteora_state_dict() if state_dict is None else state_dict
        # Copies: a layer's gate and lora_A share one buffer (MeteoRALinear.pack_), which safetensors refuses.
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = json.dumps(self.meteora_config(), indent=2)
        _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config))
        return path


class PrefillHook:
    """A forward pre-hook on a MeteoRAModel's wrapped model that sees each forward's input_ids
    (``_pre``): the base of routing modes that treat a prompt's prefill (a forward over more than
    one token) and the one-token decode steps differently. ``install`` / ``release``."""

    def __init__(self, model: "MeteoRAModel"):
        self.model, self._handle = model, None

    @staticmethod
    def input_ids(args, kwargs) -> torch.Tensor | None:
        """The forward's input_ids (or inputs_embeds), from its arguments."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        return kwargs.get("inputs_embeds") if ids is None else ids

    def _pre(self, module, args, kwargs):
        raise NotImplementedError

    def install(self, task: str | None = None) -> None:
        """From now on every forward passes ``_pre`` (``task``: for subclasses that use it)."""
        if self._handle is None:
            self._handle = self.model.model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class LabelHook(PrefillHook):
    """A PrefillHook that routes a forward by token labels (``MeteoRAModel.route_by_labels``) until
    the next forward or ``release``: ``_route(labels)``."""

    def __init__(self, model: "MeteoRAModel"):
        super().__init__(model)
        self._labels = None

    def _route(self, labels: torch.Tensor) -> None:
        self._drop_labels()
        self._labels = self.model.route_by_labels(labels)
        self._labels.__enter__()

    def _drop_labels(self) -> None:
        if self._labels is not None:
            self._labels.__exit__(None, None, None)
            self._labels = None

    def release(self) -> None:
        super().release()
        self._drop_labels()


class PromptVote(LabelHook):
    """MeteoRA with a look-ahead over the prompt (``MeteoRAModel.vote_prompts``: an inference mode
    beside the paper's token-level routing; it uses no task label): before the prompt's prefill,
    one forward over the prompt lets every gate vote its top-1 expert at every (unpadded) prompt
    token; the prefill then runs each row's prompt on the adapter with the most votes in that row
    (``window=None``), or each token on the adapter with the most votes among the tokens at most
    ``window`` positions before or after it (a prompt that mixes tasks keeps its switches), and the
    gates route the generated tokens as usual. It costs one more forward over the prompt. The whole
    prompt is known before the first answer token, so the tokens that no causal gate can route (the
    chat template's, the same for every task, before the question) get the question's adapter."""

    def __init__(self, model: "MeteoRAModel", window: int | None = None):
        super().__init__(model)
        if window is not None and window < 0:
            raise ValueError(f"meteora: PromptVote window must be >= 0 tokens or None, got {window}")
        self.window, self._voting = window, False

    @torch.no_grad()
    def vote(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) labels for route_by_labels: each token's most voted expert over its row (or its
        window), -1 at padding; ties go to the lower index."""
        keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self._voting = True
        try:
            votes = self.model.top1_votes(ids, attention_mask, position_ids)
        finally:
            self._voting = False
        if self.window is None:
            choice = votes.sum(1).argmax(1, keepdim=True).expand_as(ids)
        else:  # sums over [t - window, t + window] from the running sum
            run = torch.nn.functional.pad(votes.cumsum(1), (0, 0, 1, 0))  # run[:, t] = sum of votes[:, :t]
            pos = torch.arange(ids.shape[1], device=ids.device)
            high = (pos + self.window + 1).clamp(max=ids.shape[1])
            low = (pos - self.window).clamp(min=0)
            choice = (run[:, high] - run[:, low]).argmax(2)
        return choice.masked_fill(~keep, -1)

    def _pre(self, module, args, kwargs):
        if self._voting:
            return
        self._drop_labels()
        ids = self.input_ids(args, kwargs)
        if ids is None or ids.shape[1] <= 1 or ids.is_floating_point():  # a decode step (or embeddings): gates
            return
        self._route(self.vote(ids, kwargs.get("attention_mask"), kwargs.get("position_ids")))


class RoutingTrace:
    """Routing decisions collected by ``MeteoRAModel.trace_routing``, in call order per layer."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.steps: dict[str, list[Routing]] = defaultdict(list)

    def hook(self, name: str):
        def record(routing: Routing) -> None:
            self.steps[name].append(Routing(*(t.detach() for t in routing)))

        return record

    def expert_weights(self, name: str) -> torch.Tensor:
        """(T, N): each token's weight on each expert in layer ``name``, over all recorded calls."""
        rows = []
        for r in self.steps[name]:
            dense = torch.zeros(r.expert_idx.shape[0], self.num_experts, device=r.expert_idx.device)
            rows.append(dense.scatter_add_(1, r.expert_idx, r.expert_weight.float()))
        return torch.cat(rows) if rows else torch.zeros(0, self.num_experts)

    def token_adapter_weights(self) -> torch.Tensor:
        """(T, N): per token, the expert weights averaged over every MeteoRA layer."""
        if not self.steps:
            return torch.zeros(0, self.num_experts)
        return torch.stack([self.expert_weights(name).cpu() for name in self.steps]).mean(0)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter sharded by FSDP2 (a DTensor) gathered whole; a plain tensor as is. With FSDP2
    every rank must make the same calls."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _base_model_id(model: nn.Module) -> str:
    return getattr(model, "meteora_base_id", None) or getattr(model.config, "_name_or_path", "") or ""


def _check_linear(model: nn.Module, module: str, owner: str) -> nn.Linear:
    try:
        linear = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(
            f"{owner} has weights for '{module}', which the base model does not have "
            f"(an adapter for a different base model?)"
        ) from None
    if not isinstance(linear, nn.Linear):
        raise AdapterError(f"{owner}: base model module '{module}' is {type(linear).__name__}, not nn.Linear")
    return linear


def from_adapters(
    base_model: nn.Module,
    adapters: Mapping[str, str | os.PathLike | LoraAdapter],
    top_k: int | None = None,
    temperature: float = 1.0,
    lora_dropout: float | None = None,
) -> MeteoRAModel:
    """Embed N PEFT LoRA adapters ``{name: folder or hub id}`` in ``base_model`` (changed in place).

    Every linear that any adapter adapts becomes a MeteoRALinear with N experts; an adapter that
    does not touch a module is a masked zero expert there. Gates start at nn.Linear's default
    initialisation and are what MeteoRA training learns. ``top_k`` defaults to min(2, N);
    ``lora_dropout`` defaults to the largest
    of the adapters' own.
    """
    if not adapters:
        raise ValueError("meteora: from_adapters needs at least one adapter")
    loaded = [a if isinstance(a, LoraAdapter) else load_adapter(name, a) for name, a in adapters.items()]
    names = list(adapters)
    top_k = min(2, len(loaded)) if top_k is None else top_k
    check_routing(len(loaded), top_k, temperature)
    dropout = max(a.lora_dropout for a in loaded) if lora_dropout is None else lora_dropout

    modules = sorted({m for a in loaded for m in a.modules})
    for adapter in loaded:
        for module in adapter.modules:
            linear = _check_linear(base_model, module, f"adapter '{adapter.name}' ({adapter.source})")
            a, b = adapter.lora_a[module], adapter.lora_b[module]
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise AdapterError(
                    f"adapter '{adapter.name}' ({adapter.source}): '{module}' has lora_A {tuple(a.shape)} and "
                    f"lora_B {tuple(b.shape)} but the base linear is {linear.in_features} -> "
                    f"{linear.out_features} (an adapter for a different base model?)"
                )
    for module in modules:
        linear = base_model.get_submodule(module)
        rank = max(a.lora_a[module].shape[0] for a in loaded if module in a.lora_a)
        layer = MeteoRALinear(linear, len(loaded), rank, top_k, temperature, dropout)
        for index, adapter in enumerate(loaded):
            if module in adapter.lora_a:
                layer.set_expert(index, adapter.lora_a[module], adapter.lora_b[module], adapter.scaling[module])
        _replace_module(base_model, module, layer)
    base_model.requires_grad_(False)
    model = MeteoRAModel(base_model, names, _base_model_id(base_model), dropout)
    model.set_trainable(gates=True, loras=False)
    return model


def new_experts(
    base_model: nn.Module,
    names: Sequence[str],
    rank: int = 8,
    lora_alpha: float = 16.0,
    target_modules: Sequence[str] = TARGET_MODULES,
    lora_dropout: float = 0.0,
    top_k: int = 1,
) -> MeteoRAModel:
    """``base_model`` (changed in place) with N fresh LoRA experts of ``rank`` in every linear whose
    name ends in one of ``target_modules``, initialised as PEFT initialises a LoRA (A Kaiming-uniform,
    B zero: the model starts as the base model), scaling lora_alpha / rank. Train them side by side
    under ``route_by_labels`` (each token on its own task's expert), then ``save_adapter`` each."""
    if not names:
        raise ValueError("meteora: new_experts needs at least one name")
    targets = tuple(target_modules)
    modules = [n for n, m in base_model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not modules:
        raise ValueError(f"meteora: new_experts: no linear of the base model is named {', '.join(targets)}")
    for module in modules:
        linear = base_model.get_submodule(module)
        layer = MeteoRALinear(linear, len(names), rank, min(top_k, len(names)), 1.0, lora_dropout)
        a = torch.empty(len(names), rank, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
        for e in range(len(names)):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            layer.set_expert(e, a[e], torch.zeros(linear.out_features, rank, dtype=a.dtype, device=a.device),
                             lora_alpha / rank)
        _replace_module(base_model, module, layer)
    base_model.requires_grad_(False)
    model = MeteoRAModel(base_model, names, _base_model_id(base_model), lora_dropout)
    model.set_trainable(gates=False, loras=True)
    return model


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def load(
    path: str | os.PathLike,
    base_model: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> MeteoRAModel:
    """Load a MeteoRA checkpoint written by ``save_pretrained``.

    ``base_model`` defaults to the one named in the config (a local folder, a hub id, or
    ``smollm2`` for the embedded default), loaded with ``meteora.load_base_model``.
    """
    from safetensors import safe_open

    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise CheckpointError(f"meteora: {config_file} not found (not a MeteoRA checkpoint?)")
    if not weights_file.is_file():
        raise CheckpointError(f"meteora: {weights_file} not found")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"meteora: {config_file} is not valid JSON ({err})") from None
    for key in ("adapters", "top_k", "temperature", "modules", "base_model"):
        if key not in config:
            raise CheckpointError(f"meteora: {config_file} lacks field '{key}'")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"meteora: {config_file} has format_version {config['format_version']}, "
                              f"newer than this meteora reads ({FORMAT_VERSION})")
    if base_model is None:
        from .base import load_base_model

        base_model, _ = load_base_model(config["base_model"], dtype=dtype, device=device)
    names = list(config["adapters"])
    n = len(names)
    check_routing(n, config["top_k"], config["temperature"])
    dropout = float(config.get("lora_dropout", 0.0))
    with safe_open(str(weights_file), framework="pt") as f:
        stored = set(f.keys())
        expected = {f"{m}.{t}" for m in config["modules"] for t in ("lora_A", "lora_B", "gate")}
        if stored != expected:
            extra, missing = sorted(stored - expected), sorted(expected - stored)
            raise CheckpointError(
                f"meteora: {weights_file} does not match {config_file}: "
                + (f"missing tensors {missing[:3]}" if missing else "")
                + (f" unexpected tensors {extra[:3]}" if extra else "")
            )
        for module, spec in config["modules"].items():
            ranks, scalings = spec.get("ranks"), spec.get("scalings")
            if not (isinstance(ranks, list) and isinstance(scalings, list) and len(ranks) == len(scalings) == n):
                raise CheckpointError(f"meteora: {config_file} modules['{module}'] needs {n} ranks and scalings")
            linear = _check_linear(base_model, module, f"checkpoint {path}")
            a, b, g = f.get_tensor(f"{module}.lora_A"), f.get_tensor(f"{module}.lora_B"), f.get_tensor(f"{module}.gate")
            rank = max(ranks)
            want = {
                "lora_A": (n, rank, linear.in_features),
                "lora_B": (n, linear.out_features, rank),
                "gate": (n, linear.in_features),
            }
            for tname, tensor in (("lora_A", a), ("lora_B", b), ("gate", g)):
                if tuple(tensor.shape) != want[tname]:
                    raise CheckpointError(
                        f"meteora: {weights_file} tensor '{module}.{tname}' has shape {tuple(tensor.shape)} but "
                        f"{config_file} and the base model give {want[tname]}"
                    )
            layer = MeteoRALinear(linear, n, rank, config["top_k"], config["temperature"], dropout)
            with torch.no_grad():
                for index, r in enumerate(ranks):
                    if r > 0:
                        layer.set_expert(index, a[index, :r], b[index, :, :r], scalings[index])
                layer.gate.weight.copy_(g)
            _replace_module(base_model, module, layer)
    base_model.requires_grad_(False)
    model = MeteoRAModel(base_model, names, config["base_model"], dropout)
    model.set_trainable(gates=True, loras=False)
    model.eval()
    return model
