// A CUTLASS sm90 collective mainloop with a second segment of K: the fused expand's GEMM
//
//   out = [A | A2] [B | B2]^T = A B^T + A2 B2^T        (meteora: x W0^T + H B_all^T)
//
// reads A / B and A2 / B2 through two pairs of TMA descriptors into one shared-memory pipeline, so
// the consumer warpgroups accumulate both products in one run of k-tiles and the epilogue writes out
// once. Used by csrc/sm90/fused_expand.cu (the library) and benchmarks/fused_expand/fused_expand.cu
// (the standalone measurement). Needs CUTLASS's headers and sm_90a.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"

namespace meteora::sm90 {

using namespace cute;

// The mainloop with a second segment of K: k-tiles [0, k1_tiles) come from (A, B), the rest from
// (A2, B2), through the same pipeline; the consumer (Base::mma) sees one run of k-tiles. The last
// tile of either segment may be partial (TMA fills zeros past each tensor's edge), so the problem's K
// is K1 rounded up to the tile's K, plus K2.
template <class Base>
struct TwoSegmentMainloop : Base {
  using TileShape = typename Base::TileShape;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::DispatchPolicy;

  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    ElementA const* ptr_A2;
    StrideA dA2;
    ElementB const* ptr_B2;
    StrideB dB2;
    int k1;  // K of (A, B); the problem's K is k1 rounded up to the tile's K, plus K2
  };
  // K1 rounded up to a whole k-tile: where the second segment's k-tiles start.
  CUTLASS_HOST_DEVICE static int padded(int k1) {
    constexpr int kTileK = size<2>(TileShape{});
    return (k1 + kTileK - 1) / kTileK * kTileK;
  }
  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_a2;
    typename Base::Params::TMA_B tma_load_b2;
    int k1 = 0;
  };

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                                  void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    const int k2 = K - padded(args.k1);
    typename Base::Arguments first{args.ptr_A, args.dA, args.ptr_B, args.dB};
    typename Base::Arguments second{args.ptr_A2, args.dA2, args.ptr_B2, args.dB2};
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(make_shape(M, N, args.k1, L), first, workspace);
    auto q = Base::to_underlying_arguments(make_shape(M, N, k2, L), second, workspace);
    p.tma_load_a2 = q.tma_load_a;
    p.tma_load_b2 = q.tma_load_b;
    p.k1 = args.k1;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    return args.k1 > 0 && K > padded(args.k1) &&
           Base::can_implement(make_shape(M, N, args.k1, L), typename Base::Arguments{}) &&
           Base::can_implement(make_shape(M, N, K - padded(args.k1), L), typename Base::Arguments{});
  }

  CUTLASS_DEVICE
  static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p);
    cute::prefetch_tma_descriptor(p.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b2.get_tma_descriptor());
  }

  // (A, B) and (A2, B2), each tiled over its own segment's coordinates. The kernels take the k-tile
  // iterator (the cooperative one) or also the k-tile count (the ping-pong one) from A's tiling, so A's
  // and B's coordinate tensors span the whole K; load() reads them only below the first segment's end.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mA = p.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB = p.tma_load_b.get_tma_tensor(make_shape(N, K, L));
    Tensor mA2 = p.tma_load_a2.get_tma_tensor(make_shape(M, K - padded(p.k1), L));
    Tensor mB2 = p.tma_load_b2.get_tma_tensor(make_shape(N, K - padded(p.k1), L));
    return cute::make_tuple(local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                            local_tile(mA2, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB2, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}));
  }

  // The producer: Base::load's loop, each k-tile from the segment it falls in.
  template <class... Tensors, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<Tensors...> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(typename DispatchPolicy::ClusterShape());
    uint2 local = {block_rank_in_cluster % cluster_x, block_rank_in_cluster / cluster_x};
    auto [m, n, k_unused, l] = blk_coord;
    auto tma_a = p.tma_load_a.get_slice(local.y);
    auto tma_b = p.tma_load_b.get_slice(local.x);
    auto tma_a2 = p.tma_load_a2.get_slice(local.y);
    auto tma_b2 = p.tma_load_b2.get_slice(local.x);
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m, _, l));
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n, _, l));
    Tensor tAgA2 = tma_a2.partition_S(get<2>(load_inputs)(_, _, m, _, l));
    Tensor tBgB2 = tma_b2.partition_S(get<3>(load_inputs)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tBsB = tma_b.partition_D(sB);
    uint16_t mcast_a = 0, mcast_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int j = 0; j < size<1>(block_layout); ++j) mcast_a |= uint16_t(1) << block_layout(local.x, j, Int<0>{});
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int i = 0; i < size<0>(block_layout); ++i) mcast_b |= uint16_t(1) << block_layout(i, local.y, Int<0>{});
    }
    const int k1_tiles = padded(p.k1) / int(size<2>(TileShape{}));
    int k = int(get<0>(*k_tile_iter));  // the first k-tile of this work unit (0: no split-K here)
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (k < k1_tiles) {
        copy(p.tma_load_a.with(*barrier, mcast_a), tAgA(_, _, _, k), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*barrier, mcast_b), tBgB(_, _, _, k), tBsB(_, _, _, stage));
      } else {
        copy(p.tma_load_a2.with(*barrier, mcast_a), tAgA2(_, _, _, k - k1_tiles), tAsA(_, _, _, stage));
        copy(p.tma_load_b2.with(*barrier, mcast_b), tBgB2(_, _, _, k - k1_tiles), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }
};

}  // namespace meteora::sm90
