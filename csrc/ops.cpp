// The one schema file: every meteora op is declared here; each device registers its kernels
// in its own file (cpu/, cuda/). Shapes: T tokens, N experts, k selected, r (padded) rank.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(meteora, m) {
  // gate_logits (T, N) = x (T, d_in) @ gate_weight (N, d_in)^T accumulated in fp32 (fp64 for
  // fp64 x), raw (before expert_mask); expert_idx (T, k) int64 are the top-k of the masked logits
  // in descending order, ties toward the lower index; expert_weight (T, k) =
  // softmax(selected logits / temperature).
  m.def("route(Tensor x, Tensor gate_weight, Tensor? expert_mask, int top_k, float temperature)"
        " -> (Tensor gate_logits, Tensor expert_weight, Tensor expert_idx)");
  m.def("route_backward(Tensor? grad_logits, Tensor? grad_expert_weight, Tensor x,"
        " Tensor gate_weight, Tensor expert_weight, Tensor expert_idx, float temperature)"
        " -> (Tensor grad_x, Tensor grad_gate_weight)");
  // out (T, d_out) = base + sum_j expert_weight[:, j] * scaling[e_j] * B[e_j] (A[e_j] x),
  // e_j = expert_idx[:, j]; lora_a (N, r, d_in), lora_b (N, d_out, r); hidden (T, k, r) =
  // A[e_j] x in fp32 (fp64 for fp64 x), kept for the backward pass.
  m.def("lora_experts(Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor expert_idx,"
        " Tensor expert_weight, Tensor? base) -> (Tensor out, Tensor hidden)");
  // Gradients the flags ask for; the others come back as empty tensors.
  m.def("lora_experts_backward(Tensor grad_out, Tensor? grad_hidden, Tensor x, Tensor lora_a,"
        " Tensor lora_b, Tensor scaling, Tensor expert_idx, Tensor expert_weight, Tensor hidden,"
        " bool need_x, bool need_weight, bool need_lora)"
        " -> (Tensor grad_x, Tensor grad_expert_weight, Tensor grad_lora_a, Tensor grad_lora_b)");
  // A whole MeteoRA linear for inference (no autograd): out = x W0^T (+ bias) + the LoRA experts,
  // routed as `route` does; the same values as route + lora_experts(base = x W0^T + bias). On CUDA
  // (fp16 / bf16) one GEMM computes the gate logits and every expert's shrink (reading the weights
  // in place when gate_weight and lora_a are adjacent rows of one buffer) on a side stream beside
  // the base GEMM, and decode-sized T routes and sums the selected experts in one kernel.
  m.def("linear(Tensor x, Tensor base_weight, Tensor? base_bias, Tensor gate_weight, Tensor lora_a,"
        " Tensor lora_b, Tensor scaling, Tensor? expert_mask, int top_k, float temperature)"
        " -> (Tensor out, Tensor gate_logits, Tensor expert_weight, Tensor expert_idx)");
  // meteora.linear for several linears that read the same x (q, k, v; gate, up): entry i of every
  // list is member i's argument; returns [out_0, gate_logits_0, expert_weight_0, expert_idx_0,
  // out_1, ...], the values of one meteora.linear per member. On CUDA, when the members' [gate; A]
  // rows are consecutive blocks of one buffer (MeteoRALinear.pack_, each block padded to a multiple
  // of 8 rows; LinearGroup packs them so), one GEMM on the side stream computes every member's
  // routing, beside all the base GEMMs.
  m.def("linear_group(Tensor x, Tensor[] base_weight, Tensor?[] base_bias, Tensor[] gate_weight,"
        " Tensor[] lora_a, Tensor[] lora_b, Tensor[] scaling, Tensor?[] expert_mask, int[] top_k,"
        " float[] temperature) -> Tensor[]");
  // meteora.linear_group on x = x_cat[:, x_col : x_col + d_in], free to write x_cat's other columns:
  // on CUDA, at prefill sizes, a pair of members kept as [B_all | W0] and [W0 | B_all] (gate / up)
  // writes its selections H there, so that [H | x] and [x | H] are read where x already is, no copy
  // (x_cat wide enough: columns x_col - N r ... x_col + d_in + N r; else as linear_group on x).
  // Not for torch.compile: torch cannot functionalize an op that writes an input and returns a list.
  m.def("linear_group_in(Tensor(a!) x_cat, int x_col, int d_in, Tensor[] base_weight, Tensor?[] base_bias,"
        " Tensor[] gate_weight, Tensor[] lora_a, Tensor[] lora_b, Tensor[] scaling, Tensor?[] expert_mask,"
        " int[] top_k, float[] temperature) -> Tensor[]");
}

// meteora.linear and linear_group have no backward: its outputs carry a grad_fn that says so if one is asked for
// (a C++ kernel at the Autograd key, so inference pays no Python wrapper per call).
TORCH_LIBRARY_IMPL(meteora, Autograd, m) {
  m.impl("linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_group", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_group_in", torch::autograd::autogradNotImplementedFallback());
}

#ifdef METEORA_WITH_CUDA
namespace meteora {
int64_t fused_expand_launches();  // csrc/cuda/meteora_cuda.cu
}
#endif

namespace {
PyObject* fused_expand_launches(PyObject*, PyObject*) {
#ifdef METEORA_WITH_CUDA
  return PyLong_FromLongLong(meteora::fused_expand_launches());
#else
  return PyLong_FromLongLong(0);
#endif
}
PyMethodDef module_methods[] = {
    {"fused_expand_launches", fused_expand_launches, METH_NOARGS,
     "How many fused prefill GEMMs (the experts' expand inside the base GEMM) this process has launched."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// The Python module loads this library (its static initialisers register the ops) and tells what
// the build has.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "meteora kernels; the ops live in torch.ops.meteora", -1,
                                   module_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
#ifdef METEORA_WITH_CUDA
    PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
#ifdef METEORA_WITH_FUSED_EXPAND
    PyModule_AddIntConstant(module, "WITH_FUSED_EXPAND", 1);
#else
    PyModule_AddIntConstant(module, "WITH_FUSED_EXPAND", 0);
#endif
  }
  return module;
}
