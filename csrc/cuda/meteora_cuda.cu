// CUDA kernels of the meteora ops, first version: correct on every shape class (any T, N <= 64,
// k <= 8, r <= 64, strided x, fp32/fp16/bf16), graph-capturable (no host sync), on the current
// stream. SIMT kernels, one warp per token or (token, slot) pair; the grouped tensor-core GEMMs
// that reach the speed targets replace them behind the same ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "aten_impl.h"
#include "checks.h"

namespace meteora {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kChunk = 8;  // dot products one warp accumulates at once

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// One warp per token: N gate logits (fp32 dot products over d_in), then lane 0 selects the top-k
// (strictly greater wins, so ties go to the lower index) and takes the softmax with temperature.
template <typename x_t>
__global__ void route_kernel(const x_t* __restrict__ x, int64_t x_s0, int64_t x_s1,
                             const float* __restrict__ gate, const bool* __restrict__ mask,
                             int64_t tokens, int64_t d_in, int experts, int top_k, float temperature,
                             float* __restrict__ logits, float* __restrict__ weight,
                             int64_t* __restrict__ idx) {
  __shared__ float s_logits[kWarpsPerBlock][kMaxExperts];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= tokens) return;
  const x_t* row = x + t * x_s0;
  for (int e0 = 0; e0 < experts; e0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t i = lane; i < d_in; i += kWarp) {
      const float xv = to_float(row[i * x_s1]);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (e0 + c < experts) acc[c] += xv * gate[int64_t(e0 + c) * d_in + i];
    }
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const float s = warp_sum(acc[c]);
      if (lane == 0 && e0 + c < experts) {
        s_logits[warp][e0 + c] = s;
        logits[t * experts + e0 + c] = s;
      }
    }
  }
  __syncwarp();
  if (lane != 0) return;
  bool taken[kMaxExperts] = {};
  float selected[kMaxTopK];
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    float best_value = -INFINITY;
    for (int e = 0; e < experts; ++e) {
      if (taken[e]) continue;
      const float v = (mask == nullptr || mask[e]) ? s_logits[warp][e] : -INFINITY;
      if (best < 0 || v > best_value) {
        best = e;
        best_value = v;
      }
    }
    taken[best] = true;
    selected[j] = best_value;
    idx[t * top_k + j] = best;
  }
  const float top = selected[0];
  float denom = 0.f;
  for (int j = 0; j < top_k; ++j) {
    selected[j] = (top == -INFINITY) ? 0.f : expf((selected[j] - top) / temperature);
    denom += selected[j];
  }
  for (int j = 0; j < top_k; ++j) weight[t * top_k + j] = denom > 0.f ? selected[j] / denom : 0.f;
}

// One warp per (token, slot) pair p = t * k + j: hidden[p, :] = A[e] x_t, e = idx[p].
template <typename x_t>
__global__ void shrink_kernel(const x_t* __restrict__ x, int64_t x_s0, int64_t x_s1,
                              const x_t* __restrict__ lora_a, const int64_t* __restrict__ idx,
                              int64_t pairs, int top_k, int64_t d_in, int rank,
                              float* __restrict__ hidden) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t p = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (p >= pairs) return;
  const x_t* row = x + (p / top_k) * x_s0;
  const x_t* a = lora_a + idx[p] * rank * d_in;
  for (int r0 = 0; r0 < rank; r0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t i = lane; i < d_in; i += kWarp) {
      const float xv = to_float(row[i * x_s1]);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (r0 + c < rank) acc[c] += xv * to_float(a[int64_t(r0 + c) * d_in + i]);
    }
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const float s = warp_sum(acc[c]);
      if (lane == 0 && r0 + c < rank) hidden[p * rank + r0 + c] = s;
    }
  }
}

// One block per token: out[t, o] = base[t, o] + sum_j w_j s_{e_j} <B[e_j, o, :], hidden[t, j, :]>.
template <typename x_t>
__global__ void expand_kernel(const float* __restrict__ hidden, const x_t* __restrict__ lora_b,
                              const float* __restrict__ scaling, const int64_t* __restrict__ idx,
                              const float* __restrict__ weight, const x_t* __restrict__ base,
                              int top_k, int rank, int64_t d_out, x_t* __restrict__ out) {
  __shared__ float s_hidden[kMaxTopK * kMaxRank];
  __shared__ float s_coef[kMaxTopK];
  __shared__ int64_t s_expert[kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int q = threadIdx.x; q < top_k * rank; q += blockDim.x) s_hidden[q] = hidden[t * top_k * rank + q];
  if (threadIdx.x < top_k) {
    const int64_t e = idx[t * top_k + threadIdx.x];
    s_expert[threadIdx.x] = e;
    s_coef[threadIdx.x] = weight[t * top_k + threadIdx.x] * scaling[e];
  }
  __syncthreads();
  for (int64_t o = threadIdx.x; o < d_out; o += blockDim.x) {
    float acc = base ? to_float(base[t * d_out + o]) : 0.f;
    for (int j = 0; j < top_k; ++j) {
      const x_t* b = lora_b + (s_expert[j] * d_out + o) * rank;
      float dot = 0.f;
      for (int r = 0; r < rank; ++r) dot += to_float(b[r]) * s_hidden[j * rank + r];
      acc += s_coef[j] * dot;
    }
    out[t * d_out + o] = static_cast<x_t>(acc);
  }
}

