// fastprompt::assemble -- CUDA kernels (schemas and the contract: assemble.cpp).
//
// forward:  one thread per (n, t, D-vector of up to 16 bytes), writing out[n, t, d : d + VEC].
// backward: deterministic, no atomics. Pairs are grouped by context group with a stable sort of g_idx.
//   stage 1: block (g, split s, chunk of D); thread d sums grad_out[n, t, d] over the pairs of split s of
//            group g (increasing n, then t) into partial[g, s, k, d] (opmath_t, owned by that thread alone);
//   stage 2: thread (g, d) sums partial over s in order -> grad_ctx[g, k, d], and over k -> grad_shift[g, d].
//   The number of splits S only depends on shapes and the GPU, so results are bitwise reproducible.
//
// Index ranges (g_idx < G, c_idx < C, slot < M) are checked with device-side asserts: a host-side check
// would need a device->host sync on every call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastprompt {
namespace assemble {

using at::Tensor;

// Defined in assemble.cpp (same shared object).
void check_forward_inputs(const Tensor& ctx, const std::optional<Tensor>& shift, const Tensor& fixed,
                          const Tensor& slot, const Tensor& pos, int64_t pos_offset, const Tensor& g_idx,
                          const Tensor& c_idx);
void check_backward_inputs(const Tensor& grad_out, const Tensor& slot, const Tensor& g_idx,
                           const Tensor& c_idx, int64_t G, int64_t M);

namespace {

constexpr int kForwardThreads = 256;
constexpr int kBackwardThreads = 128;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;                // grid-stride loops cover the rest
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;        // cap of the stage-1 buffer

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, int VEC, bool HAS_SHIFT>
__global__ void assemble_compiled_fwd_kernel(const scalar_t* __restrict__ ctx, const scalar_t* __restrict__ shift,
                                        const scalar_t* __restrict__ fixed, const scalar_t* __restrict__ pos,
                                        const int64_t* __restrict__ slot, const int64_t* __restrict__ g_idx,
                                        const int64_t* __restrict__ c_idx, scalar_t* __restrict__ out, int64_t G,
                                        int64_t M, int64_t C, int64_t L, int64_t D, int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t DV = D / VEC;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t dv = i % DV;
    const int64_t row = i / DV;  // n * L + t
    const int64_t t = row % L, n = row / L;
    const int64_t g = g_idx[n], c = c_idx[n];
    CUDA_KERNEL_ASSERT(g >= 0 && g < G && "assemble: g_idx out of range [0, G)");
    CUDA_KERNEL_ASSERT(c >= 0 && c < C && "assemble: c_idx out of range [0, C)");
    const int64_t k = slot[c * L + t];
    CUDA_KERNEL_ASSERT(k < M && "assemble: slot out of range (must be < M)");
    const pack_t p = reinterpret_cast<const pack_t*>(pos + t * D)[dv];
    pack_t o;
    if (k >= 0) {
      const pack_t x = reinterpret_cast<const pack_t*>(ctx + (g * M + k) * D)[dv];
      if constexpr (HAS_SHIFT) {
        const pack_t s = reinterpret_cast<const pack_t*>(shift + g * D)[dv];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          o.v[j] = static_cast<scalar_t>(static_cast<opmath_t>(x.v[j]) + static_cast<opmath_t>(s.v[j]) +
                                         static_cast<opmath_t>(p.v[j]));
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          o.v[j] = static_cast<scalar_t>(static_cast<opmath_t>(x.v[j]) + static_cast<opmath_t>(p.v[j]));
        }
      }
    } else {
      const pack_t f = reinterpret_cast<const pack_t*>(fixed + (c * L + t) * D)[dv];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        o.v[j] = static_cast<scalar_t>(static_cast<opmath_t>(f.v[j]) + static_cast<opmath_t>(p.v[j]));
      }
    }
    reinterpret_cast<pack_t*>(out + row * D)[dv] = o;
  }
}

