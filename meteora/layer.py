"""MeteoRALinear: a frozen base linear, N LoRA experts and a top-k gate (DESIGN.md section 1)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .ops import check_routing


class Routing(NamedTuple):
    """What one MeteoRA linear decided for T tokens in one forward."""

    gate_logits: torch.Tensor  # (T, N) fp32, raw (before the expert mask)
    expert_weight: torch.Tensor  # (T, k) fp32
    expert_idx: torch.Tensor  # (T, k) int64


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of B A x: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class MeteoRALinear(nn.Module):
    """``y = base(x) + sum_j w_j s_{i_j} B_{i_j} A_{i_j} dropout(x)`` with top-k gating per token.

    Parameters: ``lora_A`` (N, r, d_in), ``lora_B`` (N, d_out, r), both zero-padded to the largest
    rank r of the module's experts; ``gate.weight`` (N, d_in). Buffers: ``scaling`` (N,) fp32,
    ``ranks`` (N,) int64 and ``expert_mask`` (N,) bool (False: the adapter does not touch this
    module; it is a zero expert the gate never picks). ``top_k`` and ``temperature`` may change at
    any time. With ``record_routing`` set, ``routing`` holds the last forward's decisions (with
    autograd history, for the gate loss); ``routing_hook`` is called with every ``Routing``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        top_k: int = 2,
        temperature: float = 1.0,
        lora_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"meteora: MeteoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        if not 1 <= num_experts <= 64:
            raise ValueError(f"meteora: number of experts N={num_experts} must be in [1, 64]")
        if not 1 <= rank <= 64:
            raise ValueError(f"meteora: LoRA rank r={rank} must be in [1, 64]")
        check_routing(num_experts, top_k, temperature)
        self.base_layer = base_layer.requires_grad_(False)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, rank, **factory))
        self.gate = nn.Linear(d_in, num_experts, bias=False, **factory)
        self.lora_A = nn.Parameter(torch.zeros(num_experts, rank, d_in, **factory))
        self.packable = True  # False under FSDP, which owns the parameters' storage
        # Inference layout of lora_B (CUDA; pack_(base=True)): True (the default) keeps B_all's
        # columns, the (d_out, N r) columns of a row-major buffer, so the prefill expand GEMM reads
        # them without a per-call copy; False keeps (N, d_out, r). H200, one LLaMA-3-8B layer, N=28
        # r=8 top-2, graph replay, the two in one call (results/h200_narrow_columns): T=128 1.66 ->
        # 1.37x the base linears, T=1024 1.30 -> 1.24x, T=4096 1.17 -> 1.16x, T=1 1.16x both,
        # T=16 1.21 -> 1.22-1.25x (decode reads 16-byte pieces N r elements apart).
        self.expert_columns = True
        # With expert_columns, whether B's columns go beside W0's where d_out > d_in ([W0 | B_all]:
        # gate_proj, up_proj), so that the prefill is one GEMM of [x | H] (a copy of x, the routing
        # before it) instead of the base GEMM and a second, in-place expand GEMM over the output; such
        # linears are not stacked. The default since 2026-12-02: whole LLaMA-3-8B-shaped model on an
        # H100, each alternated 30 times with the base model in one call (results/h100_wide_group):
        # prefill 0.882 / 0.899x the base model's tokens/s (1 x 4096 / 8 x 1024) against 0.869 / 0.878
        # with B's columns apart, decode 0.957 / 0.921x against 0.930 / 0.898 (batch 1 / 16).
        # "always": beside W0's whatever the shape (for measurements: o_proj, q / k / v).
        self.wide_columns: bool | str = True
        # Inference layout of the base weight (CUDA; pack_(base=True), LinearGroup.pack_): True keeps
        # it in the rows right before [gate; A] (a group's base weights all before its members'
        # [gate; A] blocks), so that at decode sizes (T <= 32) the op runs the base GEMMs and the
        # routing GEMM as one GEMM and adds the experts' sum in the routing kernel. The default
        # (None, stacks_by_default) leaves out the lone linears that narrow their input (down_proj).
        self._stack_base: bool | None = None
        self._packed_at: tuple[int, int] | None = None
        self._b_packed_at: tuple[int, int, int, bool] | None = None
        self.pack_()
        self.register_buffer("scaling", torch.zeros(num_experts, device=factory["device"]))
        self.register_buffer("ranks", torch.zeros(num_experts, dtype=torch.long, device=factory["device"]))
        self.register_buffer("expert_mask", torch.zeros(num_experts, dtype=torch.bool, device=factory["device"]))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.top_k = top_k
        self.temperature = float(temperature)
        self.impl = "auto"
        self.forced_mask: torch.Tensor | None = None  # (N,) bool: restrict the choice (ablations)
        self.record_routing = False
        self.local_gate_loss = False  # recorded gate logits from the gate's input detached (record_routing)
        self.routing: Routing | None = None
        self.routing_hook: Callable[[Routing], None] | None = None
        self.group: LinearGroup | None = None  # linears that read the same input (group_linears)
        # (T,) int64: the expert each token goes to, weight 1, -1 for none, instead of the gate's
        # choice (MeteoRAModel.route_by_labels: N adapters trained side by side in one batch).
        self.token_experts: torch.Tensor | None = None
        self.token_expert: int | None = None  # the one expert of every labelled token, if they share one

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def is_packed(self, base: bool = False) -> bool:
        """Whether ``gate.weight`` and ``lora_A`` are the rows of one (N + N r, d_in) buffer; with
        ``base``, also whether ``lora_B`` is kept as the (d_out, N r) columns of a row-major buffer
        (beside the base weight's columns when d_out > d_in); see ``pack_``."""
        g, a, b = self._weights()  # every CUDA inference forward asks
        key = (g.data_ptr(), a.data_ptr())
        if key != self._packed_at:  # not checked since they last moved (every forward asks; cached)
            packed = (g.is_contiguous() and a.is_contiguous() and g.dtype == a.dtype and g.device == a.device
                      and g.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
                      and a.storage_offset() == g.storage_offset() + g.numel())
            self._packed_at = key if packed else None
            if not packed:
                return False
        if not base:
            return True
        w = self._registered(self._modules, "base_layer").weight
        wide = self._wide()
        left = wide and self._left()
        key = (b.data_ptr(), w.data_ptr(), g.data_ptr(), wide, left)
        if key != self._b_packed_at:
            n, d_out, r = b.shape
            d_in = w.shape[1]
            packed = b.stride(0) == r and b.stride(2) == 1 and b.stride(1) >= n * r
            if packed and wide:  # [W0 | B_all], or [B_all | W0] (left)
                packed = (w.stride() == (b.stride(1), 1) and w.untyped_storage().data_ptr()
                          == b.untyped_storage().data_ptr() and (w.storage_offset() == b.storage_offset() + n * r
                                                                 if left else
                                                                 b.storage_offset() == w.storage_offset() + d_in))
            elif packed:  # B's columns in a buffer of their own, W0 contiguous
                packed = w.is_contiguous() and w.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
            if packed and self._stacks_alone():  # W0 right before [gate; A] (pack_rows' bases)
                packed = _stacked([w], g)
            self._b_packed_at = key if packed else None
            return packed
        return True

    def _apply(self, fn, recurse=True):
        # .to / .cuda / .half give the weights new storage, which the caching allocator may place at
        # the address of a block just freed: the layout caches, keyed by data pointers, start over.
        self._packed_at = self._b_packed_at = None
        if self.group is not None:
            self.group._packed_at = None
        return super()._apply(fn, recurse)

    def _wide(self) -> bool:
        """Whether lora_B's columns go beside the base weight's: the prefill GEMM is then one GEMM of
        [x | H] with [W0 | B_all], which pays (one copy of x) where d_out > d_in (``wide_columns``
        True), or for every shape (``wide_columns == "always"``)."""
        w, b = self.base_layer.weight, self.lora_B
        rule = self.wide_columns
        return bool(rule) and (rule == "always" or w.shape[0] > w.shape[1]) and w.dtype == b.dtype \
            and w.device == b.device and type(w.data) is torch.Tensor

    def _left(self) -> bool:
        """Whether B's columns go right before the base weight's ([B_all | W0]): the first of two
        adjacent [W0 | B_all]-kind members of a group (gate_proj before up_proj), so that their
        prefill inputs [H_gate | x] and [x | H_up] are one buffer [H_gate | x | H_up] with one copy
        of x (csrc/cuda/meteora_cuda.cu run_wide)."""
        group = self.group
        return group is not None and group.left_member() is self

    @property
    def stack_base(self) -> bool:
        """Whether the base weight goes in the rows before [gate; A] (set True or False; None, the
        default: stacks_by_default for this shape and group)."""
        if self._stack_base is not None:
            return self._stack_base
        return stacks_by_default(self.base_layer.in_features, self.base_layer.out_features, self.group is not None)

    @stack_base.setter
    def stack_base(self, enabled: bool | None) -> None:
        self._stack_base = None if enabled is None else bool(enabled)
        enabled = self.stack_base
        self._b_packed_at = None  # the layout caches start over
        if self.group is not None:
            self.group._packed_at = None
        if not enabled:
            self.unstack_()

    def _stackable(self) -> bool:
        """Whether the base weight may join the buffer of [gate; A] (``stack_base``): frozen, a plain
        tensor in their dtype and device, and not in a [W0 | B_all] buffer."""
        w, g = self.base_layer.weight, self.gate.weight
        return self.stack_base and not w.requires_grad and w.dtype == g.dtype and w.device == g.device \
            and type(w.data) is torch.Tensor and not (self.expert_columns and self._wide())

    def _stacks_alone(self) -> bool:
        """Whether pack_(base=True) stacks this linear's base weight before its own [gate; A] rows
        (a member of a LinearGroup is stacked with the group's, LinearGroup.pack_)."""
        return self.group is None and self._stackable()

    @torch.no_grad()
    def pack_(self, base: bool = False) -> bool:
        """Keep ``gate.weight`` and ``lora_A`` as adjacent rows of one buffer, so that the CUDA
        inference op computes the gate logits and every expert's shrink with one GEMM. With
        ``base`` (the inference path), also keep ``lora_B`` as the columns of a row-major
        (d_out, N r) buffer, so the experts' expand reads B_all without a copy; where d_out > d_in
        (gate_proj, up_proj) those columns follow the base weight's in one (d_out, d_in + N r)
        buffer, whose prefill GEMM with [x | H] adds the experts' sum without a second pass over
        the output. Moving the module (``.to``) unpacks them; the inference path packs again on its
        next call. Returns whether they are packed (never under FSDP, or across dtypes or devices)."""
        g, a = self.gate.weight, self.lora_A
        if self.is_packed(base):
            return True
        if not self.packable or g.dtype != a.dtype or g.device != a.device or type(g.data) is not torch.Tensor \
                or type(a.data) is not torch.Tensor:
            return False
        if not self.is_packed():
            (g.data, a.data), = pack_rows([(g.detach(), a.detach())])[0]
        if not base:
            return True
        b, w = self.lora_B, self.base_layer.weight
        if type(b.data) is not torch.Tensor:
            return False
        wide = self._wide()
        w.data, b.data = column_layout(w.detach(), b.detach(), wide, wide and self._left())
        if self._stacks_alone() and not _stacked([w], g):
            [(g.data, a.data)], [w.data] = pack_rows([(g.detach(), a.detach())], [w.detach()])
        return self.is_packed(base)

    @torch.no_grad()
    def unstack_(self) -> None:
        """Give the base weight a buffer of its own if it shares one with the [gate; A] rows
        (stack_base); the next pack_ packs the rest again."""
        w, g = self.base_layer.weight, self.gate.weight
        if type(w.data) is torch.Tensor and w.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
            w.data = w.detach().clone()
            self._b_packed_at = None
            if self.group is not None:
                self.group._packed_at = None

    @torch.no_grad()
    def set_expert(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Put one adapter's ``lora_a`` (r, d_in) and ``lora_b`` (d_out, r) in slot ``index``."""
        rank = lora_a.shape[0]
        d_out, d_in = self.lora_B.shape[1], self.lora_A.shape[2]
        if lora_a.shape != (rank, d_in) or lora_b.shape != (d_out, rank) or rank > self.max_rank:
            raise ValueError(
                f"meteora: expert {index} needs lora_A (r<={self.max_rank}, {d_in}) and lora_B ({d_out}, r); "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )
        self.lora_A[index].zero_()
        self.lora_B[index].zero_()
        self.lora_A[index, :rank].copy_(lora_a)
        self.lora_B[index, :, :rank].copy_(lora_b)
        self.scaling[index] = scaling
        self.ranks[index] = rank
        self.expert_mask[index] = True

    def set_routing(self, top_k: int | None = None, temperature: float | None = None) -> None:
        top_k = self.top_k if top_k is None else top_k
        temperature = self.temperature if temperature is None else temperature
        check_routing(self.num_experts, top_k, temperature)
        self.top_k, self.temperature = top_k, float(temperature)

    def _registered(self, table: dict, name: str):
        """``getattr(self, name)`` for a registered parameter, buffer or submodule, read from its
        dict (``table``): nn.Module.__getattr__ costs ~0.6 us a lookup and a decode step calls
        forward once per adapted linear (210 on SmolLM2). What is not there (a parametrization,
        say) goes through getattr."""
        value = table.get(name)
        return getattr(self, name) if value is None else value

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate.weight, lora_A, lora_B), see _registered."""
        gate = self._registered(self._modules, "gate")
        weight = gate._parameters.get("weight")
        return (gate.weight if weight is None else weight, self._registered(self._parameters, "lora_A"),
                self._registered(self._parameters, "lora_B"))

    def _inference_op(self, x2: torch.Tensor) -> bool:
        """Whether ``forward`` on x2 (T, d_in) is one meteora.linear op: no autograd, no dropout at
        work, every operand in x's dtype, impl "auto"."""
        base = self._registered(self._modules, "base_layer")
        return (self.impl == "auto" and (not self.training or type(
            self._registered(self._modules, "lora_dropout")) is nn.Identity)
            and _is_op_path(x2, base.weight, base.bias, *self._weights()))

    def _op_args(self) -> ops.LinearArgs:
        mask = self._registered(self._buffers, "expert_mask")
        if self.forced_mask is not None:
            mask = mask & self.forced_mask
        gate, lora_a, lora_b = self._weights()
        base = self._registered(self._modules, "base_layer")
        return ops.LinearArgs(base.weight, base.bias, gate, lora_a, lora_b, self._registered(self._buffers, "scaling"),
                              mask, self.top_k, self.temperature)

    def _lora_input(self, x2: torch.Tensor) -> torch.Tensor:
        """What the experts see: x2, through the LoRA dropout while training."""
        dropout = self._registered(self._modules, "lora_dropout")
        return x2 if type(dropout) is nn.Identity or not self.training else dropout(x2)

    def _finish(self, x: torch.Tensor, out: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.record_routing:
            if self.local_gate_loss and torch.is_grad_enabled():
                # The gate loss's logits again, from the gate's input detached: its gradient then
                # reaches this gate only, not the experts and gates of the earlier layers.
                gate = self._weights()[0]
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                routing = routing._replace(gate_logits=F.linear(x2, gate.float()))
            self.routing = routing
        hook = self.routing_hook
        if hook is not None:
            hook(routing)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        if self.token_experts is not None:
            return self._forward_by_label(x)
        group = self.group
        if group is not None and (x.is_cuda or group.on_cpu):
            done = group.forward(self, x)
            if done is not None:
                return self._finish(x, *done)
        # Every attribute is read once, registered ones from their dicts (see _registered).
        x2 = x.reshape(-1, x.shape[-1])
        mask = self._registered(self._buffers, "expert_mask")
        if self.forced_mask is not None:
            mask = mask & self.forced_mask
        x_lora = self._lora_input(x2)
        gate, lora_a, lora_b = self._weights()
        if self.packable and x_lora is x2 and x2.is_cuda and not _needs_grad(x2, gate, lora_a, lora_b) \
                and not torch.compiler.is_compiling() and not self.is_packed(self.expert_columns):
            self.pack_(self.expert_columns)  # the inference op's one shrink GEMM (and B_all's columns)
            gate, lora_a, lora_b = self._weights()
        # Trainable copies may be kept in fp32 beside a bf16 base: compute in the input's dtype
        # (the casts are differentiable, so the fp32 parameters receive the gradients).
        dtype = x2.dtype
        if gate.dtype != dtype:
            gate = gate.to(dtype)
        if lora_a.dtype != dtype:
            lora_a = lora_a.to(dtype)
        if lora_b.dtype != dtype:
            lora_b = lora_b.to(dtype)
        base = self._registered(self._modules, "base_layer")
        out, routing = meteora_linear(
            x2, base.weight, base.bias, gate, lora_a, lora_b,
            self._registered(self._buffers, "scaling"), mask, self.top_k, self.temperature, x_lora=x_lora, impl=self.impl,
        )
        return self._finish(x, out, routing)

    def _forward_by_label(self, x: torch.Tensor) -> torch.Tensor:
        """Every token through the one expert ``token_experts`` names (weight 1; -1: none), the
        gate bypassed: base GEMM + that expert's LoRA term, gradients for lora_A and lora_B."""
        x2 = x.reshape(-1, x.shape[-1])
        labels = self.token_experts.reshape(-1)
        if labels.numel() != x2.shape[0]:
            raise ValueError(f"meteora: token_experts holds {labels.numel()} labels for {x2.shape[0]} tokens "
                             f"(labels must have the input_ids' shape)")
        x_lora = self._lora_input(x2)
        _, lora_a, lora_b = self._weights()
        if lora_a.dtype != x2.dtype:
            lora_a, lora_b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        scaling = self._registered(self._buffers, "scaling")
        single = self.token_expert
        if single is not None:  # one expert for the whole batch: two small GEMMs, as a lone LoRA runs
            labelled = (labels >= 0).to(x2.dtype).unsqueeze(1)
            delta = ((x_lora @ lora_a[single].t()) @ lora_b[single].t()) * (scaling[single].to(x2.dtype) * labelled)
        else:
            idx = labels.clamp(min=0).unsqueeze(1)
            weight = (labels >= 0).to(torch.float32).unsqueeze(1)
            delta = ops.lora_experts(x_lora, lora_a, lora_b, scaling, idx, weight, None, impl=self.impl)
        base = self._registered(self._modules, "base_layer")
        out = _plus_base(delta, x2, base.weight, base.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.max_rank}, top_k={self.top_k}, "
            f"temperature={self.temperature:g}"
        )


