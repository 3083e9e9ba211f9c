// fastprompt::pool_project -- EOT gather, final LayerNorm, projection, L2 normalisation: schemas, input checks
// and the CPU kernels. The contract is the Python reference fastprompt/ops/pool_project/reference.py:
//
//   r = rows[n] (or n when rows is None)
//   y[n]   = (x[r] - mean[n]) * rstd[n] * ln_weight + ln_bias       mean, rstd over the W features of x[r]
//   h[n]   = y[n] @ proj                                            (h = y when proj is None)
//   out[n] = h[n] / max(norm[n], 1e-12),  norm[n] = ||h[n]||        (out = h when not normalize)
//
// Shapes: x [T, W], rows [N] int64 | None (N = T), ln_weight / ln_bias [W] | None, proj [W, E] | None (E = W)
//   -> out [N, E] in x's dtype, plus the statistics the backward needs: mean [N], rstd [N], and norm [N] when
//   normalize (an empty [0] tensor otherwise), in the accumulation type (float64 for float64 x, else float32).
//
// Backward (gradient w.r.t. x only; the CLIP weights are frozen):
//
//   g_h[n]  = (g[n] - out[n] <g[n], out[n]>) / norm[n]   if norm[n] >= 1e-12, else g[n] / 1e-12   (normalize)
//   g_y[n]  = g_h[n] @ proj^T
//   gxh     = g_y[n] * ln_weight,   xhat = (x[r] - mean[n]) * rstd[n]
//   grad_x[r] += rstd[n] * (gxh - mean(gxh) - xhat * mean(gxh * xhat))
//
// Rows never gathered get zero; repeated rows accumulate. Every grad_x row is written by one task, summing its
// contributions in increasing n, so the result does not depend on the number of threads.
//
// CPU: every intermediate (y, h, g_h, g_y) is kept in the accumulation type, and the GEMMs run in it through
// at::mm (oneDNN / MKL): a CPU has no fast half-precision GEMM, and this is the more accurate choice. The
// gather + LayerNorm, the normalisation, its backward and the LayerNorm backward + scatter are fused row loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastprompt {
namespace pool_project {

using at::Tensor;

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

void check_same_device(const Tensor& ref, const Tensor& t, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on the same device");
}

void check_vector_param(const std::optional<Tensor>& p, int64_t W, const Tensor& x, const char* op,
                        const char* name) {
  if (!present(p)) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == W, op, ": ", name, " must be [W] = [", W, "], got shape ",
              p->sizes());
  TORCH_CHECK(is_supported_float(p->scalar_type()), op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", p->scalar_type());
  check_same_device(x, *p, op, name, "x");
}

void check_proj(const std::optional<Tensor>& proj, int64_t W, const Tensor& x, const char* op) {
  if (!present(proj)) return;
  TORCH_CHECK(proj->dim() == 2 && proj->size(0) == W, op, ": proj must be [W, E] with W = ", W, ", got shape ",
              proj->sizes());
  TORCH_CHECK(is_supported_float(proj->scalar_type()), op,
              ": proj must be float64, float32, float16 or bfloat16, got ", proj->scalar_type());
  check_same_device(x, *proj, op, "proj", "x");
}

void check_rows(const std::optional<Tensor>& rows, const Tensor& x, const char* op) {
  if (!present(rows)) return;
  TORCH_CHECK(rows->scalar_type() == at::kLong, op, ": rows must be int64, got ", rows->scalar_type());
  TORCH_CHECK(rows->dim() == 1, op, ": rows must be 1-D [N], got shape ", rows->sizes());
  check_same_device(x, *rows, op, "rows", "x");
}

}  // namespace

at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Shape / dtype / device checks of pool_project_compiled_fwd's inputs (no data reads: shared with CUDA).
void check_forward_inputs(const Tensor& x, const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                          const std::optional<Tensor>& ln_bias, double eps, const std::optional<Tensor>& proj) {
  const char* op = "pool_project";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, W], got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  const int64_t W = x.size(1);
  TORCH_CHECK(W > 0, op, ": x must have at least one feature (W > 0), got shape ", x.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  check_rows(rows, x, op);
  check_vector_param(ln_weight, W, x, op, "ln_weight");
  check_vector_param(ln_bias, W, x, op, "ln_bias");
  check_proj(proj, W, x, op);
}

