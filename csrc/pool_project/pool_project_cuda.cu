// fastprompt::pool_project -- CUDA kernels (schemas and the contract: pool_project.cpp).
//
// forward:  gather + LayerNorm: one warp per gathered row (two-pass mean / variance in the accumulation type,
//           16-byte vector loads when aligned), writing y in x's dtype and mean / rstd;
//           h = y @ proj through at::mm (cuBLAS, tensor cores for half types; proj is cast to x's dtype, as the
//           reference does); normalisation: one warp per row, in place on h, saving ||h||.
// backward: normalisation backward: one warp per row (g_h in x's dtype); g_y = g_h @ proj^T through at::mm;
//           LayerNorm backward + scatter: one block per row t of x, summing, in increasing n, the contributions
//           of the gathered rows n with rows[n] == t (CSR from a stable sort of rows), so repeated rows need no
//           atomics and the result is deterministic; rows never gathered are written with zeros.
//
// Intermediates (y, h, g_h, g_y) are kept in x's dtype, as the reference rounds them, so that the GEMMs run at
// the input precision; every reduction and elementwise formula runs in the accumulation type (float32, or
// float64 for float64 x). Row indices are checked with device-side asserts (a host check would need a sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
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
namespace pool_project {

using at::Tensor;

// Defined in pool_project.cpp (same shared object).
at::ScalarType stats_dtype(at::ScalarType t);
void check_forward_inputs(const Tensor& x, const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                          const std::optional<Tensor>& ln_bias, double eps, const std::optional<Tensor>& proj);
void check_backward_inputs(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                           const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                           const Tensor& mean, const Tensor& rstd, const Tensor& norm,
                           const std::optional<Tensor>& proj, bool normalize);

namespace {

constexpr double kNormEps = 1e-12;          // F.normalize's eps
constexpr int kRowWarps = 8;                // warps per block of the one-warp-per-row kernels
constexpr int kMaxScatterThreads = 256;     // threads of the one-block-per-row backward kernel (at most)
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// Sums (a, b) over the block; every thread gets the totals. scratch: 64 values of shared memory.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    T ta = lane < nwarps ? scratch[lane] : T(0);
    T tb = lane < nwarps ? scratch[32 + lane] : T(0);
    ta = warp_sum(ta);
    tb = warp_sum(tb);
    if (lane == 0) {
      scratch[0] = ta;
      scratch[32] = tb;
    }
  }
  __syncthreads();
  a = scratch[0];
  b = scratch[32];
  __syncthreads();  // scratch is reused by the next call
}

// ------------------------------------------------------------------------------------------------ forward
// y[n] = LayerNorm(x[rows[n]]); one warp per row n.
template <typename scalar_t, int VEC>
__global__ void layer_norm_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ rows,
                                       const at::opmath_type<scalar_t>* __restrict__ w,
                                       const at::opmath_type<scalar_t>* __restrict__ b,
                                       at::opmath_type<scalar_t> eps, scalar_t* __restrict__ y,
                                       at::opmath_type<scalar_t>* __restrict__ mean,
                                       at::opmath_type<scalar_t>* __restrict__ rstd, int64_t N, int64_t T,
                                       int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t WV = W / VEC;
  const opmath_t inv_w = opmath_t(1) / static_cast<opmath_t>(W);
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t n = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); n < N; n += warps) {
    const int64_t r = rows != nullptr ? rows[n] : n;
    CUDA_KERNEL_ASSERT(r >= 0 && r < T && "pool_project: rows out of range [0, T)");
    const pack_t* __restrict__ xr = reinterpret_cast<const pack_t*>(x + r * W);
    opmath_t s = 0;
    for (int64_t i = lane; i < WV; i += 32) {
      const pack_t p = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += static_cast<opmath_t>(p.v[k]);
    }
    const opmath_t mu = warp_sum(s) * inv_w;
    opmath_t q = 0;
    for (int64_t i = lane; i < WV; i += 32) {
      const pack_t p = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const opmath_t d = static_cast<opmath_t>(p.v[k]) - mu;
        q += d * d;
      }
    }
    const opmath_t rs = rsqrt_acc(warp_sum(q) * inv_w + eps);
    pack_t* __restrict__ yr = reinterpret_cast<pack_t*>(y + n * W);
    for (int64_t i = lane; i < WV; i += 32) {
      const pack_t p = xr[i];
      pack_t o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t c = i * VEC + k;
        opmath_t v = (static_cast<opmath_t>(p.v[k]) - mu) * rs;
        if (w != nullptr) v *= w[c];
        if (b != nullptr) v += b[c];
        o.v[k] = static_cast<scalar_t>(v);
      }
      yr[i] = o;
    }
    if (lane == 0) {
      mean[n] = mu;
      rstd[n] = rs;
    }
  }
}