class LinearGroup:
    """MeteoRA linears that read the same input (q, k, v; gate, up; ``group_linears`` finds them).

    On CUDA inference, the first member called on an input runs one ``meteora.linear_group`` op
    for all of them: one GEMM on the side stream gives every member's gate logits and experts'
    shrink (their [gate; A] rows are consecutive blocks of one buffer, ``pack_``), beside all the
    base GEMMs. The others' calls on that same tensor (``is``, and unchanged: same version where
    the tensor counts versions) take their results; a call on anything else, or outside that path
    (autograd, dropout, the CPU, torch.compile tracing, B's columns beside W0's in some members but
    not all), is the member's own forward. Results wait at most until the group's next call on
    another input.
    """

    # On the CPU, linear_group runs each member's op in turn: the group's bookkeeping costs more
    # than it saves there (docs/performance.md), so CPU inputs skip it unless this is set (tests).
    on_cpu = False

    def __init__(self, members: Sequence[MeteoRALinear]) -> None:
        members = list(members)
        if len(members) < 2 or len({id(m) for m in members}) != len(members):
            raise ValueError(f"meteora: a LinearGroup needs at least two distinct MeteoRALinear, got {len(members)}")
        d_in = {m.lora_A.shape[-1] for m in members}
        if len(d_in) != 1:
            raise ValueError(f"meteora: a LinearGroup's members must share d_in (they read one input), got {sorted(d_in)}")
        self.members = members
        self._packed_at: tuple[int, ...] | None = None
        self._input: torch.Tensor | None = None
        self._version: int | None = None
        self._waiting: dict[int, tuple[torch.Tensor, Routing]] = {}
        # (x_cat, x_col, x): the next input, written by a NormIntoGroup into x_cat's columns
        # x_col ... x_col + d_in (x, shaped as the norm returned it), the rest free for the op
        self._given: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"LinearGroup({len(self.members)} members)"

    def _key(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for m in self.members for t in (*m._weights()[:2], m.base_layer.weight))

    def is_packed(self) -> bool:
        """Whether every member's [gate; A] rows are consecutive blocks of one buffer (pack_)."""
        return self._packed_at is not None and self._key() == self._packed_at

    @torch.no_grad()
    def pack_(self) -> bool:
        """One buffer for every member's [gate; A] rows, each block padded with zero rows to a
        multiple of 8; every member's ``gate.weight`` and ``lora_A`` become views of it. Returns
        whether they are packed (not under FSDP, or across dtypes or devices)."""
        if self.is_packed():
            return True
        weights = [m._weights() for m in self.members]
        if not all(m.packable for m in self.members) or len({(g.dtype, g.device) for g, a, _ in weights} | {
                (a.dtype, a.device) for g, a, _ in weights}) != 1 or any(
                type(g.data) is not torch.Tensor or type(a.data) is not torch.Tensor for g, a, _ in weights):
            return False
        bases = [m.base_layer.weight for m in self.members]
        stack = all(m._stackable() for m in self.members)
        if not (self._rows_packed(weights) and (not stack or _stacked(bases, weights[0][0]))):
            views, base_views = pack_rows([(g.detach(), a.detach()) for g, a, _ in weights],
                                          [w.detach() for w in bases] if stack else [])
            for (g, a, _), (gv, av) in zip(weights, views):
                g.data, a.data = gv, av
            for w, wv in zip(bases, base_views):
                w.data = wv
        self._packed_at = self._key()
        return True

    @staticmethod
    def _rows_packed(weights) -> bool:
        """Whether the members' [gate; A] blocks follow each other in one buffer, as pack_rows
        leaves them (each padded to a multiple of 8 rows)."""
        g0 = weights[0][0]
        end = g0.storage_offset()
        for g, a, _ in weights:
            if not (g.is_contiguous() and a.is_contiguous() and g.untyped_storage().data_ptr()
                    == g0.untyped_storage().data_ptr() and g.storage_offset() == end
                    and a.storage_offset() == end + g.numel()):
                return False
            end += -(-(g.shape[0] + a.shape[0] * a.shape[1]) // 8) * 8 * g.shape[1]
        return True

    def left_member(self) -> MeteoRALinear | None:
        """The member whose B goes before its W0 ([B_all | W0], MeteoRALinear._left): the first of
        two adjacent members that keep B beside W0 (gate_proj of gate / up), else None."""
        wide = [m.expert_columns and m._wide() for m in self.members]
        for i in range(len(wide) - 1):
            if wide[i] and wide[i + 1]:
                return self.members[i]
        return None

    def input_columns(self, d_in: int) -> tuple[int, int] | None:
        """(x_col, width): where in a (T, width) buffer the group's input x may be written so that
        ``ops.linear_group_in`` reads it in place, with room for the [B_all | W0] member's H before
        it and the next member's after it (both N r columns); None without such a pair."""
        left = self.left_member()
        if left is None:
            return None
        right = self.members[self.members.index(left) + 1]
        return wide_input_columns(*(m.lora_B.shape[0] * m.lora_B.shape[2] for m in (left, right)), d_in)

    def _drop(self) -> None:
        self._input, self._version, self._waiting = None, None, {}

    def forward(self, member: MeteoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, Routing] | None:
        """``member``'s (out (T, d_out), Routing) on x, from the group's op; None: the member runs
        its own forward."""
        if torch.compiler.is_compiling():
            return None
        if self._input is x and id(member) in self._waiting and self._version == _version(x):
            done = self._waiting.pop(id(member))
            if not self._waiting:
                self._drop()
            return done
        given, self._given = self._given, None
        x2 = x.reshape(-1, x.shape[-1])
        # Members whose B columns go beside W0's ([W0 | B_all]: gate / up by default) and members
        # whose B columns do not run one op together only if they are all of one kind.
        if not all(m._inference_op(x2) for m in self.members) \
                or len({m.expert_columns and m._wide() for m in self.members}) != 1 or not self.pack_():
            self._drop()
            return None
        for m in self.members:
            if m.expert_columns:
                m.pack_(True)  # B's columns, in a buffer of their own (nothing to do once packed)
        args = [m._op_args() for m in self.members]
        if given is not None and given[2] is x:  # x lies in given's buffer, with room for H on either side
            results = ops.linear_group_in(given[0], given[1], x2.shape[1], args)
        else:
            results = ops.linear_group(x2, args)
        mine = None
        self._drop()
        for m, (out, logits, weight, idx) in zip(self.members, results):
            if m is member:
                mine = (out, Routing(logits, weight, idx))
            else:
                self._waiting[id(m)] = (out, Routing(logits, weight, idx))
        self._input, self._version = x, _version(x)
        return mine


def wide_input_columns(nr_before: int, nr_after: int, d_in: int) -> tuple[int, int]:
    """(x_col, width) of an [H_before | x | H_after] buffer as the CUDA op lays it out (run_wide): x
    from a multiple of 8 columns, H_before (nr_before columns) right before it, H_after right after,
    the row a multiple of 8 elements."""
    x_col = -(-nr_before // 8) * 8
    return x_col, -(-(x_col + d_in + nr_after) // 8) * 8


class NormIntoGroup:
    """The forward of an RMSNorm whose output feeds a LinearGroup with a [B_all | W0] / [W0 | B_all]
    pair (gate / up: ``mlp.gate_proj``'s group, looked up at each call, so that linears made anew,
    e.g. by MeteoRAModel.add_adapter, are found), installed as the norm's ``forward`` (``install``;
    its parameters and state_dict keys stay as they are): at prefill sizes (T > 32, fp16 / bf16,
    no autograd, on CUDA or with LinearGroup.on_cpu) it writes its
    output into the middle of a (T, width) buffer (``LinearGroup.input_columns``) and hands the
    group that buffer, whose op (``ops.linear_group_in``) then writes each member's selection H
    beside x instead of copying x. The same arithmetic as Hugging Face's LlamaRMSNorm (x in fp32,
    times rsqrt(mean(x^2) + eps), cast back, times the weight), so the same bits; anywhere else, and
    for norms other than an RMSNorm of that form, it is the norm's own forward.
    ``MeteoRAModel`` installs it by default (``set_norm_into_group``)."""

    # calls of at most this many tokens (decode) take the norm's own forward: the group's op copies x
    # there (a few KB; the op's decode path, T <= kFusedMaxTokens in csrc, reads no [H | x | H] buffer)
    DECODE_TOKENS = 32
    # RMSNorm classes computed as above: Hugging Face's LLaMA-family ones, benchmarks/e2e.py's own
    RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "RMSNorm")

    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        self.norm, self.mlp = norm, mlp

    @staticmethod
    def install(norm: nn.Module, mlp: nn.Module | None) -> bool:
        """Give ``norm`` this forward for ``mlp.gate_proj``'s group (None: its own forward again).
        Returns whether it is installed."""
        if isinstance(norm.__dict__.get("forward"), NormIntoGroup):
            del norm.forward
        if mlp is None or NormIntoGroup.epsilon(norm) is None:
            return False
        norm.forward = NormIntoGroup(norm, mlp)
        return True

    @staticmethod
    def epsilon(norm: nn.Module) -> float | None:
        """The eps of an RMSNorm that NormIntoGroup can compute, else None."""
        if type(norm).__name__ not in NormIntoGroup.RMS_NORMS or not isinstance(getattr(norm, "weight", None), torch.Tensor):
            return None
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        return float(eps) if isinstance(eps, (int, float)) else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if torch.compiler.is_compiling():  # before any shape test, which would add guards
            return type(norm).forward(norm, h)
        d = h.shape[-1]
        tokens = h.numel() // d if d else 0
        weight = norm.weight
        # the cheap checks first: decode-sized calls leave here
        if (tokens <= self.DECODE_TOKENS or h.dtype not in (torch.float16, torch.bfloat16) or not (h.is_cuda or LinearGroup.on_cpu)
                or weight.dtype != h.dtype or weight.device != h.device or _needs_grad(h, weight)):
            return type(norm).forward(norm, h)
        group = getattr(self.mlp._modules.get("gate_proj"), "group", None)
        columns = None if group is None else group.input_columns(d)
        eps = self.epsilon(norm)
        if columns is None or eps is None:
            return type(norm).forward(norm, h)
        x_col, width = columns
        x_cat = torch.empty(tokens, width, dtype=h.dtype, device=h.device)
        x = x_cat[:, x_col: x_col + d]
        hs = h.reshape(tokens, d).to(torch.float32)
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
        torch.mul(weight, hs.to(h.dtype), out=x)
        out = x.view(*h.shape[:-1], d)
        group._given = (x_cat, x_col, out)
        return out


def _version(x: torch.Tensor) -> int | None:
    """x's version counter (in-place writes bump it); None for inference tensors, which count none."""
    return None if x.is_inference() else x._version


# Sibling linears that HF's LLaMA-family modules call on one tensor.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_linears(root: nn.Module, enabled: bool = True) -> list[LinearGroup]:
    """Give the MeteoRA linears under ``root`` that read the same input a ``LinearGroup`` each
    (``GROUPS``: q/k/v and gate/up siblings of one parent), or (``enabled=False``) take them away.
    Returns the groups made."""
    groups = []
    for parent in root.modules():
        for names in GROUPS:
            members = [parent._modules.get(n) for n in names]
            members = [m for m in members if isinstance(m, MeteoRALinear)]
            for m in members:
                m.group = None
            if enabled and len(members) >= 2 and len({m.lora_A.shape[-1] for m in members}) == 1:
                group = LinearGroup(members)
                for m in members:
                    m.group = group
                groups.append(group)
    return groups


def stacks_by_default(d_in: int, d_out: int, grouped: bool) -> bool:
    """MeteoRALinear.stack_base's default: on for the members of a group (q/k/v, gate/up: they read
    the hidden state) and the lone linears that do not narrow their input (o_proj), off for those
    that do (d_in > d_out: down_proj). Decode of a whole LLaMA-3-8B-shaped model on an H200, 28
    adapters of rank 8, top-2 (benchmarks/results/h200_stacked): every linear stacked 7.54 / 8.90
    ms per token at batch 1 / 16, all but down_proj 7.46 / 8.90, none 7.82 / 9.15. down_proj's base
    GEMM is long enough to hide the side-stream routing, so stacking it gains nothing, and its
    stacked buffer (4096 + 256 rows of 14336) is 119 MiB, which the CUDA caching allocator serves
    from a 120 MiB block it does not split: 1 MiB more per layer (1.325 vs 1.297 GB over the base
    model, whose budget is 1.306)."""
    return grouped or d_in <= d_out


def _stacked(bases: Sequence[torch.Tensor], first_gate: torch.Tensor) -> bool:
    """Whether the base weights are consecutive contiguous blocks of first_gate's buffer, the last
    ending where first_gate begins (pack_rows with ``bases``)."""
    end = bases[0].storage_offset()
    for w in bases:
        if not (w.is_contiguous() and w.untyped_storage().data_ptr() == first_gate.untyped_storage().data_ptr()
                and w.storage_offset() == end):
            return False
        end += w.numel()
    return end == first_gate.storage_offset()


@torch.no_grad()
def pack_rows(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], bases: Sequence[torch.Tensor] = ()
              ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Copies of (gate (N, d_in), lora_a (N, r, d_in)) pairs as views of one buffer of consecutive
    blocks [gate; A_1; ...; A_N; zero rows up to a multiple of 8] (cuBLAS runs (T, 256) twice as
    fast as (T, 252) at prefill): the layout meteora.linear (one pair: MeteoRALinear.pack_) and
    meteora.linear_group (a LinearGroup's members) read with one GEMM. ``bases`` (the linears' base
    weights (d_out, d_in)) go first, as contiguous blocks of the same buffer ("stacked": at decode
    sizes the CUDA op then runs every base GEMM and the routing GEMM as one). Returns the pairs'
    views and the bases' views."""
    g0 = pairs[0][0]
    blocks = [-(-(g.shape[0] + a.shape[0] * a.shape[1]) // 8) * 8 for g, a in pairs]
    head = sum(w.shape[0] for w in bases)
    buffer = torch.empty(head + sum(blocks), g0.shape[1], dtype=g0.dtype, device=g0.device)
    base_views, start = [], 0
    for w in bases:
        base_views.append(buffer[start: start + w.shape[0]])
        base_views[-1].copy_(w)
        start += w.shape[0]
    buffer[start:].zero_()
    views = []
    for (g, a), rows in zip(pairs, blocks):
        n, na = g.shape[0], a.shape[0] * a.shape[1]
        buffer[start: start + n] = g
        buffer[start + n: start + n + na] = a.reshape(na, -1)
        views.append((buffer[start: start + n], buffer[start + n: start + n + na].view(a.shape)))
        start += rows
    return views, base_views


@torch.no_grad()
def column_layout(weight: torch.Tensor, lora_b: torch.Tensor, wide: bool,
                  left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a base ``weight`` (d_out, d_in) and the experts' ``lora_b`` (N, d_out, r) in the
    layout meteora.linear reads without copies: lora_b as the (d_out, N r) columns of a row-major
    buffer (strides (r, ld, 1)), after ``weight``'s columns in the same rows when ``wide``
    ([W0 | B_all], ld = d_in + N r up to a multiple of 8), before them with ``left`` too
    ([B_all | W0], W0 from a multiple of 8 columns); else ``weight`` itself is returned."""
    n, d_out, r = lora_b.shape
    d_in = weight.shape[1]
    if wide and left:  # [zero columns | B_all | W0 | zero columns], W0 at a multiple of 8
        start = -(-(n * r) // 8) * 8
        buffer = torch.zeros(d_out, -(-(start + d_in) // 8) * 8, dtype=weight.dtype, device=weight.device)
        buffer[:, start: start + d_in] = weight
        weight, cols = buffer[:, start: start + d_in], buffer[:, start - n * r: start]
    elif wide:  # [W0 | B_all | zero columns up to a multiple of 8]
        buffer = torch.zeros(d_out, -(-(d_in + n * r) // 8) * 8, dtype=weight.dtype, device=weight.device)
        buffer[:, :d_in] = weight
        weight, cols = buffer[:, :d_in], buffer[:, d_in: d_in + n * r]
    else:
        weight = weight.contiguous()  # out of a [W0 | B_all] buffer, if it was in one
        cols = torch.zeros(d_out, -(-(n * r) // 8) * 8, dtype=lora_b.dtype, device=lora_b.device)[:, : n * r]
    cols = cols.view(d_out, n, r)
    cols.copy_(lora_b.permute(1, 0, 2))
    return weight, cols.permute(1, 0, 2)


def meteora_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    expert_mask: torch.Tensor | None,
    top_k: int,
    temperature: float,
    x_lora: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, Routing]:
    """One MeteoRA linear on x (T, d_in): ``(out (T, d_out), Routing)``.

    Without autograd (inference) and without dropout it is one ``meteora.linear`` op. Otherwise
    the LoRA-expert sum is computed first and handed to the base GEMM as its addend (``addmm``:
    cuBLAS adds it in the epilogue), so the output is written once and read never.
    ``x_lora`` is what the experts see (dropout applied), x by default.
    """
    if (x_lora is None or x_lora is x) and _is_op_path(x, base_weight, base_bias, gate_weight, lora_a, lora_b):
        out, logits, weight, idx = ops.linear(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling,
                                              expert_mask, top_k, temperature, impl=impl)
        return out, Routing(logits, weight, idx)
    routing = Routing(*ops.route(x, gate_weight, expert_mask, top_k, temperature, impl=impl))
    x_lora = x if x_lora is None else x_lora
    if x_lora.dtype != lora_a.dtype:
        x_lora = x_lora.to(lora_a.dtype)
    delta = ops.lora_experts(
        x_lora, lora_a, lora_b, scaling, routing.expert_idx, routing.expert_weight, None, impl=impl
    ).to(x.dtype)
    return _plus_base(delta, x, base_weight, base_bias), routing


def _plus_base(delta: torch.Tensor, x: torch.Tensor, base_weight: torch.Tensor,
               base_bias: torch.Tensor | None) -> torch.Tensor:
    """x W0^T (+ bias) + delta, with delta (+ bias) as the base GEMM's addend (``addmm``: cuBLAS
    adds it in the epilogue)."""
    if base_bias is not None:
        delta = delta + base_bias
    if x.dtype == base_weight.dtype and x.shape[0] > 0:
        return torch.addmm(delta, x, base_weight.t())
    return torch.nn.functional.linear(x, base_weight) + delta


def _is_op_path(x, base_weight, base_bias, gate_weight, lora_a, lora_b) -> bool:
    """Whether meteora_linear runs the one meteora.linear op: every operand in x's dtype, no autograd."""
    return (x.dtype == base_weight.dtype == gate_weight.dtype == lora_a.dtype == lora_b.dtype
            and not _needs_grad(x, base_weight, base_bias, gate_weight, lora_a, lora_b))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