// Shape / dtype / device checks of pool_project_compiled_bwd's inputs.
void check_backward_inputs(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                           const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                           const Tensor& mean, const Tensor& rstd, const Tensor& norm,
                           const std::optional<Tensor>& proj, bool normalize) {
  const char* op = "pool_project_compiled_bwd";
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": x must be [T, W] with W > 0, got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  const int64_t T = x.size(0), W = x.size(1);
  check_rows(rows, x, op);
  check_vector_param(ln_weight, W, x, op, "ln_weight");
  check_proj(proj, W, x, op);
  const int64_t N = present(rows) ? rows->size(0) : T;
  const int64_t E = present(proj) ? proj->size(1) : W;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == E, op,
              ": grad_out must be [N, E] = [", N, ", ", E, "], got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const auto acc = stats_dtype(x.scalar_type());
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == N && rstd.dim() == 1 && rstd.size(0) == N, op,
              ": mean and rstd must be [N] = [", N, "], got ", mean.sizes(), " and ", rstd.sizes());
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc, op, ": mean and rstd must be ", acc,
              ", got ", mean.scalar_type(), " and ", rstd.scalar_type());
  if (normalize) {
    TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == E, op, ": out must be [N, E] = [", N, ", ",
                E, "], got shape ", out.sizes());
    TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(norm.dim() == 1 && norm.size(0) == N && norm.scalar_type() == acc, op, ": norm must be a ", acc,
                " [N] = [", N, "] tensor, got ", norm.scalar_type(), " ", norm.sizes());
    check_same_device(x, out, op, "out", "x");
    check_same_device(x, norm, op, "norm", "x");
  }
  check_same_device(x, grad_out, op, "grad_out", "x");
  check_same_device(x, mean, op, "mean", "x");
  check_same_device(x, rstd, op, "rstd", "x");
}

namespace {

constexpr double kNormEps = 1e-12;      // F.normalize's eps
constexpr int64_t kGrainElems = 32768;  // elements of work per parallel chunk (as at::internal::GRAIN_SIZE)

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)); }

void check_row_values(const Tensor& rows, int64_t T) {
  const int64_t* p = rows.const_data_ptr<int64_t>();
  const int64_t n = rows.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < T, "pool_project: rows has value ", p[i], " at index ", i,
                "; rows must lie in [0, T = ", T, ")");
  }
}

// The row loops below are written so that GCC vectorises them at -O3 without -ffast-math: reductions keep
// kLanes independent partial sums (a fixed summation order, whatever the thread count), and the elementwise
// loops read / write the accumulation type. Half-precision rows are first converted into a per-thread buffer.
constexpr int64_t kLanes = 16;

template <typename T>
inline T row_sum(const T* __restrict__ p, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += p[i + k];
  }
  for (int64_t k = 0; i + k < n; ++k) acc[k] += p[i + k];
  T s = 0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// sum_i (p[i] - c)^2
template <typename T>
inline T row_sum_sq_dev(const T* __restrict__ p, T c, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T d = p[i + k] - c;
      acc[k] += d * d;
    }
  }
  for (int64_t k = 0; i + k < n; ++k) {
    const T d = p[i + k] - c;
    acc[k] += d * d;
  }
  T s = 0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// sum_i p[i] * q[i]
template <typename T>
inline T row_dot(const T* __restrict__ p, const T* __restrict__ q, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += p[i + k] * q[i + k];
  }
  for (int64_t k = 0; i + k < n; ++k) acc[k] += p[i + k] * q[i + k];
  T s = 0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// A row in the accumulation type: the row itself when scalar_t is that type, else converted into buf.
template <typename scalar_t>
inline const at::opmath_type<scalar_t>* as_opmath(const scalar_t* p, int64_t n, std::vector<at::opmath_type<scalar_t>>& buf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return p;
  } else {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<opmath_t>(p[i]);
    return buf.data();
  }
}

// y[n] = LayerNorm(x[rows[n]]) in out_t (scalar_t, or the accumulation type), with its mean / rstd.
// w, b: the affine parameters in the accumulation type (ones / zeros when absent).
template <typename scalar_t, typename out_t>
void layer_norm_rows(const scalar_t* x, const int64_t* rows, const at::opmath_type<scalar_t>* w,
                     const at::opmath_type<scalar_t>* b, double eps, out_t* y, at::opmath_type<scalar_t>* mean,
                     at::opmath_type<scalar_t>* rstd, int64_t N, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, row_grain(W), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = rows != nullptr ? rows[n] : n;
      const opmath_t* __restrict__ xr = as_opmath(x + r * W, W, buf);
      const opmath_t mu = row_sum(xr, W) / static_cast<opmath_t>(W);
      // two-pass variance: no cancellation for rows with a large mean
      const opmath_t var = row_sum_sq_dev(xr, mu, W) / static_cast<opmath_t>(W);
      const opmath_t rs = opmath_t(1) / std::sqrt(var + static_cast<opmath_t>(eps));
      out_t* __restrict__ yr = y + n * W;
      for (int64_t i = 0; i < W; ++i) yr[i] = static_cast<out_t>((xr[i] - mu) * rs * w[i] + b[i]);
      mean[n] = mu;
      rstd[n] = rs;
    }
  });
}

