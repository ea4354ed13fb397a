// CPU kernels of the meteora ops. Routing is a hand-written top-k loop (k <= 8, N <= 64);
// the LoRA experts are grouped GEMMs: tokens are bucketed by expert so that each expert's A and B
// are applied once, as one matrix product over its tokens (no per-token weight copies).
// Everything is computed in fp32 (fp64 for fp64 inputs) and cast back at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "aten_impl.h"
#include "checks.h"
#include "topk.h"

namespace meteora {
namespace {

template <typename scalar_t>
void topk_softmax_rows(const scalar_t* logits, const bool* mask, int64_t tokens, int64_t experts,
                       int64_t top_k, double temperature, scalar_t* weight_out, int64_t* idx_out) {
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      topk_softmax<scalar_t>(logits + t * experts, 1, mask, int(experts), int(top_k),
                             scalar_t(temperature), weight_out + t * top_k, idx_out + t * top_k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& x, const at::Tensor& gate_weight,
    const std::optional<at::Tensor>& expert_mask, int64_t top_k, double temperature) {
  check_route_inputs(x, gate_weight, expert_mask, top_k, temperature);
  const auto compute = compute_type(x);
  const int64_t tokens = x.size(0), experts = gate_weight.size(0);
  at::Tensor gate_logits = at::matmul(x.to(compute), gate_weight.to(compute).t()).contiguous();
  at::Tensor expert_weight = at::empty({tokens, top_k}, x.options().dtype(compute));
  at::Tensor expert_idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  at::Tensor mask;
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  AT_DISPATCH_FLOATING_TYPES(compute, "meteora_route_cpu", [&] {
    topk_softmax_rows<scalar_t>(gate_logits.data_ptr<scalar_t>(),
                                mask.defined() ? mask.data_ptr<bool>() : nullptr, tokens, experts,
                                top_k, temperature, expert_weight.data_ptr<scalar_t>(),
                                expert_idx.data_ptr<int64_t>());
  });
  return {gate_logits, expert_weight, expert_idx};
}

// Positions (t * k + j) of the (token, slot) pairs routed to each expert, grouped by expert.
struct ExpertGroups {
  at::Tensor positions;          // (T * k,) int64, sorted by expert (stable)
  std::vector<int64_t> offsets;  // N + 1
};

ExpertGroups group_by_expert(const at::Tensor& expert_idx, int64_t experts) {
  const at::Tensor flat = expert_idx.reshape({-1});
  const int64_t total = flat.numel();
  auto idx = flat.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  ExpertGroups groups;
  groups.offsets.assign(experts + 1, 0);
  for (int64_t i = 0; i < total; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < experts, "meteora.lora_experts: expert_idx holds ", p[i],
                ", outside [0, N=", experts, ")");
    ++groups.offsets[p[i] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) groups.offsets[e + 1] += groups.offsets[e];
  groups.positions = at::empty({total}, idx.options());
  int64_t* out = groups.positions.data_ptr<int64_t>();
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t i = 0; i < total; ++i) out[cursor[p[i]]++] = i;
  return groups;
}

std::tuple<at::Tensor, at::Tensor> lora_experts_cpu(
    const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& expert_idx, const at::Tensor& expert_weight,
    const std::optional<at::Tensor>& base) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base);
  const auto compute = compute_type(x);
  const int64_t tokens = x.size(0), top_k = expert_idx.size(1);
  const int64_t experts = lora_a.size(0), rank = lora_a.size(1), d_out = lora_b.size(1);
  const auto opts = x.options().dtype(compute);

