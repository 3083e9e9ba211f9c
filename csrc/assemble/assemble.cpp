// fastprompt::assemble -- packed prompt input embeddings: schemas, input checks and the CPU kernels.
//
// For pair n (g = g_idx[n], c = c_idx[n]) and position t:
//
//   out[n, t] = (slot[c, t] >= 0 ? ctx[g, slot[c, t]] + shift[g] : fixed[c, t]) + pos[pos_offset + t]
//
// Shapes: ctx [G, M, D], shift [G, D] | None, fixed [C, L, D], slot [C, L] int64, pos [P, D],
// g_idx [N] int64, c_idx [N] int64  ->  out [N, L, D] (ctx's dtype). The contract is the Python reference
// fastprompt/ops/assemble/reference.py. Only ctx and shift are differentiable:
//
//   grad_ctx[g, k]  = sum_{n: g_idx[n] == g} sum_{t: slot[c_idx[n], t] == k} grad_out[n, t]
//   grad_shift[g]   = sum_k grad_ctx[g, k]
//
// The backward is deterministic: the sums run in a fixed order (pairs of a group in increasing n,
// positions in increasing t) whatever the number of threads, and every output element is written by
// exactly one task.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace fastprompt {
namespace assemble {

using at::Tensor;

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "assemble: ", name, " is on ", t.device(), " but ctx is on ",
              ref.device(), "; all inputs must be on the same device");
}

void check_index_vector(const Tensor& idx, const char* name) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "assemble: ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "assemble: ", name, " must be 1-D [N], got shape ", idx.sizes());
}

}  // namespace

// Shape / dtype / device checks of assemble_compiled_fwd's inputs (no data reads, so usable for CUDA too).
void check_forward_inputs(const Tensor& ctx, const std::optional<Tensor>& shift, const Tensor& fixed,
                          const Tensor& slot, const Tensor& pos, int64_t pos_offset, const Tensor& g_idx,
                          const Tensor& c_idx) {
  TORCH_CHECK(ctx.dim() == 3, "assemble: ctx must be [G, M, D], got shape ", ctx.sizes());
  TORCH_CHECK(is_supported_float(ctx.scalar_type()),
              "assemble: ctx must be float64, float32, float16 or bfloat16, got ", ctx.scalar_type());
  const int64_t G = ctx.size(0), D = ctx.size(2);
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(shift->dim() == 2 && shift->size(0) == G && shift->size(1) == D,
                "assemble: shift must be [G, D] = [", G, ", ", D, "], got shape ", shift->sizes());
    TORCH_CHECK(shift->scalar_type() == ctx.scalar_type(), "assemble: shift dtype ", shift->scalar_type(),
                " differs from ctx dtype ", ctx.scalar_type());
    check_same_device(ctx, *shift, "shift");
  }
  TORCH_CHECK(fixed.dim() == 3, "assemble: fixed must be [C, L, D], got shape ", fixed.sizes());
  TORCH_CHECK(fixed.size(2) == D, "assemble: fixed's last dim (", fixed.size(2), ") must equal ctx's D (", D,
              ")");
  TORCH_CHECK(is_supported_float(fixed.scalar_type()), "assemble: fixed must be a floating tensor, got ",
              fixed.scalar_type());
  TORCH_CHECK(slot.scalar_type() == at::kLong, "assemble: slot must be int64, got ", slot.scalar_type());
  TORCH_CHECK(slot.dim() == 2 && slot.size(0) == fixed.size(0) && slot.size(1) == fixed.size(1),
              "assemble: slot must be [C, L] = [", fixed.size(0), ", ", fixed.size(1),
              "] (fixed's first two dims), got shape ", slot.sizes());
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) == D, "assemble: pos must be [P_total, D] with D = ", D,
              ", got shape ", pos.sizes());
  TORCH_CHECK(is_supported_float(pos.scalar_type()), "assemble: pos must be a floating tensor, got ",
              pos.scalar_type());
  const int64_t L = slot.size(1);
  TORCH_CHECK(pos_offset >= 0 && pos_offset + L <= pos.size(0), "assemble: pos_offset + L = ", pos_offset,
              " + ", L, " must lie in [0, P_total = ", pos.size(0), "] (pos_offset must be >= 0)");
  check_index_vector(g_idx, "g_idx");
  check_index_vector(c_idx, "c_idx");
  TORCH_CHECK(g_idx.size(0) == c_idx.size(0), "assemble: g_idx and c_idx must have the same length N, got ",
              g_idx.size(0), " and ", c_idx.size(0));
  check_same_device(ctx, fixed, "fixed");
  check_same_device(ctx, slot, "slot");
  check_same_device(ctx, pos, "pos");
  check_same_device(ctx, g_idx, "g_idx");
  check_same_device(ctx, c_idx, "c_idx");
}