// h[n] /= max(||h[n]||, eps) in place; norm[n] = ||h[n]||. One warp per row.
template <typename scalar_t, int VEC>
__global__ void normalize_rows_kernel(scalar_t* __restrict__ h, at::opmath_type<scalar_t>* __restrict__ norm,
                                      int64_t N, int64_t E) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t EV = E / VEC;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t n = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); n < N; n += warps) {
    pack_t* __restrict__ hr = reinterpret_cast<pack_t*>(h + n * E);
    opmath_t sq = 0;
    for (int64_t i = lane; i < EV; i += 32) {
      const pack_t p = hr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) sq += static_cast<opmath_t>(p.v[k]) * static_cast<opmath_t>(p.v[k]);
    }
    const opmath_t nrm = sqrt(warp_sum(sq));
    const opmath_t inv = opmath_t(1) / (nrm > opmath_t(kNormEps) ? nrm : opmath_t(kNormEps));
    for (int64_t i = lane; i < EV; i += 32) {
      pack_t p = hr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(p.v[k]) * inv);
      hr[i] = p;
    }
    if (lane == 0) norm[n] = nrm;
  }
}

// ------------------------------------------------------------------------------------------------ backward
// gh[n] = (g[n] - out[n] <g[n], out[n]>) / norm[n]  (g[n] / eps where the norm was clamped). One warp per row.
template <typename scalar_t, int VEC>
__global__ void normalize_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ out,
                                          const at::opmath_type<scalar_t>* __restrict__ norm,
                                          scalar_t* __restrict__ gh, int64_t N, int64_t E) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t EV = E / VEC;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t n = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); n < N; n += warps) {
    const pack_t* __restrict__ gr = reinterpret_cast<const pack_t*>(g + n * E);
    const pack_t* __restrict__ orow = reinterpret_cast<const pack_t*>(out + n * E);
    pack_t* __restrict__ dst = reinterpret_cast<pack_t*>(gh + n * E);
    const opmath_t nrm = norm[n];
    const bool clamped = !(nrm >= opmath_t(kNormEps));
    opmath_t dot = 0;
    if (!clamped) {
      for (int64_t i = lane; i < EV; i += 32) {
        const pack_t pg = gr[i], po = orow[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += static_cast<opmath_t>(pg.v[k]) * static_cast<opmath_t>(po.v[k]);
      }
      dot = warp_sum(dot);
    }
    const opmath_t inv = opmath_t(1) / (clamped ? opmath_t(kNormEps) : nrm);
    for (int64_t i = lane; i < EV; i += 32) {
      const pack_t pg = gr[i], po = orow[i];
      pack_t o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const opmath_t gv = static_cast<opmath_t>(pg.v[k]);
        o.v[k] = static_cast<scalar_t>(clamped ? gv * inv : (gv - static_cast<opmath_t>(po.v[k]) * dot) * inv);
      }
      dst[i] = o;
    }
  }
}

