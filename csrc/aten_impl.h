// Pieces built from ATen calls alone, so every device registers the same code.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace meteora {

inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// a @ b accumulated in fp32 with an fp32 result: fp16 / bf16 operands of one dtype on CUDA run the
// fp32-output GEMM (which only CUDA has); other operands are widened first.
inline at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  const bool half16 = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
  if (half16 && a.is_cuda() && b.scalar_type() == a.scalar_type()) return at::mm(a, b, at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// Whether gate_weight (N, d_in) and lora_a (N, r, d_in) are adjacent rows of one buffer
// (MeteoRALinear.pack_): [gate; A_1; ...; A_N] is then a view.
inline bool gate_lora_adjacent(const at::Tensor& gate_weight, const at::Tensor& lora_a) {
  return gate_weight.is_contiguous() && lora_a.is_contiguous() && gate_weight.is_alias_of(lora_a) &&
         lora_a.storage_offset() == gate_weight.storage_offset() + gate_weight.numel();
}

// [gate; A_1; ...; A_N] as one (N + N r, d_in) matrix, the rows of the shrink GEMM that gives the
// gate logits and every expert's x A_e^T at once. A view when they are adjacent rows of one buffer,
// else a copy. `align` > 1 rounds the rows up to a multiple of it (zero rows; cuBLAS runs (T, 256)
// twice as fast as (T, 252)): the view takes the rows that follow A when its buffer holds them
// (pack_ leaves them zero), the copy appends zeros.
inline at::Tensor gate_lora_rows(const at::Tensor& gate_weight, const at::Tensor& lora_a, int64_t align = 1) {
  const int64_t experts = gate_weight.size(0), d_in = gate_weight.size(1);
  const int64_t nr = lora_a.size(0) * lora_a.size(1), rows = experts + nr;
  const int64_t rows_pad = (rows + align - 1) / align * align;
  if (gate_lora_adjacent(gate_weight, lora_a)) {
    const bool room = int64_t(gate_weight.storage().nbytes()) >=
                      (gate_weight.storage_offset() + rows_pad * d_in) * int64_t(gate_weight.element_size());
    return gate_weight.as_strided({room ? rows_pad : rows, d_in}, {d_in, 1}, gate_weight.storage_offset());
  }
  const at::Tensor a_rows = lora_a.reshape({nr, d_in});
  if (rows_pad == rows) return at::cat({gate_weight, a_rows}, 0);
  return at::cat({gate_weight, a_rows, at::zeros({rows_pad - rows, d_in}, gate_weight.options())}, 0);
}

// Backward of route: w = softmax(v / tau) gives dv_j = w_j (dw_j - sum_l w_l dw_l) / tau, scattered
// to the selected logits and added to the logits' own gradient: dz (T, N), in `compute`.
inline at::Tensor route_grad_logits(const std::optional<at::Tensor>& grad_logits,
                                    const std::optional<at::Tensor>& grad_weight, const at::Tensor& x,
                                    int64_t experts, const at::Tensor& expert_weight, const at::Tensor& expert_idx,
                                    double temperature, at::ScalarType compute) {
  at::Tensor grad_z = grad_logits.has_value()
                          ? grad_logits->to(compute).clone()
                          : at::zeros({x.size(0), experts}, x.options().dtype(compute));
  if (grad_weight.has_value()) {
    const at::Tensor w = expert_weight.to(compute);
    const at::Tensor gw = grad_weight->to(compute);
    const at::Tensor grad_v = w * (gw - (w * gw).sum(-1, true)) / temperature;
    grad_z.scatter_add_(1, expert_idx, grad_v);
  }
  return grad_z;
}

// Then dx = dz G, dG = dz^T x, here in the compute type (fp32 for fp16 / bf16 x).
inline std::tuple<at::Tensor, at::Tensor> route_backward_aten(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_weight,
    const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& expert_weight,
    const at::Tensor& expert_idx, double temperature) {
  const auto compute = compute_type(x);
  const at::Tensor grad_z = route_grad_logits(grad_logits, grad_weight, x, gate_weight.size(0), expert_weight,
                                              expert_idx, temperature, compute);
  at::Tensor grad_x = at::matmul(grad_z, gate_weight.to(compute)).to(x.scalar_type());
  at::Tensor grad_gate = at::matmul(grad_z.t(), x.to(compute)).to(gate_weight.scalar_type());
  return {grad_x, grad_gate};
}

// linear = route, the base GEMM, then lora_experts with that base: each device's own kernels,
// reached through the dispatcher.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_composite(
    const at::Tensor& x, const at::Tensor& base_weight, const std::optional<at::Tensor>& base_bias,
    const at::Tensor& gate_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const std::optional<at::Tensor>& expert_mask, int64_t top_k,
    double temperature) {
  check_linear_base(x, base_weight, base_bias);
  static const auto route =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("meteora::route", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double)>();
  static const auto lora =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("meteora::lora_experts", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&)>();
  auto [logits, weight, idx] = route.call(x, gate_weight, expert_mask, top_k, temperature);
  const at::Tensor base = base_bias.has_value() ? at::addmm(*base_bias, x, base_weight.t())
                                                : at::mm(x, base_weight.t());
  auto [out, hidden] = lora.call(x, lora_a, lora_b, scaling, idx, weight, base);
  return {out, logits, weight, idx};
}