// Shape / dtype / device checks of assemble_compiled_bwd's inputs.
void check_backward_inputs(const Tensor& grad_out, const Tensor& slot, const Tensor& g_idx,
                           const Tensor& c_idx, int64_t G, int64_t M) {
  TORCH_CHECK(grad_out.dim() == 3, "assemble_compiled_bwd: grad_out must be [N, L, D], got shape ",
              grad_out.sizes());
  TORCH_CHECK(is_supported_float(grad_out.scalar_type()),
              "assemble_compiled_bwd: grad_out must be float64, float32, float16 or bfloat16, got ",
              grad_out.scalar_type());
  TORCH_CHECK(G >= 0 && M >= 0, "assemble_compiled_bwd: G and M must be >= 0, got G=", G, ", M=", M);
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.dim() == 2,
              "assemble_compiled_bwd: slot must be an int64 [C, L] tensor, got ", slot.scalar_type(), " ",
              slot.sizes());
  check_index_vector(g_idx, "g_idx");
  check_index_vector(c_idx, "c_idx");
  TORCH_CHECK(grad_out.size(0) == g_idx.size(0) && grad_out.size(0) == c_idx.size(0) &&
                  grad_out.size(1) == slot.size(1),
              "assemble_compiled_bwd: grad_out ", grad_out.sizes(), " must be [N, L, D] with N = len(g_idx) = ",
              g_idx.size(0), ", len(c_idx) = ", c_idx.size(0), " and L = slot.size(1) = ", slot.size(1));
  check_same_device(grad_out, slot, "slot");
  check_same_device(grad_out, g_idx, "g_idx");
  check_same_device(grad_out, c_idx, "c_idx");
}

namespace {

constexpr int64_t kGrainElems = 32768;  // elements of work per parallel chunk (as at::internal::GRAIN_SIZE)

// Checks lo <= idx[i] < hi for a contiguous CPU int64 tensor (reads the data: CPU only).
void check_index_values(const Tensor& idx, int64_t lo, int64_t hi, const char* name, const char* what) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= lo && p[i] < hi, "assemble: ", name, " has value ", p[i], " at flat index ", i,
                "; ", what, " must lie in [", lo, ", ", hi, ")");
  }
}

void check_slot_values(const Tensor& slot, int64_t M) {
  const int64_t* p = slot.const_data_ptr<int64_t>();
  const int64_t n = slot.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] < M, "assemble: slot has value ", p[i], " at flat index ", i,
                "; context slots must be < M = ", M, " (negative values mark fixed tokens)");
  }
}