// grad_x[t] = sum over n with rows[n] == t (increasing n) of the LayerNorm backward of gathered row n.
// One block per row t; offsets / order: CSR of the gathered rows by row of x (nullptr: rows is None, n = t).
// Dynamic shared memory: W accumulators, used only by rows of x gathered more than once.
template <typename scalar_t, int VEC>
__global__ void layer_norm_backward_scatter_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                                   const at::opmath_type<scalar_t>* __restrict__ w,
                                                   const at::opmath_type<scalar_t>* __restrict__ mean,
                                                   const at::opmath_type<scalar_t>* __restrict__ rstd,
                                                   const int64_t* __restrict__ order,
                                                   const int64_t* __restrict__ offsets, scalar_t* __restrict__ grad_x,
                                                   int64_t N, int64_t T, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  opmath_t* acc = reinterpret_cast<opmath_t*>(smem_raw);
  __shared__ opmath_t scratch[64];
  if (offsets != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT(offsets[0] == 0 && offsets[T] == N && "pool_project_compiled_bwd: rows out of range [0, T)");
  }
  const int64_t WV = W / VEC;
  const opmath_t inv_w = opmath_t(1) / static_cast<opmath_t>(W);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t j0 = offsets != nullptr ? offsets[t] : t;
    const int64_t j1 = offsets != nullptr ? offsets[t + 1] : t + 1;
    pack_t* __restrict__ dst = reinterpret_cast<pack_t*>(grad_x + t * W);
    if (j0 == j1) {  // uniform over the block: no barrier is skipped by part of it
      pack_t z;
#pragma unroll
      for (int k = 0; k < VEC; ++k) z.v[k] = scalar_t(0);
      for (int64_t i = threadIdx.x; i < WV; i += blockDim.x) dst[i] = z;
      continue;
    }
    const bool single = j1 - j0 == 1;
    const pack_t* __restrict__ xr = reinterpret_cast<const pack_t*>(x + t * W);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = order != nullptr ? order[j] : j;
      const pack_t* __restrict__ gyr = reinterpret_cast<const pack_t*>(gy + n * W);
      const opmath_t mu = mean[n], rs = rstd[n];
      opmath_t sa = 0, sb = 0;
      for (int64_t i = threadIdx.x; i < WV; i += blockDim.x) {
        const pack_t px = xr[i], pg = gyr[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const opmath_t xh = (static_cast<opmath_t>(px.v[k]) - mu) * rs;
          const opmath_t gxh = w != nullptr ? static_cast<opmath_t>(pg.v[k]) * w[i * VEC + k]
                                            : static_cast<opmath_t>(pg.v[k]);
          sa += gxh;
          sb += gxh * xh;
        }
      }
      block_sum2(sa, sb, scratch);
      const opmath_t a = sa * inv_w, b = sb * inv_w;
      for (int64_t i = threadIdx.x; i < WV; i += blockDim.x) {
        const pack_t px = xr[i], pg = gyr[i];
        pack_t o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int64_t c = i * VEC + k;
          const opmath_t xh = (static_cast<opmath_t>(px.v[k]) - mu) * rs;
          const opmath_t gxh = w != nullptr ? static_cast<opmath_t>(pg.v[k]) * w[c] : static_cast<opmath_t>(pg.v[k]);
          const opmath_t contrib = rs * (gxh - a - xh * b);
          if (single) {
            o.v[k] = static_cast<scalar_t>(contrib);
          } else if (j == j0) {
            acc[c] = contrib;  // each thread owns its elements of acc: no barrier needed
          } else {
            acc[c] += contrib;
          }
        }
        if (single) dst[i] = o;
      }
    }
    if (!single) {
      for (int64_t i = threadIdx.x; i < WV; i += blockDim.x) {
        pack_t o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[i * VEC + k]);
        dst[i] = o;
      }
    }
  }
}

