// Pieces built from ATen calls alone, so every device registers the same code.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace meteora {

inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Backward of route: w = softmax(v / tau) gives dv_j = w_j (dw_j - sum_l w_l dw_l) / tau, scattered
// to the selected logits and added to the logits' own gradient; then dx = dz G, dG = dz^T x.
inline std::tuple<at::Tensor, at::Tensor> route_backward_aten(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_weight,
    const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& expert_weight,
    const at::Tensor& expert_idx, double temperature) {
  const auto compute = compute_type(x);
  const int64_t tokens = x.size(0), experts = gate_weight.size(0);
  at::Tensor grad_z = grad_logits.has_value()
                          ? grad_logits->to(compute).clone()
                          : at::zeros({tokens, experts}, x.options().dtype(compute));
  if (grad_weight.has_value()) {
    const at::Tensor w = expert_weight.to(compute);
    const at::Tensor gw = grad_weight->to(compute);
    const at::Tensor grad_v = w * (gw - (w * gw).sum(-1, true)) / temperature;
    grad_z.scatter_add_(1, expert_idx, grad_v);
  }
  at::Tensor grad_x = at::matmul(grad_z, gate_weight.to(compute)).to(x.scalar_type());
  at::Tensor grad_gate = at::matmul(grad_z.t(), x.to(compute)).to(gate_weight.scalar_type());
  return {grad_x, grad_gate};
}

}  // namespace meteora