Tensor assemble_compiled_fwd_cpu(const Tensor& ctx, const std::optional<Tensor>& shift, const Tensor& fixed,
                            const Tensor& slot, const Tensor& pos, int64_t pos_offset, const Tensor& g_idx,
                            const Tensor& c_idx) {
  check_forward_inputs(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx);
  const bool has_shift = shift.has_value() && shift->defined();
  const int64_t G = ctx.size(0), M = ctx.size(1), D = ctx.size(2);
  const int64_t C = slot.size(0), L = slot.size(1), N = g_idx.size(0);
  const auto dtype = ctx.scalar_type();

  const Tensor ctx_c = ctx.contiguous();
  const Tensor shift_c = has_shift ? shift->contiguous() : Tensor();
  const Tensor fixed_c = fixed.to(dtype).contiguous();                       // as the reference: fixed.to(ctx.dtype)
  const Tensor pos_c = pos.narrow(0, pos_offset, L).to(dtype).contiguous();  // rows used, in ctx's dtype
  const Tensor slot_c = slot.contiguous();
  const Tensor g_c = g_idx.contiguous();
  const Tensor c_c = c_idx.contiguous();
  check_index_values(g_c, 0, G, "g_idx", "context groups");
  check_index_values(c_c, 0, C, "c_idx", "classes");
  check_slot_values(slot_c, M);

  Tensor out = at::empty({N, L, D}, ctx.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "assemble_compiled_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* ctx_p = ctx_c.const_data_ptr<scalar_t>();
    const scalar_t* shift_p = has_shift ? shift_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* fixed_p = fixed_c.const_data_ptr<scalar_t>();
    const scalar_t* pos_p = pos_c.const_data_ptr<scalar_t>();
    const int64_t* slot_p = slot_c.const_data_ptr<int64_t>();
    const int64_t* g_p = g_c.const_data_ptr<int64_t>();
    const int64_t* c_p = c_c.const_data_ptr<int64_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1));

    at::parallel_for(0, N * L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / L, t = row % L;
        const int64_t g = g_p[n], c = c_p[n];
        const int64_t k = slot_p[c * L + t];
        const scalar_t* __restrict__ p = pos_p + t * D;
        scalar_t* __restrict__ o = out_p + row * D;
        if (k >= 0) {
          const scalar_t* __restrict__ x = ctx_p + (g * M + k) * D;
          if (shift_p != nullptr) {
            const scalar_t* __restrict__ s = shift_p + g * D;
            for (int64_t d = 0; d < D; ++d) {
              o[d] = static_cast<scalar_t>(static_cast<opmath_t>(x[d]) + static_cast<opmath_t>(s[d]) +
                                           static_cast<opmath_t>(p[d]));
            }
          } else {
            for (int64_t d = 0; d < D; ++d) {
              o[d] = static_cast<scalar_t>(static_cast<opmath_t>(x[d]) + static_cast<opmath_t>(p[d]));
            }
          }
        } else {
          const scalar_t* __restrict__ f = fixed_p + (c * L + t) * D;
          for (int64_t d = 0; d < D; ++d) {
            o[d] = static_cast<scalar_t>(static_cast<opmath_t>(f[d]) + static_cast<opmath_t>(p[d]));
          }
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> assemble_compiled_bwd_cpu(const Tensor& grad_out, const Tensor& slot,
                                                 const Tensor& g_idx, const Tensor& c_idx, int64_t G,
                                                 int64_t M, bool has_shift) {
  check_backward_inputs(grad_out, slot, g_idx, c_idx, G, M);
  const int64_t N = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  const int64_t C = slot.size(0);
  const Tensor go_c = grad_out.contiguous();
  const Tensor slot_c = slot.contiguous();
  const Tensor g_c = g_idx.contiguous();
  const Tensor c_c = c_idx.contiguous();
  check_index_values(g_c, 0, G, "g_idx", "context groups");
  check_index_values(c_c, 0, C, "c_idx", "classes");
  check_slot_values(slot_c, M);

  const auto opts = grad_out.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor grad_ctx = at::empty({G, M, D}, opts);
  Tensor grad_shift = has_shift ? at::empty({G, D}, opts) : at::empty({0}, opts);
  if (G == 0 || D == 0) return {grad_ctx, grad_shift};

  // Pairs grouped by context group, stable (increasing n inside a group): counting sort.
  const int64_t* g_p = g_c.const_data_ptr<int64_t>();
  const int64_t* c_p = c_c.const_data_ptr<int64_t>();
  const int64_t* slot_p = slot_c.const_data_ptr<int64_t>();
  std::vector<int64_t> group_off(G + 1, 0), order(N);
  for (int64_t n = 0; n < N; ++n) ++group_off[g_p[n] + 1];
  for (int64_t g = 0; g < G; ++g) group_off[g + 1] += group_off[g];
  {
    std::vector<int64_t> cursor(group_off.begin(), group_off.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[cursor[g_p[n]]++] = n;
  }
  // Context positions of each class: (t, k) with k = slot[c, t] >= 0, in increasing t.
  std::vector<int64_t> cls_off(C + 1, 0), ctx_t, ctx_k;
  ctx_t.reserve(C * L);
  ctx_k.reserve(C * L);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < L; ++t) {
      const int64_t k = slot_p[c * L + t];
      if (k >= 0) {
        ctx_t.push_back(t);
        ctx_k.push_back(k);
      }
    }
    cls_off[c + 1] = static_cast<int64_t>(ctx_t.size());
  }

  // Tasks are (group, chunk of D): each owns grad_ctx[g, :, chunk] and grad_shift[g, chunk] outright.
  const int64_t want_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t want_chunks = (want_tasks + G - 1) / G;
  int64_t dchunk = std::max<int64_t>(64, (D + want_chunks - 1) / want_chunks);
  dchunk = std::min<int64_t>(D, (dchunk + 15) / 16 * 16);
  const int64_t n_chunks = (D + dchunk - 1) / dchunk;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "assemble_compiled_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* go_p = go_c.const_data_ptr<scalar_t>();
    scalar_t* gctx_p = grad_ctx.mutable_data_ptr<scalar_t>();
    scalar_t* gshift_p = has_shift ? grad_shift.mutable_data_ptr<scalar_t>() : nullptr;

    at::parallel_for(0, G * n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(static_cast<size_t>(M * dchunk));
      std::vector<opmath_t> acc_shift(static_cast<size_t>(dchunk));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / n_chunks;
        const int64_t d0 = (task % n_chunks) * dchunk;
        const int64_t dl = std::min(dchunk, D - d0);
        std::fill(acc.begin(), acc.begin() + M * dl, opmath_t(0));
        for (int64_t i = group_off[g]; i < group_off[g + 1]; ++i) {
          const int64_t n = order[i];
          const int64_t c = c_p[n];
          for (int64_t j = cls_off[c]; j < cls_off[c + 1]; ++j) {
            const scalar_t* __restrict__ src = go_p + (n * L + ctx_t[j]) * D + d0;
            opmath_t* __restrict__ a = acc.data() + ctx_k[j] * dl;
            for (int64_t d = 0; d < dl; ++d) a[d] += static_cast<opmath_t>(src[d]);
          }
        }
        for (int64_t k = 0; k < M; ++k) {
          const opmath_t* __restrict__ a = acc.data() + k * dl;
          scalar_t* __restrict__ dst = gctx_p + (g * M + k) * D + d0;
          for (int64_t d = 0; d < dl; ++d) dst[d] = static_cast<scalar_t>(a[d]);
        }
        if (gshift_p != nullptr) {
          std::fill(acc_shift.begin(), acc_shift.begin() + dl, opmath_t(0));
          for (int64_t k = 0; k < M; ++k) {
            const opmath_t* __restrict__ a = acc.data() + k * dl;
            for (int64_t d = 0; d < dl; ++d) acc_shift[d] += a[d];
          }
          scalar_t* __restrict__ dst = gshift_p + g * D + d0;
          for (int64_t d = 0; d < dl; ++d) dst[d] = static_cast<scalar_t>(acc_shift[d]);
        }
      }
    });
  });
  return {grad_ctx, grad_shift};
}

}  // namespace
}  // namespace assemble
}  // namespace fastprompt

TORCH_LIBRARY_FRAGMENT(fastprompt, m) {
  m.def(
      "assemble_compiled_fwd(Tensor ctx, Tensor? shift, Tensor fixed, Tensor slot, Tensor pos, int pos_offset, "
      "Tensor g_idx, Tensor c_idx) -> Tensor");
  // grad_shift is a [G, D] tensor when has_shift, else an empty [0] tensor.
  m.def(
      "assemble_compiled_bwd(Tensor grad_out, Tensor slot, Tensor g_idx, Tensor c_idx, SymInt G, SymInt M, "
      "bool has_shift) -> (Tensor grad_ctx, Tensor grad_shift)");
}

TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("assemble_compiled_fwd", &fastprompt::assemble::assemble_compiled_fwd_cpu);
  m.impl("assemble_compiled_bwd", &fastprompt::assemble::assemble_compiled_bwd_cpu);
}