  at::Tensor out = base.has_value() ? base->to(compute, /*non_blocking=*/false, /*copy=*/true)
                                    : at::zeros({tokens, d_out}, opts);
  at::Tensor hidden = at::zeros({tokens * top_k, rank}, opts);
  if (tokens > 0) {
    const ExpertGroups groups = group_by_expert(expert_idx, experts);
    const at::Tensor xc = x.to(compute);
    const at::Tensor weight = expert_weight.reshape({-1}).to(compute);
    const at::Tensor scale = scaling.to(at::kDouble).contiguous();
    const double* scale_p = scale.data_ptr<double>();
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t count = groups.offsets[e + 1] - groups.offsets[e];
      if (count == 0) continue;
      const at::Tensor pos = groups.positions.narrow(0, groups.offsets[e], count);
      const at::Tensor tok = pos.div(top_k, "floor");
      const at::Tensor h = at::matmul(xc.index_select(0, tok), lora_a[e].to(compute).t());
      hidden.index_copy_(0, pos, h);
      const at::Tensor coef = weight.index_select(0, pos).mul(scale_p[e]).unsqueeze(1);
      out.index_add_(0, tok, at::matmul(h * coef, lora_b[e].to(compute).t()));
    }
  }
  return {out.to(x.scalar_type()), hidden.view({tokens, top_k, rank})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_experts_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_hidden, const at::Tensor& x,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& expert_idx, const at::Tensor& expert_weight, const at::Tensor& hidden,
    bool need_x, bool need_weight, bool need_lora) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, std::nullopt);
  const auto compute = compute_type(x);
  const int64_t tokens = x.size(0), d_in = x.size(1), top_k = expert_idx.size(1);
  const int64_t experts = lora_a.size(0), rank = lora_a.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == tokens &&
                  grad_out.size(1) == lora_b.size(1),
              "meteora.lora_experts_backward: grad_out must be (T, d_out), got ", grad_out.sizes());
  TORCH_CHECK(hidden.numel() == tokens * top_k * rank,
              "meteora.lora_experts_backward: hidden must be (T, k, r), got ", hidden.sizes());
  const auto opts = x.options().dtype(compute);

  at::Tensor grad_x = need_x ? at::zeros({tokens, d_in}, opts) : at::Tensor();
  at::Tensor grad_w = need_weight ? at::zeros({tokens * top_k}, opts) : at::Tensor();
  at::Tensor grad_a = need_lora ? at::zeros(lora_a.sizes(), opts) : at::Tensor();
  at::Tensor grad_b = need_lora ? at::zeros(lora_b.sizes(), opts) : at::Tensor();
  if (tokens > 0 && (need_x || need_weight || need_lora)) {
    const ExpertGroups groups = group_by_expert(expert_idx, experts);
    const at::Tensor go = grad_out.to(compute);
    const at::Tensor xc = x.to(compute);
    const at::Tensor hid = hidden.reshape({tokens * top_k, rank}).to(compute);
    at::Tensor g_hid;
    if (grad_hidden.has_value()) g_hid = grad_hidden->reshape({tokens * top_k, rank}).to(compute);
    const at::Tensor weight = expert_weight.reshape({-1}).to(compute);
    const at::Tensor scale = scaling.to(at::kDouble).contiguous();
    const double* scale_p = scale.data_ptr<double>();
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t count = groups.offsets[e + 1] - groups.offsets[e];
      if (count == 0) continue;
      const at::Tensor pos = groups.positions.narrow(0, groups.offsets[e], count);
      const at::Tensor tok = pos.div(top_k, "floor");
      const at::Tensor g = go.index_select(0, tok);                     // (n, d_out)
      const at::Tensor h = hid.index_select(0, pos);                    // (n, r)
      const at::Tensor bt_g = at::matmul(g, lora_b[e].to(compute));     // (n, r) = B^T g
      const at::Tensor coef = weight.index_select(0, pos).mul(scale_p[e]).unsqueeze(1);
      if (need_weight) grad_w.index_copy_(0, pos, (bt_g * h).sum(1).mul(scale_p[e]));
      at::Tensor g_h = bt_g * coef;                                     // dL/dhidden
      if (g_hid.defined()) g_h = g_h + g_hid.index_select(0, pos);
      if (need_x) grad_x.index_add_(0, tok, at::matmul(g_h, lora_a[e].to(compute)));
      if (need_lora) {
        grad_a[e].copy_(at::matmul(g_h.t(), xc.index_select(0, tok)));
        grad_b[e].copy_(at::matmul((g * coef).t(), h));
      }
    }
  }
  const at::Tensor empty = at::empty({0}, x.options());
  return {need_x ? grad_x.to(x.scalar_type()) : empty,
          need_weight ? grad_w.view({tokens, top_k}).to(expert_weight.scalar_type()) : empty,
          need_lora ? grad_a.to(lora_a.scalar_type()) : empty,
          need_lora ? grad_b.to(lora_b.scalar_type()) : empty};
}