// out[n] = h[n] / max(||h[n]||, eps); norm[n] = ||h[n]||.
template <typename scalar_t>
void normalize_rows(const at::opmath_type<scalar_t>* h, scalar_t* out, at::opmath_type<scalar_t>* norm, int64_t N,
                    int64_t E) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, row_grain(E), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const opmath_t* __restrict__ hr = h + n * E;
      const opmath_t nrm = std::sqrt(row_dot(hr, hr, E));
      const opmath_t inv = opmath_t(1) / std::max(nrm, static_cast<opmath_t>(kNormEps));
      scalar_t* __restrict__ o = out + n * E;
      for (int64_t e = 0; e < E; ++e) o[e] = static_cast<scalar_t>(hr[e] * inv);
      norm[n] = nrm;
    }
  });
}

// g_h[n] = d out[n] / d h[n] applied to g[n] (see the header).
template <typename scalar_t>
void normalize_backward_rows(const scalar_t* g, const scalar_t* out, const at::opmath_type<scalar_t>* norm,
                             at::opmath_type<scalar_t>* gh, int64_t N, int64_t E) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> gbuf, obuf;
    for (int64_t n = begin; n < end; ++n) {
      const opmath_t* __restrict__ gr = as_opmath(g + n * E, E, gbuf);
      opmath_t* __restrict__ ghr = gh + n * E;
      const opmath_t nrm = norm[n];
      if (nrm >= static_cast<opmath_t>(kNormEps)) {
        const opmath_t* __restrict__ orow = as_opmath(out + n * E, E, obuf);
        const opmath_t dot = row_dot(gr, orow, E);
        const opmath_t inv = opmath_t(1) / nrm;
        for (int64_t e = 0; e < E; ++e) ghr[e] = (gr[e] - orow[e] * dot) * inv;
      } else {  // the norm was clamped to eps: out = h / eps, a plain scaling
        const opmath_t inv = opmath_t(1) / static_cast<opmath_t>(kNormEps);
        for (int64_t e = 0; e < E; ++e) ghr[e] = gr[e] * inv;
      }
    }
  });
}