// One warp per pair p: bt = B[e]^T g_t (r values), then
// grad_weight[p] = s_e <bt, hidden[p]> and grad_hidden_total[p] = w_p s_e bt (+ grad_hidden[p]).
template <typename x_t>
__global__ void backward_pair_kernel(const x_t* __restrict__ grad_out, const x_t* __restrict__ lora_b,
                                     const float* __restrict__ scaling, const int64_t* __restrict__ idx,
                                     const float* __restrict__ weight, const float* __restrict__ hidden,
                                     const float* __restrict__ grad_hidden, int64_t pairs, int top_k,
                                     int rank, int64_t d_out, float* __restrict__ grad_weight,
                                     float* __restrict__ grad_h) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t p = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (p >= pairs) return;
  const int64_t e = idx[p];
  const x_t* g = grad_out + (p / top_k) * d_out;
  const x_t* b = lora_b + e * d_out * rank;
  const float s = scaling[e], coef = weight[p] * s;
  float dot = 0.f;
  for (int r0 = 0; r0 < rank; r0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t o = lane; o < d_out; o += kWarp) {
      const float gv = to_float(g[o]);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (r0 + c < rank) acc[c] += gv * to_float(b[o * rank + r0 + c]);
    }
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const float bt = warp_sum(acc[c]);
      if (lane == 0 && r0 + c < rank) {
        const int64_t q = p * rank + r0 + c;
        dot += bt * hidden[q];
        grad_h[q] = bt * coef + (grad_hidden ? grad_hidden[q] : 0.f);
      }
    }
  }
  if (lane == 0 && grad_weight) grad_weight[p] = dot * s;
}

// One block per token: grad_x[t, i] = sum_j <A[e_j, :, i], grad_h[t, j, :]>.
template <typename x_t>
__global__ void grad_x_kernel(const float* __restrict__ grad_h, const x_t* __restrict__ lora_a,
                              const int64_t* __restrict__ idx, int top_k, int rank, int64_t d_in,
                              x_t* __restrict__ grad_x) {
  __shared__ float s_gh[kMaxTopK * kMaxRank];
  __shared__ int64_t s_expert[kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int q = threadIdx.x; q < top_k * rank; q += blockDim.x) s_gh[q] = grad_h[t * top_k * rank + q];
  if (threadIdx.x < top_k) s_expert[threadIdx.x] = idx[t * top_k + threadIdx.x];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const x_t* a = lora_a + s_expert[j] * rank * d_in + i;
      for (int r = 0; r < rank; ++r) acc += to_float(a[int64_t(r) * d_in]) * s_gh[j * rank + r];
    }
    grad_x[t * d_in + i] = static_cast<x_t>(acc);
  }
}

void check_cuda_dtype(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "meteora.", op, ": CUDA kernels take float32, float16 or bfloat16 x, got ", x.scalar_type());
}

unsigned int warp_blocks(int64_t items) {
  return static_cast<unsigned int>((items + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& x, const at::Tensor& gate_weight,
    const std::optional<at::Tensor>& expert_mask, int64_t top_k, double temperature) {
  check_route_inputs(x, gate_weight, expert_mask, top_k, temperature);
  check_cuda_dtype(x, "route");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d_in = x.size(1), experts = gate_weight.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({tokens, experts}, f32);
  at::Tensor weight = at::empty({tokens, top_k}, f32);
  at::Tensor idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  if (tokens == 0) return {logits, weight, idx};
  const at::Tensor gate = gate_weight.to(at::kFloat).contiguous();
  at::Tensor mask;
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meteora_route_cuda", [&] {
    route_kernel<scalar_t><<<warp_blocks(tokens), kWarpsPerBlock * kWarp, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), gate.data_ptr<float>(),
        mask.defined() ? mask.data_ptr<bool>() : nullptr, tokens, d_in, int(experts), int(top_k),
        float(temperature), logits.data_ptr<float>(), weight.data_ptr<float>(), idx.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, weight, idx};
}

