// Input checks shared by every device's kernels: one clear message per bad argument.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "topk.h"

namespace meteora {


inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "meteora: ", name, " is on ", t.device(),
              " but x is on ", ref.device());
}

// x (T, d_in), gate_weight (N, d_in), expert_mask (N,) bool.
inline void check_route_inputs(const at::Tensor& x, const at::Tensor& gate_weight,
                               const std::optional<at::Tensor>& expert_mask, int64_t top_k,
                               double temperature) {
  TORCH_CHECK(x.dim() == 2, "meteora.route: x must be (T, d_in), got shape ", x.sizes());
  TORCH_CHECK(is_float_type(x.scalar_type()), "meteora.route: x must be floating, got ",
              x.scalar_type());
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1),
              "meteora.route: gate_weight must be (N, d_in=", x.size(1), "), got shape ",
              gate_weight.sizes());
  TORCH_CHECK(is_float_type(gate_weight.scalar_type()),
              "meteora.route: gate_weight must be floating, got ", gate_weight.scalar_type());
  check_same_device(x, gate_weight, "gate_weight");
  const int64_t n = gate_weight.size(0);
  TORCH_CHECK(n >= 1 && n <= kMaxExperts, "meteora.route: number of experts N=", n,
              " must be in [1, ", kMaxExperts, "]");
  TORCH_CHECK(top_k >= 1 && top_k <= n && top_k <= kMaxTopK, "meteora.route: top_k=", top_k,
              " must be in [1, min(N=", n, ", ", kMaxTopK, ")]");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "meteora.route: temperature=",
              temperature, " must be a finite number > 0");
  if (expert_mask.has_value()) {
    const auto& mask = *expert_mask;
    TORCH_CHECK(mask.dim() == 1 && mask.size(0) == n && mask.scalar_type() == at::kBool,
                "meteora.route: expert_mask must be a bool tensor of shape (N=", n, ",), got ",
                mask.scalar_type(), " ", mask.sizes());
    check_same_device(x, mask, "expert_mask");
  }
}

// The experts of op `op` (messages "meteora.<op>: ..."): lora_a (N, r, d_in), lora_b (N, d_out, r)
// in x's dtype, scaling (N,) floating, all on x's device.
inline void check_lora_weights(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& scaling) {
  const int64_t d_in = x.size(1);
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == d_in,
              "meteora.", op, ": lora_a must be (N, r, d_in=", d_in, "), got shape ", lora_a.sizes());
  const int64_t n = lora_a.size(0), rank = lora_a.size(1);
  TORCH_CHECK(n >= 1 && n <= kMaxExperts, "meteora.", op, ": number of experts N=", n,
              " must be in [1, ", kMaxExperts, "]");
  TORCH_CHECK(rank >= 1 && rank <= kMaxRank, "meteora.", op, ": rank r=", rank,
              " must be in [1, ", kMaxRank, "]");
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == n && lora_b.size(2) == rank,
              "meteora.", op, ": lora_b must be (N=", n, ", d_out, r=", rank, "), got shape ",
              lora_b.sizes());
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type() && lora_b.scalar_type() == x.scalar_type(),
              "meteora.", op, ": lora_a (", lora_a.scalar_type(), ") and lora_b (",
              lora_b.scalar_type(), ") must have x's dtype (", x.scalar_type(), ")");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == n && is_float_type(scaling.scalar_type()),
              "meteora.", op, ": scaling must be a floating tensor of shape (N=", n, ",), got ",
              scaling.scalar_type(), " ", scaling.sizes());
  for (const auto* t : {&lora_a, &lora_b, &scaling}) check_same_device(x, *t, "a LoRA-expert argument");
}