int row_blocks(int64_t rows) {
  return static_cast<int>(std::min(std::max<int64_t>(ceil_div(rows, kRowWarps), 1), kMaxBlocks));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pool_project_compiled_fwd_cuda(const Tensor& x, const std::optional<Tensor>& rows,
                                                                      const std::optional<Tensor>& ln_weight,
                                                                      const std::optional<Tensor>& ln_bias, double eps,
                                                                      const std::optional<Tensor>& proj,
                                                                      bool normalize) {
  check_forward_inputs(x, rows, ln_weight, ln_bias, eps, proj);
  TORCH_CHECK(x.is_cuda(), "pool_project_compiled_fwd_cuda: inputs must be CUDA tensors, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const bool has_rows = present(rows), has_proj = present(proj);
  const int64_t T = x.size(0), W = x.size(1);
  const int64_t N = has_rows ? rows->size(0) : T;
  const int64_t E = has_proj ? proj->size(1) : W;
  const auto dtype = x.scalar_type();
  const auto acc = stats_dtype(dtype);
  const auto aopts = x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);

  const Tensor x_c = x.contiguous();
  const Tensor rows_c = has_rows ? rows->contiguous() : Tensor();
  const Tensor w_c = present(ln_weight) ? ln_weight->to(acc).contiguous() : Tensor();
  const Tensor b_c = present(ln_bias) ? ln_bias->to(acc).contiguous() : Tensor();

  Tensor mean = at::empty({N}, aopts);
  Tensor rstd = at::empty({N}, aopts);
  Tensor norm = at::empty({normalize ? N : 0}, aopts);
  Tensor y = at::empty({N, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_compiled_fwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (N > 0) {
      const scalar_t* x_p = x_c.const_data_ptr<scalar_t>();
      scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
      const int64_t* rows_p = has_rows ? rows_c.const_data_ptr<int64_t>() : nullptr;
      const opmath_t* w_p = w_c.defined() ? w_c.const_data_ptr<opmath_t>() : nullptr;
      const opmath_t* b_p = b_c.defined() ? b_c.const_data_ptr<opmath_t>() : nullptr;
      opmath_t* mean_p = mean.mutable_data_ptr<opmath_t>();
      opmath_t* rstd_p = rstd.mutable_data_ptr<opmath_t>();
      const bool vec = W % kVec == 0 && aligned_to(x_p, 16) && aligned_to(y_p, 16);
      const auto e = static_cast<opmath_t>(eps);
      if (vec) {
        layer_norm_rows_kernel<scalar_t, kVec><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(
            x_p, rows_p, w_p, b_p, e, y_p, mean_p, rstd_p, N, T, W);
      } else {
        layer_norm_rows_kernel<scalar_t, 1><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(
            x_p, rows_p, w_p, b_p, e, y_p, mean_p, rstd_p, N, T, W);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  // As the reference: the projection runs in x's dtype (proj.to(h.dtype)).
  Tensor h = has_proj ? at::mm(y, proj->to(dtype)) : y;
  if (!h.is_contiguous()) h = h.contiguous();  // the row kernels index rows densely
  if (normalize && N > 0 && E > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_normalize_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      constexpr int kVec = 16 / sizeof(scalar_t);
      scalar_t* h_p = h.mutable_data_ptr<scalar_t>();
      opmath_t* norm_p = norm.mutable_data_ptr<opmath_t>();
      if (E % kVec == 0 && aligned_to(h_p, 16)) {
        normalize_rows_kernel<scalar_t, kVec><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(h_p, norm_p, N, E);
      } else {
        normalize_rows_kernel<scalar_t, 1><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(h_p, norm_p, N, E);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (normalize) {
    norm.zero_();
  }
  return {h, mean, rstd, norm};
}

Tensor pool_project_compiled_bwd_cuda(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                  const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                                  const Tensor& mean, const Tensor& rstd, const Tensor& norm,
                                  const std::optional<Tensor>& proj, bool normalize) {
  check_backward_inputs(grad_out, out, x, rows, ln_weight, mean, rstd, norm, proj, normalize);
  TORCH_CHECK(x.is_cuda(), "pool_project_compiled_bwd_cuda: inputs must be CUDA tensors, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const bool has_rows = present(rows), has_proj = present(proj);
  const int64_t T = x.size(0), W = x.size(1);
  const int64_t N = grad_out.size(0), E = grad_out.size(1);
  const auto dtype = x.scalar_type();
  const auto acc = stats_dtype(dtype);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  if (N == 0 || T == 0) return at::zeros({T, W}, opts);

  const Tensor x_c = x.contiguous();
  const Tensor g_c = grad_out.contiguous();
  const Tensor mean_c = mean.contiguous();
  const Tensor rstd_c = rstd.contiguous();
  const Tensor w_c = present(ln_weight) ? ln_weight->to(acc).contiguous() : Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Tensor gh = g_c;
  if (normalize && E > 0) {
    gh = at::empty({N, E}, opts);
    const Tensor out_c = out.contiguous();
    const Tensor norm_c = norm.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_normalize_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      constexpr int kVec = 16 / sizeof(scalar_t);
      const scalar_t* g_p = g_c.const_data_ptr<scalar_t>();
      const scalar_t* o_p = out_c.const_data_ptr<scalar_t>();
      const opmath_t* n_p = norm_c.const_data_ptr<opmath_t>();
      scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
      if (E % kVec == 0 && aligned_to(g_p, 16) && aligned_to(o_p, 16) && aligned_to(gh_p, 16)) {
        normalize_backward_kernel<scalar_t, kVec><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(g_p, o_p, n_p, gh_p,
                                                                                              N, E);
      } else {
        normalize_backward_kernel<scalar_t, 1><<<row_blocks(N), kRowWarps * 32, 0, stream>>>(g_p, o_p, n_p, gh_p, N,
                                                                                           E);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const Tensor gy = has_proj ? at::mm(gh, proj->to(dtype).t()).contiguous() : gh;

  // CSR of the gathered rows by row of x: order = stable argsort of rows, offsets[t] = first index >= t.
  Tensor order, offsets;
  if (has_rows) {
    const Tensor rows_c = rows->contiguous();
    const auto sorted = at::sort(rows_c, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    order = std::get<1>(sorted);
    offsets = at::searchsorted(std::get<0>(sorted), at::arange(T + 1, rows_c.options()));
  }

  Tensor grad_x = at::empty({T, W}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_compiled_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int64_t shared = W * static_cast<int64_t>(sizeof(opmath_t));
    TORCH_CHECK(shared <= kMaxSharedBytes, "pool_project_compiled_bwd_cuda: W = ", W,
                " is too wide (the row accumulator needs ", shared, " bytes of shared memory, at most ",
                kMaxSharedBytes, ")");
    const scalar_t* x_p = x_c.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = gy.const_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const opmath_t* w_p = w_c.defined() ? w_c.const_data_ptr<opmath_t>() : nullptr;
    const int64_t* order_p = has_rows ? order.const_data_ptr<int64_t>() : nullptr;
    const int64_t* off_p = has_rows ? offsets.const_data_ptr<int64_t>() : nullptr;
    const bool vec = W % kVec == 0 && aligned_to(x_p, 16) && aligned_to(gy_p, 16) && aligned_to(gx_p, 16);
    const int64_t packs = vec ? W / kVec : W;
    const int threads = static_cast<int>(std::min<int64_t>(kMaxScatterThreads, std::max<int64_t>(32, ceil_div(packs, 32) * 32)));
    const int blocks = static_cast<int>(std::min(T, kMaxBlocks));
    if (vec) {
      layer_norm_backward_scatter_kernel<scalar_t, kVec><<<blocks, threads, shared, stream>>>(
          x_p, gy_p, w_p, mean_c.const_data_ptr<opmath_t>(), rstd_c.const_data_ptr<opmath_t>(), order_p, off_p, gx_p,
          N, T, W);
    } else {
      layer_norm_backward_scatter_kernel<scalar_t, 1><<<blocks, threads, shared, stream>>>(
          x_p, gy_p, w_p, mean_c.const_data_ptr<opmath_t>(), rstd_c.const_data_ptr<opmath_t>(), order_p, off_p, gx_p,
          N, T, W);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace
}  // namespace pool_project
}  // namespace fastprompt

TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("pool_project_compiled_fwd", &fastprompt::pool_project::pool_project_compiled_fwd_cuda);
  m.impl("pool_project_compiled_bwd", &fastprompt::pool_project::pool_project_compiled_bwd_cuda);
}