std::tuple<at::Tensor, at::Tensor> lora_experts_cuda(
    const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& expert_idx, const at::Tensor& expert_weight,
    const std::optional<at::Tensor>& base) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base);
  check_cuda_dtype(x, "lora_experts");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d_in = x.size(1), top_k = expert_idx.size(1);
  const int64_t rank = lora_a.size(1), d_out = lora_b.size(1);
  at::Tensor out = at::empty({tokens, d_out}, x.options());
  at::Tensor hidden = at::empty({tokens, top_k, rank}, x.options().dtype(at::kFloat));
  if (tokens == 0) return {out, hidden};
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  const at::Tensor w = expert_weight.to(at::kFloat).contiguous();
  const at::Tensor s = scaling.to(at::kFloat).contiguous();
  at::Tensor base_c;
  if (base.has_value()) base_c = base->to(x.scalar_type()).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meteora_lora_experts_cuda", [&] {
    shrink_kernel<scalar_t><<<warp_blocks(tokens * top_k), kWarpsPerBlock * kWarp, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), a.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        tokens * top_k, int(top_k), d_in, int(rank), hidden.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expand_kernel<scalar_t><<<static_cast<unsigned int>(tokens), 256, 0, stream>>>(
        hidden.data_ptr<float>(), b.data_ptr<scalar_t>(), s.data_ptr<float>(), idx.data_ptr<int64_t>(),
        w.data_ptr<float>(), base_c.defined() ? base_c.data_ptr<scalar_t>() : nullptr, int(top_k), int(rank),
        d_out, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_experts_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_hidden, const at::Tensor& x,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& expert_idx, const at::Tensor& expert_weight, const at::Tensor& hidden,
    bool need_x, bool need_weight, bool need_lora) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, std::nullopt);
  check_cuda_dtype(x, "lora_experts_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d_in = x.size(1), top_k = expert_idx.size(1);
  const int64_t experts = lora_a.size(0), rank = lora_a.size(1), d_out = lora_b.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == tokens && grad_out.size(1) == d_out,
              "meteora.lora_experts_backward: grad_out must be (T, d_out), got ", grad_out.sizes());
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor grad_x = need_x ? at::zeros({tokens, d_in}, x.options()) : empty;
  at::Tensor grad_w = need_weight ? at::zeros({tokens, top_k}, f32) : empty;
  at::Tensor grad_a = need_lora ? at::zeros_like(lora_a) : empty;
  at::Tensor grad_b = need_lora ? at::zeros_like(lora_b) : empty;
  if (tokens == 0 || !(need_x || need_weight || need_lora)) {
    return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
  }
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  const at::Tensor w = expert_weight.to(at::kFloat).contiguous();
  const at::Tensor s = scaling.to(at::kFloat).contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  at::Tensor gh_in;
  if (grad_hidden.has_value()) gh_in = grad_hidden->to(at::kFloat).contiguous();
  at::Tensor grad_h = at::empty({tokens, top_k, rank}, f32);  // dL/dhidden, all terms
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meteora_lora_backward_cuda", [&] {
    backward_pair_kernel<scalar_t><<<warp_blocks(tokens * top_k), kWarpsPerBlock * kWarp, 0, stream>>>(
        g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), s.data_ptr<float>(), idx.data_ptr<int64_t>(),
        w.data_ptr<float>(), h.data_ptr<float>(), gh_in.defined() ? gh_in.data_ptr<float>() : nullptr,
        tokens * top_k, int(top_k), int(rank), d_out, need_weight ? grad_w.data_ptr<float>() : nullptr,
        grad_h.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      grad_x_kernel<scalar_t><<<static_cast<unsigned int>(tokens), 256, 0, stream>>>(
          grad_h.data_ptr<float>(), a.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), int(top_k), int(rank),
          d_in, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (need_lora) {
    // dA[e] = sum over pairs routed to e of grad_h^T x;  dB[e] = sum of g (w s hidden)^T.
    // First version: scatter the pairs into dense (T, N, r) and use one GEMM each.
    const at::Tensor index = idx.unsqueeze(-1).expand({tokens, top_k, rank});
    const at::Tensor gh_dense = at::zeros({tokens, experts, rank}, f32).scatter_(1, index, grad_h);
    const at::Tensor coef = w * s.index_select(0, idx.reshape({-1})).view({tokens, top_k});
    const at::Tensor hc_dense = at::zeros({tokens, experts, rank}, f32).scatter_(1, index, h * coef.unsqueeze(-1));
    grad_a.copy_(at::matmul(gh_dense.view({tokens, experts * rank}).t(), x.to(at::kFloat))
                     .view({experts, rank, d_in}));
    grad_b.copy_(at::matmul(g.to(at::kFloat).t(), hc_dense.view({tokens, experts * rank}))
                     .view({d_out, experts, rank}).permute({1, 0, 2}));
  }
  return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(meteora, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_aten);
  m.impl("lora_experts", &lora_experts_cuda);
  m.impl("lora_experts_backward", &lora_experts_backward_cuda);
}

}  // namespace meteora