// x (T, d_in), lora_a (N, r, d_in), lora_b (N, d_out, r), scaling (N,),
// expert_idx (T, k) int64, expert_weight (T, k) floating, base (T, d_out).
inline void check_lora_inputs(const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& scaling,
                              const at::Tensor& expert_idx, const at::Tensor& expert_weight,
                              const std::optional<at::Tensor>& base) {
  TORCH_CHECK(x.dim() == 2, "meteora.lora_experts: x must be (T, d_in), got shape ", x.sizes());
  TORCH_CHECK(is_float_type(x.scalar_type()), "meteora.lora_experts: x must be floating, got ",
              x.scalar_type());
  check_lora_weights("lora_experts", x, lora_a, lora_b, scaling);
  const int64_t tokens = x.size(0), n = lora_a.size(0);
  TORCH_CHECK(expert_idx.dim() == 2 && expert_idx.size(0) == tokens &&
                  expert_idx.scalar_type() == at::kLong,
              "meteora.lora_experts: expert_idx must be int64 of shape (T=", tokens,
              ", k), got ", expert_idx.scalar_type(), " ", expert_idx.sizes());
  const int64_t top_k = expert_idx.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= kMaxTopK && top_k <= n, "meteora.lora_experts: k=", top_k,
              " must be in [1, min(N=", n, ", ", kMaxTopK, ")]");
  TORCH_CHECK(expert_weight.sizes() == expert_idx.sizes() &&
                  is_float_type(expert_weight.scalar_type()),
              "meteora.lora_experts: expert_weight must be floating of shape ", expert_idx.sizes(),
              ", got ", expert_weight.scalar_type(), " ", expert_weight.sizes());
  for (const auto* t : {&expert_idx, &expert_weight}) check_same_device(x, *t, "a LoRA-expert argument");
  if (base.has_value()) {
    TORCH_CHECK(base->dim() == 2 && base->size(0) == tokens && base->size(1) == lora_b.size(1),
                "meteora.lora_experts: base must be (T=", tokens, ", d_out=", lora_b.size(1),
                "), got shape ", base->sizes());
    check_same_device(x, *base, "base");
  }
}

// The base linear of meteora.linear: base_weight (d_out, d_in) and base_bias (d_out,) in x's dtype.
inline void check_linear_base(const at::Tensor& x, const at::Tensor& base_weight,
                              const std::optional<at::Tensor>& base_bias) {
  TORCH_CHECK(x.dim() == 2, "meteora.linear: x must be (T, d_in), got shape ", x.sizes());
  TORCH_CHECK(base_weight.dim() == 2 && base_weight.size(1) == x.size(1),
              "meteora.linear: base_weight must be (d_out, d_in=", x.size(1), "), got shape ",
              base_weight.sizes());
  TORCH_CHECK(base_weight.scalar_type() == x.scalar_type(), "meteora.linear: base_weight (",
              base_weight.scalar_type(), ") must have x's dtype (", x.scalar_type(), ")");
  check_same_device(x, base_weight, "base_weight");
  if (base_bias.has_value()) {
    TORCH_CHECK(base_bias->dim() == 1 && base_bias->size(0) == base_weight.size(0) &&
                    base_bias->scalar_type() == x.scalar_type(),
                "meteora.linear: base_bias must be (d_out=", base_weight.size(0), ",) in x's dtype (",
                x.scalar_type(), "), got ", base_bias->scalar_type(), " ", base_bias->sizes());
    check_same_device(x, *base_bias, "base_bias");
  }
}

// meteora.linear's experts: check_lora_weights, and lora_a / lora_b agree with the gate's N and the
// base weight's d_out.
inline void check_linear_experts(const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& gate_weight,
                                 const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling) {
  check_lora_weights("linear", x, lora_a, lora_b, scaling);
  const int64_t experts = gate_weight.size(0), d_out = base_weight.size(0);
  TORCH_CHECK(lora_a.size(0) == experts && lora_b.size(1) == d_out, "meteora.linear: lora_a (N, r, d_in) and lora_b "
              "(N, d_out, r) must have N=", experts, " (the gate's) and d_out=", d_out, ", got ", lora_a.sizes(),
              " and ", lora_b.sizes());
}

}  // namespace meteora