// meteora.linear_group's lists: one entry per member, every list as long as base_weight.
inline int64_t check_group_lists(at::TensorList base_weight, const c10::List<std::optional<at::Tensor>>& base_bias,
                                 at::TensorList gate_weight, at::TensorList lora_a, at::TensorList lora_b,
                                 at::TensorList scaling, const c10::List<std::optional<at::Tensor>>& expert_mask,
                                 at::IntArrayRef top_k, at::ArrayRef<double> temperature) {
  const size_t n = base_weight.size();
  TORCH_CHECK(n >= 1, "meteora.linear_group: needs at least one member (base_weight is an empty list)");
  TORCH_CHECK(base_bias.size() == n && gate_weight.size() == n && lora_a.size() == n && lora_b.size() == n &&
                  scaling.size() == n && expert_mask.size() == n && top_k.size() == n && temperature.size() == n,
              "meteora.linear_group: every list needs one entry per member (", n, " base_weight), got base_bias ",
              base_bias.size(), ", gate_weight ", gate_weight.size(), ", lora_a ", lora_a.size(), ", lora_b ",
              lora_b.size(), ", scaling ", scaling.size(), ", expert_mask ", expert_mask.size(), ", top_k ",
              top_k.size(), ", temperature ", temperature.size());
  return int64_t(n);
}

// x_cat[:, x_col : x_col + d_in] for meteora.linear_group_in, checked.
inline at::Tensor group_input(const at::Tensor& x_cat, int64_t x_col, int64_t d_in) {
  TORCH_CHECK(x_cat.dim() == 2 && x_col >= 0 && d_in >= 1 && x_col + d_in <= x_cat.size(1),
              "meteora.linear_group_in: x = x_cat[:, ", x_col, " : ", x_col + d_in, "] must lie in x_cat of shape ",
              x_cat.sizes());
  return x_cat.narrow(1, x_col, d_in);
}

// meteora.linear_group as one meteora.linear per member (each device's own kernel, through the
// dispatcher): [out_0, gate_logits_0, expert_weight_0, expert_idx_0, out_1, ...].
inline std::vector<at::Tensor> linear_group_each(
    const at::Tensor& x, at::TensorList base_weight, const c10::List<std::optional<at::Tensor>>& base_bias,
    at::TensorList gate_weight, at::TensorList lora_a, at::TensorList lora_b, at::TensorList scaling,
    const c10::List<std::optional<at::Tensor>>& expert_mask, at::IntArrayRef top_k, at::ArrayRef<double> temperature) {
  const int64_t n = check_group_lists(base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                                      temperature);
  static const auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("meteora::linear", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
              double)>();
  std::vector<at::Tensor> outs;
  outs.reserve(size_t(4 * n));
  for (int64_t i = 0; i < n; ++i) {
    auto [out, logits, weight, idx] =
        linear.call(x, base_weight[i], base_bias.get(i), gate_weight[i], lora_a[i], lora_b[i], scaling[i],
                    expert_mask.get(i), top_k[i], temperature[i]);
    outs.insert(outs.end(), {out, logits, weight, idx});
  }
  return outs;
}

// meteora.linear_group_in without the column trick: linear_group_each on the view.
inline std::vector<at::Tensor> linear_group_in_each(
    const at::Tensor& x_cat, int64_t x_col, int64_t d_in, at::TensorList base_weight,
    const c10::List<std::optional<at::Tensor>>& base_bias, at::TensorList gate_weight, at::TensorList lora_a,
    at::TensorList lora_b, at::TensorList scaling, const c10::List<std::optional<at::Tensor>>& expert_mask,
    at::IntArrayRef top_k, at::ArrayRef<double> temperature) {
  return linear_group_each(group_input(x_cat, x_col, d_in), base_weight, base_bias, gate_weight, lora_a, lora_b,
                           scaling, expert_mask, top_k, temperature);
}

}  // namespace meteora