// meteora.linear on the CPU. Where the experts are small next to the base weight (the dense
// work below is at most a quarter of the base GEMM's), one GEMM of x with [gate; A_all] gives the
// logits and every expert's shrink, the top-k picks the experts, H (T, N r) keeps w s h of the
// selected ones (0 elsewhere) and out = x W0^T (+ bias) + H B_all^T: three GEMMs instead of a
// gather, two small GEMMs and a scatter per expert (README's default: 4 adapters on SmolLM2). With
// no more (token, expert) pairs than experts (decode), the expand reads only the selected experts'
// B instead of copying every expert's into B_all: SmolLM2's linears at T = 1 cost 11-20 us over
// the base GEMM instead of 26-58 us (2-core CPU).
// Otherwise (many experts, or fp16 / bf16, whose CPU math is in fp32): route + lora_experts.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cpu(
    const at::Tensor& x, const at::Tensor& base_weight, const std::optional<at::Tensor>& base_bias,
    const at::Tensor& gate_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const std::optional<at::Tensor>& expert_mask, int64_t top_k,
    double temperature) {
  const auto compute = compute_type(x);
  const bool plain = x.dim() == 2 && x.scalar_type() == compute && base_weight.scalar_type() == compute &&
                     gate_weight.scalar_type() == compute && lora_a.scalar_type() == compute &&
                     lora_b.scalar_type() == compute;
  if (!plain || x.size(0) == 0) {
    return linear_composite(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                            temperature);
  }
  check_route_inputs(x, gate_weight, expert_mask, top_k, temperature);
  check_linear_base(x, base_weight, base_bias);
  check_linear_experts(x, base_weight, gate_weight, lora_a, lora_b, scaling);
  const int64_t tokens = x.size(0), d_in = x.size(1), d_out = base_weight.size(0);
  const int64_t experts = gate_weight.size(0), rank = lora_a.size(1), nr = experts * rank;
  if (4 * ((experts + nr) * d_in + nr * d_out) > d_in * d_out) {
    return linear_composite(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                            temperature);
  }
  const at::Tensor ext = gate_lora_rows(gate_weight, lora_a);  // [gate; A_all], a view when packed
  const at::Tensor hall = at::mm(x, ext.t());
  at::Tensor logits = hall.narrow(1, 0, experts).contiguous();
  at::Tensor weight = at::empty({tokens, top_k}, x.options());
  at::Tensor idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  at::Tensor mask;
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  at::Tensor H = at::zeros({tokens, nr}, x.options());
  const at::Tensor s = scaling.to(compute).contiguous();
  AT_DISPATCH_FLOATING_TYPES(compute, "meteora_linear_cpu", [&] {
    topk_softmax_rows<scalar_t>(logits.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                                tokens, experts, top_k, temperature, weight.data_ptr<scalar_t>(),
                                idx.data_ptr<int64_t>());
    const scalar_t* hp = hall.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* out_h = H.data_ptr<scalar_t>();
    const int64_t width = experts + nr;
    at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t e = ip[t * top_k + j];
          const scalar_t coef = wp[t * top_k + j] * sp[e];
          for (int64_t c = 0; c < rank; ++c)
            out_h[t * nr + e * rank + c] += coef * hp[t * width + experts + e * rank + c];
        }
    });
  });
  at::Tensor out = base_bias.has_value() ? at::addmm(*base_bias, x, base_weight.t()) : at::mm(x, base_weight.t());
  if (tokens * top_k > experts) {  // more (token, expert) pairs than experts: one GEMM over B_all
    out.addmm_(H, lora_b.permute({1, 0, 2}).reshape({d_out, nr}).t());
    return {out, logits, weight, idx};
  }
  // Decode sizes: only the selected experts' B is read (B_all would be a copy of every expert's).
  const at::Tensor b = lora_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(compute, "meteora_linear_cpu_expand", [&] {
    const scalar_t* hp = H.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, d_out, 512, [&](int64_t begin, int64_t end) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t e = ip[t * top_k + j];
          const scalar_t* h = hp + t * nr + e * rank;  // w s h of this expert (H)
          const scalar_t* be = bp + e * d_out * rank;
          for (int64_t n = begin; n < end; ++n) {
            scalar_t acc = 0;
            for (int64_t c = 0; c < rank; ++c) acc += be[n * rank + c] * h[c];
            op[t * d_out + n] += acc;
          }
        }
    });
  });
  return {out, logits, weight, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(meteora, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_aten);
  m.impl("lora_experts", &lora_experts_cpu);
  m.impl("lora_experts_backward", &lora_experts_backward_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("linear_group", &linear_group_each);
  m.impl("linear_group_in", &linear_group_in_each);
}

}  // namespace meteora