template <typename scalar_t, int VEC, bool HAS_SHIFT>
void launch_forward(const scalar_t* ctx, const scalar_t* shift, const scalar_t* fixed, const scalar_t* pos,
                    const int64_t* slot, const int64_t* g_idx, const int64_t* c_idx, scalar_t* out, int64_t G,
                    int64_t M, int64_t C, int64_t N, int64_t L, int64_t D, cudaStream_t stream) {
  const int64_t total = N * L * (D / VEC);
  const int64_t blocks = std::min(ceil_div(total, kForwardThreads), kMaxBlocks);
  assemble_compiled_fwd_kernel<scalar_t, VEC, HAS_SHIFT><<<static_cast<unsigned>(blocks), kForwardThreads, 0, stream>>>(
      ctx, shift, fixed, pos, slot, g_idx, c_idx, out, G, M, C, L, D, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor assemble_compiled_fwd_cuda(const Tensor& ctx, const std::optional<Tensor>& shift, const Tensor& fixed,
                             const Tensor& slot, const Tensor& pos, int64_t pos_offset, const Tensor& g_idx,
                             const Tensor& c_idx) {
  check_forward_inputs(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx);
  TORCH_CHECK(ctx.is_cuda(), "assemble_compiled_fwd_cuda: inputs must be CUDA tensors, got ", ctx.device());
  c10::cuda::CUDAGuard guard(ctx.device());
  const bool has_shift = shift.has_value() && shift->defined();
  const int64_t G = ctx.size(0), M = ctx.size(1), D = ctx.size(2);
  const int64_t C = slot.size(0), L = slot.size(1), N = g_idx.size(0);
  const auto dtype = ctx.scalar_type();

  const Tensor ctx_c = ctx.contiguous();
  const Tensor shift_c = has_shift ? shift->contiguous() : Tensor();
  const Tensor fixed_c = fixed.to(dtype).contiguous();
  const Tensor pos_c = pos.narrow(0, pos_offset, L).to(dtype).contiguous();
  const Tensor slot_c = slot.contiguous();
  const Tensor g_c = g_idx.contiguous();
  const Tensor c_c = c_idx.contiguous();

  Tensor out = at::empty({N, L, D}, ctx.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "assemble_compiled_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* ctx_p = ctx_c.const_data_ptr<scalar_t>();
    const scalar_t* shift_p = has_shift ? shift_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* fixed_p = fixed_c.const_data_ptr<scalar_t>();
    const scalar_t* pos_p = pos_c.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const int64_t* slot_p = slot_c.const_data_ptr<int64_t>();
    const int64_t* g_p = g_c.const_data_ptr<int64_t>();
    const int64_t* c_p = c_c.const_data_ptr<int64_t>();
    const size_t bytes = sizeof(scalar_t) * kVec;
    const bool vec_ok = D % kVec == 0 && aligned_to(ctx_p, bytes) && aligned_to(fixed_p, bytes) &&
                        aligned_to(pos_p, bytes) && aligned_to(out_p, bytes) &&
                        (!has_shift || aligned_to(shift_p, bytes));
    if (vec_ok && has_shift) {
      launch_forward<scalar_t, kVec, true>(ctx_p, shift_p, fixed_p, pos_p, slot_p, g_p, c_p, out_p, G, M, C, N, L, D, stream);
    } else if (vec_ok) {
      launch_forward<scalar_t, kVec, false>(ctx_p, shift_p, fixed_p, pos_p, slot_p, g_p, c_p, out_p, G, M, C, N, L, D, stream);
    } else if (has_shift) {
      launch_forward<scalar_t, 1, true>(ctx_p, shift_p, fixed_p, pos_p, slot_p, g_p, c_p, out_p, G, M, C, N, L, D, stream);
    } else {
      launch_forward<scalar_t, 1, false>(ctx_p, shift_p, fixed_p, pos_p, slot_p, g_p, c_p, out_p, G, M, C, N, L, D, stream);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ backward
__global__ void assemble_check_indices_kernel(const int64_t* __restrict__ g_idx, const int64_t* __restrict__ c_idx,
                                              int64_t N, const int64_t* __restrict__ slot, int64_t CL, int64_t G,
                                              int64_t C, int64_t M) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  const int64_t total = N > CL ? N : CL;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < N) {
      CUDA_KERNEL_ASSERT(g_idx[i] >= 0 && g_idx[i] < G && "assemble_compiled_bwd: g_idx out of range [0, G)");
      CUDA_KERNEL_ASSERT(c_idx[i] >= 0 && c_idx[i] < C && "assemble_compiled_bwd: c_idx out of range [0, C)");
    }
    if (i < CL) {
      CUDA_KERNEL_ASSERT(slot[i] < M && "assemble_compiled_bwd: slot out of range (must be < M)");
    }
  }
}

// Stage 1: block = (g, s, chunk of D); thread d owns partial[g, s, :, d].
template <typename scalar_t>
__global__ void assemble_compiled_bwd_partial_kernel(const scalar_t* __restrict__ grad_out,
                                                 const int64_t* __restrict__ slot,
                                                 const int64_t* __restrict__ c_idx,
                                                 const int64_t* __restrict__ order,
                                                 const int64_t* __restrict__ group_off,
                                                 at::opmath_type<scalar_t>* __restrict__ partial, int64_t S,
                                                 int64_t M, int64_t L, int64_t D, int64_t d_blocks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t db = b % d_blocks;
  const int64_t gs = b / d_blocks;  // g * S + s
  const int64_t s = gs % S, g = gs / S;
  const int64_t d = db * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t beg = group_off[g], cnt = group_off[g + 1] - beg;
  const int64_t i0 = beg + cnt * s / S, i1 = beg + cnt * (s + 1) / S;
  opmath_t* __restrict__ acc = partial + gs * M * D + d;
  for (int64_t k = 0; k < M; ++k) acc[k * D] = opmath_t(0);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = order[i];
    const int64_t* __restrict__ slot_row = slot + c_idx[n] * L;
    const scalar_t* __restrict__ src = grad_out + n * L * D + d;
    for (int64_t t = 0; t < L; ++t) {
      const int64_t k = slot_row[t];
      if (k >= 0) acc[k * D] += static_cast<opmath_t>(src[t * D]);
    }
  }
}

// Stage 2: thread (g, d): grad_ctx[g, k, d] = sum_s partial[g, s, k, d]; grad_shift[g, d] = sum_k grad_ctx.
template <typename scalar_t>
__global__ void assemble_compiled_bwd_finalize_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                                  scalar_t* __restrict__ grad_ctx,
                                                  scalar_t* __restrict__ grad_shift, int64_t G, int64_t S,
                                                  int64_t M, int64_t D) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < G * D; i += stride) {
    const int64_t g = i / D, d = i % D;
    opmath_t sum_k = opmath_t(0);
    for (int64_t k = 0; k < M; ++k) {
      opmath_t v = opmath_t(0);
      for (int64_t s = 0; s < S; ++s) v += partial[((g * S + s) * M + k) * D + d];
      grad_ctx[(g * M + k) * D + d] = static_cast<scalar_t>(v);
      sum_k += v;
    }
    if (grad_shift != nullptr) grad_shift[g * D + d] = static_cast<scalar_t>(sum_k);
  }
}