// grad_x[t] = sum over the n with rows[n] == t (increasing n) of the LayerNorm backward of row n.
// order / offsets: CSR of the gathered rows by target row (nullptr: rows is None, n = t). w: ones when absent.
template <typename scalar_t, typename gy_t>
void layer_norm_backward_scatter(const scalar_t* x, const gy_t* gy, const at::opmath_type<scalar_t>* w,
                                 const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                                 const int64_t* order, const int64_t* offsets, scalar_t* grad_x, int64_t T,
                                 int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t inv_w = opmath_t(1) / static_cast<opmath_t>(W);
  at::parallel_for(0, T, row_grain(W), [&](int64_t begin, int64_t end) {
    // xh: normalised row, gxh: gradient w.r.t. it, acc: sum of the contributions (rows gathered twice or more)
    std::vector<opmath_t> xbuf, gbuf, xh_v(static_cast<size_t>(W)), gxh_v(static_cast<size_t>(W)), acc_v;
    opmath_t* __restrict__ xh = xh_v.data();
    opmath_t* __restrict__ gxh = gxh_v.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = offsets != nullptr ? offsets[t] : t;
      const int64_t j1 = offsets != nullptr ? offsets[t + 1] : t + 1;
      scalar_t* __restrict__ dst = grad_x + t * W;
      if (j0 == j1) {
        std::fill(dst, dst + W, scalar_t(0));
        continue;
      }
      const opmath_t* __restrict__ xr = as_opmath(x + t * W, W, xbuf);
      const bool single = j1 - j0 == 1;
      if (!single && acc_v.empty()) acc_v.resize(static_cast<size_t>(W));
      opmath_t* __restrict__ acc = acc_v.data();
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = order != nullptr ? order[j] : j;
        const opmath_t* __restrict__ gyr = as_opmath(gy + n * W, W, gbuf);
        const opmath_t mu = mean[n], rs = rstd[n];
        for (int64_t i = 0; i < W; ++i) {
          xh[i] = (xr[i] - mu) * rs;
          gxh[i] = gyr[i] * w[i];
        }
        const opmath_t a = row_sum(gxh, W) * inv_w;
        const opmath_t b = row_dot(gxh, xh, W) * inv_w;
        if (single) {
          if constexpr (std::is_same_v<scalar_t, opmath_t>) {
            for (int64_t i = 0; i < W; ++i) dst[i] = rs * (gxh[i] - a - xh[i] * b);
          } else {
            for (int64_t i = 0; i < W; ++i) xh[i] = rs * (gxh[i] - a - xh[i] * b);
            for (int64_t i = 0; i < W; ++i) dst[i] = static_cast<scalar_t>(xh[i]);
          }
        } else if (j == j0) {
          for (int64_t i = 0; i < W; ++i) acc[i] = rs * (gxh[i] - a - xh[i] * b);
        } else {
          for (int64_t i = 0; i < W; ++i) acc[i] += rs * (gxh[i] - a - xh[i] * b);
        }
      }
      if (!single) {
        for (int64_t i = 0; i < W; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pool_project_compiled_fwd_cpu(const Tensor& x, const std::optional<Tensor>& rows,
                                                                     const std::optional<Tensor>& ln_weight,
                                                                     const std::optional<Tensor>& ln_bias, double eps,
                                                                     const std::optional<Tensor>& proj,
                                                                     bool normalize) {
  check_forward_inputs(x, rows, ln_weight, ln_bias, eps, proj);
  TORCH_CHECK(x.device().is_cpu(), "pool_project_compiled_fwd_cpu: inputs must be CPU tensors, got ", x.device());
  const bool has_rows = present(rows), has_proj = present(proj);
  const int64_t T = x.size(0), W = x.size(1);
  const int64_t N = has_rows ? rows->size(0) : T;
  const int64_t E = has_proj ? proj->size(1) : W;
  const auto dtype = x.scalar_type();
  const auto acc = stats_dtype(dtype);
  const auto aopts = x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);

  const Tensor x_c = x.contiguous();
  const Tensor rows_c = has_rows ? rows->contiguous() : Tensor();
  if (has_rows) check_row_values(rows_c, T);
  // Absent affine parameters as ones / zeros: one branch-free (vectorised) loop for every case.
  const Tensor w_c = present(ln_weight) ? ln_weight->to(acc).contiguous() : at::ones({W}, aopts);
  const Tensor b_c = present(ln_bias) ? ln_bias->to(acc).contiguous() : at::zeros({W}, aopts);
  const Tensor proj_c = has_proj ? proj->to(acc) : Tensor();

  Tensor mean = at::empty({N}, aopts);
  Tensor rstd = at::empty({N}, aopts);
  Tensor norm = at::empty({normalize ? N : 0}, aopts);
  Tensor out = at::empty({N, E}, x.options().memory_format(at::MemoryFormat::Contiguous));
  // Without projection and normalisation the LayerNorm writes the output directly.
  const bool ln_to_out = !has_proj && !normalize;
  Tensor y = ln_to_out ? out : at::empty({N, W}, aopts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_compiled_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_p = x_c.const_data_ptr<scalar_t>();
    const int64_t* rows_p = has_rows ? rows_c.const_data_ptr<int64_t>() : nullptr;
    const opmath_t* w_p = w_c.const_data_ptr<opmath_t>();
    const opmath_t* b_p = b_c.const_data_ptr<opmath_t>();
    opmath_t* mean_p = mean.mutable_data_ptr<opmath_t>();
    opmath_t* rstd_p = rstd.mutable_data_ptr<opmath_t>();
    if (ln_to_out) {
      layer_norm_rows<scalar_t, scalar_t>(x_p, rows_p, w_p, b_p, eps, out.mutable_data_ptr<scalar_t>(), mean_p,
                                          rstd_p, N, W);
      return;
    }
    layer_norm_rows<scalar_t, opmath_t>(x_p, rows_p, w_p, b_p, eps, y.mutable_data_ptr<opmath_t>(), mean_p, rstd_p,
                                        N, W);
    Tensor h = y;
    if (has_proj) {
      if (!normalize && dtype == acc) {
        at::mm_out(out, y, proj_c);  // the GEMM writes the output
        return;
      }
      h = at::mm(y, proj_c);
    }
    if (normalize) {
      normalize_rows<scalar_t>(h.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(),
                               norm.mutable_data_ptr<opmath_t>(), N, E);
    } else {
      out.copy_(h);  // accumulation type -> x's dtype
    }
  });
  return {out, mean, rstd, norm};
}

Tensor pool_project_compiled_bwd_cpu(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                 const std::optional<Tensor>& rows, const std::optional<Tensor>& ln_weight,
                                 const Tensor& mean, const Tensor& rstd, const Tensor& norm,
                                 const std::optional<Tensor>& proj, bool normalize) {
  check_backward_inputs(grad_out, out, x, rows, ln_weight, mean, rstd, norm, proj, normalize);
  TORCH_CHECK(x.device().is_cpu(), "pool_project_compiled_bwd_cpu: inputs must be CPU tensors, got ", x.device());
  const bool has_rows = present(rows), has_proj = present(proj);
  const int64_t T = x.size(0), W = x.size(1);
  const int64_t N = grad_out.size(0), E = grad_out.size(1);
  const auto dtype = x.scalar_type();
  const auto acc = stats_dtype(dtype);
  const auto aopts = x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);

  const Tensor x_c = x.contiguous();
  const Tensor g_c = grad_out.contiguous();
  const Tensor mean_c = mean.contiguous();
  const Tensor rstd_c = rstd.contiguous();
  const Tensor w_c = present(ln_weight) ? ln_weight->to(acc).contiguous() : at::ones({W}, aopts);
  Tensor grad_x = at::empty({T, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;

  // CSR of the gathered rows by target row: stable (increasing n within a target row).
  std::vector<int64_t> offsets, order;
  if (has_rows) {
    const Tensor rows_c = rows->contiguous();
    check_row_values(rows_c, T);
    const int64_t* r = rows_c.const_data_ptr<int64_t>();
    offsets.assign(static_cast<size_t>(T + 1), 0);
    order.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) ++offsets[r[n] + 1];
    for (int64_t t = 0; t < T; ++t) offsets[t + 1] += offsets[t];
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[cursor[r[n]]++] = n;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_project_compiled_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // g_h: gradient w.r.t. the projected rows (accumulation type), then g_y = g_h @ proj^T.
    Tensor gh;
    if (normalize) {
      gh = at::empty({N, E}, aopts);
      normalize_backward_rows<scalar_t>(g_c.const_data_ptr<scalar_t>(), out.contiguous().const_data_ptr<scalar_t>(),
                                        norm.contiguous().const_data_ptr<opmath_t>(), gh.mutable_data_ptr<opmath_t>(),
                                        N, E);
    }
    const opmath_t* w_p = w_c.const_data_ptr<opmath_t>();
    const int64_t* order_p = has_rows ? order.data() : nullptr;
    const int64_t* off_p = has_rows ? offsets.data() : nullptr;
    const scalar_t* x_p = x_c.const_data_ptr<scalar_t>();
    const opmath_t* mean_p = mean_c.const_data_ptr<opmath_t>();
    const opmath_t* rstd_p = rstd_c.const_data_ptr<opmath_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    if (!normalize && !has_proj) {  // g_y is grad_out itself, read in x's dtype
      layer_norm_backward_scatter<scalar_t, scalar_t>(x_p, g_c.const_data_ptr<scalar_t>(), w_p, mean_p, rstd_p,
                                                      order_p, off_p, gx_p, T, W);
      return;
    }
    if (!normalize) gh = g_c.to(acc);
    const Tensor gy = has_proj ? at::mm(gh, proj->to(acc).t()) : gh;
    layer_norm_backward_scatter<scalar_t, opmath_t>(x_p, gy.const_data_ptr<opmath_t>(), w_p, mean_p, rstd_p,
                                                    order_p, off_p, gx_p, T, W);
  });
  return grad_x;
}

}  // namespace
}  // namespace pool_project
}  // namespace fastprompt

TORCH_LIBRARY_FRAGMENT(fastprompt, m) {
  // mean, rstd: [N]; norm: [N] when normalize, else [0]; all in float64 for float64 x, else float32.
  m.def(
      "pool_project_compiled_fwd(Tensor x, Tensor? rows, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor? proj, "
      "bool normalize) -> (Tensor out, Tensor mean, Tensor rstd, Tensor norm)");
  m.def(
      "pool_project_compiled_bwd(Tensor grad_out, Tensor out, Tensor x, Tensor? rows, Tensor? ln_weight, Tensor mean, "
      "Tensor rstd, Tensor norm, Tensor? proj, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("pool_project_compiled_fwd", &fastprompt::pool_project::pool_project_compiled_fwd_cpu);
  m.impl("pool_project_compiled_bwd", &fastprompt::pool_project::pool_project_compiled_bwd_cpu);
}
