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

// [gate; A_1; ...; A_N] as one (N + N r, d_in) matrix, the rows of the shrink GEMM that gives the
// gate logits and every expert's x A_e^T at once. A view when the layer keeps gate and A as adjacent
// rows of one buffer (MeteoRALinear.pack_), else a copy. `align` > 1 rounds the rows up to a
// multiple of it (zero rows; cuBLAS runs (T, 256) twice as fast as (T, 252)): the view takes the
// rows that follow A when its buffer holds them (pack_ leaves them zero), the copy appends zeros.
inline at::Tensor gate_lora_rows(const at::Tensor& gate_weight, const at::Tensor& lora_a, int64_t align = 1) {
  const int64_t experts = gate_weight.size(0), d_in = gate_weight.size(1);
  const int64_t nr = lora_a.size(0) * lora_a.size(1), rows = experts + nr;
  const int64_t rows_pad = (rows + align - 1) / align * align;
  const bool packed = gate_weight.is_contiguous() && lora_a.is_contiguous() && gate_weight.is_alias_of(lora_a) &&
                      lora_a.storage_offset() == gate_weight.storage_offset() + experts * d_in;
  if (packed) {
    const bool room = int64_t(gate_weight.storage().nbytes()) >=
                      (gate_weight.storage_offset() + rows_pad * d_in) * int64_t(gate_weight.element_size());
    return gate_weight.as_strided({room ? rows_pad : rows, d_in}, {d_in, 1}, gate_weight.storage_offset());
  }
  const at::Tensor a_rows = lora_a.reshape({nr, d_in});
  if (rows_pad == rows) return at::cat({gate_weight, a_rows}, 0);
  return at::cat({gate_weight, a_rows, at::zeros({rows_pad - rows, d_in}, gate_weight.options())}, 0);
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

}  // namespace meteora