std::tuple<Tensor, Tensor> assemble_compiled_bwd_cuda(const Tensor& grad_out, const Tensor& slot, const Tensor& g_idx,
                                                  const Tensor& c_idx, int64_t G, int64_t M, bool has_shift) {
  check_backward_inputs(grad_out, slot, g_idx, c_idx, G, M);
  TORCH_CHECK(grad_out.is_cuda(), "assemble_compiled_bwd_cuda: inputs must be CUDA tensors, got ", grad_out.device());
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t N = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  const int64_t C = slot.size(0);
  const Tensor go_c = grad_out.contiguous();
  const Tensor slot_c = slot.contiguous();
  const Tensor g_c = g_idx.contiguous();
  const Tensor c_c = c_idx.contiguous();

  const auto opts = grad_out.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor grad_ctx = at::empty({G, M, D}, opts);
  Tensor grad_shift = has_shift ? at::empty({G, D}, opts) : at::empty({0}, opts);
  if (G == 0 || D == 0) return {grad_ctx, grad_shift};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (N > 0 || C * L > 0) {
    const int64_t total = std::max(N, C * L);
    const int64_t blocks = std::min(ceil_div(total, kForwardThreads), kMaxBlocks);
    assemble_check_indices_kernel<<<static_cast<unsigned>(blocks), kForwardThreads, 0, stream>>>(
        g_c.const_data_ptr<int64_t>(), c_c.const_data_ptr<int64_t>(), N, slot_c.const_data_ptr<int64_t>(), C * L,
        G, C, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Pairs of each group, in increasing n: stable sort of g_idx; group g is order[off[g] : off[g + 1]].
  const auto sorted = at::sort(g_c, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor& g_sorted = std::get<0>(sorted);
  const Tensor& order = std::get<1>(sorted);
  const Tensor group_off = at::searchsorted(g_sorted, at::arange(G + 1, g_c.options()));

  // Splits per group: enough blocks to fill the GPU, at least ~4 pairs per split, bounded buffer.
  int device_index = grad_out.device().index();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index));
  const int64_t d_blocks = ceil_div(D, kBackwardThreads);
  const int64_t base_blocks = G * d_blocks;
  const int64_t pairs_per_group = ceil_div(N, G);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "assemble_compiled_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    int64_t S = ceil_div(int64_t(8) * sms, base_blocks);
    S = std::min(S, std::max<int64_t>(1, pairs_per_group / 4));
    const int64_t per_split_bytes = std::max<int64_t>(1, G * M * D * int64_t(sizeof(opmath_t)));
    S = std::max<int64_t>(1, std::min(S, kMaxPartialBytes / per_split_bytes));
    const int64_t partial_blocks = base_blocks * S;
    TORCH_CHECK(partial_blocks < (int64_t(1) << 31), "assemble_compiled_bwd_cuda: too many blocks (", partial_blocks,
                ")");
    const auto acc_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    Tensor partial = at::empty({G, S, M, D}, opts.dtype(acc_dtype));
    opmath_t* partial_p = partial.mutable_data_ptr<opmath_t>();

    if (M > 0) {
      assemble_compiled_bwd_partial_kernel<scalar_t><<<static_cast<unsigned>(partial_blocks), kBackwardThreads, 0, stream>>>(
          go_c.const_data_ptr<scalar_t>(), slot_c.const_data_ptr<int64_t>(), c_c.const_data_ptr<int64_t>(),
          order.const_data_ptr<int64_t>(), group_off.const_data_ptr<int64_t>(), partial_p, S, M, L, D, d_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t fin_blocks = std::min(ceil_div(G * D, kForwardThreads), kMaxBlocks);
    assemble_compiled_bwd_finalize_kernel<scalar_t><<<static_cast<unsigned>(fin_blocks), kForwardThreads, 0, stream>>>(
        partial_p, grad_ctx.mutable_data_ptr<scalar_t>(),
        has_shift ? grad_shift.mutable_data_ptr<scalar_t>() : nullptr, G, S, M, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_ctx, grad_shift};
}

}  // namespace
}  // namespace assemble
}  // namespace fastprompt

TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("assemble_compiled_fwd", &fastprompt::assemble::assemble_compiled_fwd_cuda);
  m.impl("assemble_compiled_bwd", &fastprompt::assemble::assemble_compiled_bwd_cuda);
}
