// Tensor-level CPU implementations of the streaming ops: argument checks, dtype routing,
// the fixed chunking of reductions and the thread-parallel loops. The arithmetic lives in
// the per-ISA kernels (kernels_impl.h), reached through cpu::active_kernels().
//
// Reductions (modulated_rel_l1_sums, rel_l1_sums) are deterministic: partial sums over a
// FIXED chunking (a function of the shape only, never of the thread count), then a
// fixed-order sum of the partials per batch element.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_dispatch.h"
#include "ops.h"

namespace fastcache {
namespace {

// Elements per reduction chunk (a row of modulated_rel_l1_sums is never split; chunks
// hold max(1, kChunkElems / D) rows). Part of the numerical contract: changing it
// changes the last bits of the sums.
constexpr int64_t kChunkElems = 16384;
// Below this many elements per task, at::parallel_for stays on the calling thread.
constexpr int64_t kGrainElems = 32768;

cpu::DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kBFloat16:
      return cpu::kBF16;
    case c10::kHalf:
      return cpu::kF16;
    case c10::kDouble:
      return cpu::kF64;
    default:
      return cpu::kF32;
  }
}

c10::ScalarType acc_type(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A read-only secondary input as the kernels want it: contiguous and either of x's
// dtype (kSame) or of the accumulation dtype (kAcc). Anything else is converted to the
// accumulation dtype first, which is what the reference does too (`t.to(acc)`).
struct Operand {
  at::Tensor t;
  cpu::Variant v;
};

Operand operand(const at::Tensor& t, c10::ScalarType x_type) {
  if (t.scalar_type() == x_type) return {t.contiguous(), cpu::kSame};
  const auto acc = acc_type(x_type);
  return {t.to(acc).contiguous(), cpu::kAcc};
}

// A buffer written in place: the kernels write `work`; when that is a converted or
// contiguous copy, finish() writes it back (the cast rounds like the reference's
// `buf.copy_(m.to(buf.dtype))`).
struct InPlace {
  at::Tensor target, work;
  cpu::Variant v;
  bool copy_back;
  void finish() const {
    if (copy_back) target.copy_(work);
  }
};

InPlace in_place(const at::Tensor& t, c10::ScalarType x_type) {
  const auto acc = acc_type(x_type);
  if (t.scalar_type() == x_type || t.scalar_type() == acc) {
    const cpu::Variant v = t.scalar_type() == x_type ? cpu::kSame : cpu::kAcc;
    if (t.is_contiguous()) return {t, t, v, false};
    return {t, t.contiguous(), v, true};
  }
  return {t, t.to(acc).contiguous(), cpu::kAcc, true};
}

// Fixed-order final sum over each batch element's chunk partials.
template <typename A>
void sum_partials(const std::vector<A>& partial, int64_t B, int64_t chunks, at::Tensor& sums) {
  A* out = sums.data_ptr<A>();
  for (int64_t b = 0; b < B; ++b) {
    A num = 0, den = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      num = num + partial[(b * chunks + k) * 2];
      den = den + partial[(b * chunks + k) * 2 + 1];
    }
    out[b * 2] = num;
    out[b * 2 + 1] = den;
  }
}

template <typename A>
void run_modulated(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                   const InPlace& prev, at::Tensor& sums) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / D);
  const int64_t chunks = ceil_div(N, rows_per_chunk);
  const auto fn = cpu::active_kernels().modulated_rows[kernel_dtype(x.scalar_type())][prev.v];
  const size_t x_size = x.element_size(), p_size = prev.work.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* pp = static_cast<char*>(prev.work.data_ptr());
  const A* sh = shift.const_data_ptr<A>();
  const A* sc = scale.const_data_ptr<A>();
  std::vector<A> partial(B * chunks * 2);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (rows_per_chunk * D));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks, row0 = (c % chunks) * rows_per_chunk;
      const int64_t rows = std::min(rows_per_chunk, N - row0);
      const int64_t off = (b * N + row0) * D;
      fn(xp + off * x_size, sh + b * D, sc + b * D, pp + off * p_size, rows, D, eps, &partial[c * 2]);
    }
  });
  sum_partials(partial, B, chunks, sums);
}

template <typename A>
void run_rel_l1(const at::Tensor& x, const InPlace& prev, bool write_prev, at::Tensor& sums) {
  const int64_t B = x.size(0), M = x.numel() / B;
  const int64_t chunks = std::max<int64_t>(1, ceil_div(M, kChunkElems));
  const auto fn = cpu::active_kernels().rel_l1_chunk[kernel_dtype(x.scalar_type())][prev.v];
  const size_t x_size = x.element_size(), p_size = prev.work.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* pp = static_cast<char*>(prev.work.data_ptr());
  std::vector<A> partial(B * chunks * 2);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / kChunkElems);
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks, e0 = (c % chunks) * kChunkElems;
      const int64_t n = std::min(kChunkElems, M - e0);
      const int64_t off = b * M + e0;
      fn(xp + off * x_size, pp + off * p_size, n, write_prev, &partial[c * 2]);
    }
  });
  sum_partials(partial, B, chunks, sums);
}

// An output of x's shape and dtype laid out like the fake implementation's
// torch.empty_like(x); kernels write a contiguous tensor, copied over if they differ.
struct Output {
  at::Tensor result, work;
  explicit Output(const at::Tensor& x) : result(at::empty_like(x)) {
    work = result.is_contiguous() ? result : at::empty(x.sizes(), x.options());
  }
  at::Tensor finish() {
    if (!work.is_same(result)) result.copy_(work);
    return result;
  }
};

}  // namespace

at::Tensor modulated_rel_l1_sums(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                                 const at::Tensor& prev) {
  constexpr const char* kOp = "fastcache::modulated_rel_l1_sums";
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  CHECK_DIM(x, 3, "B, N, D");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  CHECK_CPU(shift);
  CHECK_CPU(scale);
  CHECK_CPU(prev);
  CHECK_FLOATING(shift);
  CHECK_FLOATING(scale);
  CHECK_FLOATING(prev);
  CHECK_SHAPE(shift, B, D);
  CHECK_SHAPE(scale, B, D);
  CHECK_SHAPE(prev, B, N, D);

  const auto acc = acc_type(x.scalar_type());
  at::Tensor sums = at::zeros({B, 2}, x.options().dtype(acc));
  if (x.numel() == 0) return sums;
  const at::Tensor xc = x.contiguous();
  const at::Tensor shift_a = shift.to(acc).contiguous();
  const at::Tensor scale_a = scale.to(acc).contiguous();
  const InPlace p = in_place(prev, x.scalar_type());
  if (acc == c10::kDouble) {
    run_modulated<double>(xc, shift_a, scale_a, eps, p, sums);
  } else {
    run_modulated<float>(xc, shift_a, scale_a, eps, p, sums);
  }
  p.finish();
  return sums;
}

at::Tensor rel_l1_sums(const at::Tensor& x, const at::Tensor& prev, bool write_prev) {
  constexpr const char* kOp = "fastcache::rel_l1_sums";
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() >= 1, kOp,
              ": x must have a leading batch dimension (B, ...), got a 0-dim tensor; use x.reshape(1).");
  CHECK_CPU(prev);
  CHECK_FLOATING(prev);
  TORCH_CHECK(prev.sizes() == x.sizes(), kOp, ": prev must have x's shape ", shape_str(x.sizes()), ", got ",
              shape_str(prev.sizes()), ". Allocate it with torch.zeros_like(x).");
  const int64_t B = x.size(0);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor sums = at::zeros({B, 2}, x.options().dtype(acc));
  if (x.numel() == 0) return sums;
  const at::Tensor xc = x.contiguous();
  const InPlace p = in_place(prev, x.scalar_type());
  if (acc == c10::kDouble) {
    run_rel_l1<double>(xc, p, write_prev, sums);
  } else {
    run_rel_l1<float>(xc, p, write_prev, sums);
  }
  if (write_prev) p.finish();
  return sums;
}

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                          const std::optional<at::Tensor>& trend, double w) {
  constexpr const char* kOp = "fastcache::gated_residual";
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  CHECK_DIM(x, 3, "B, N, D");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  CHECK_CPU(gate);
  CHECK_FLOATING(gate);
  CHECK_SHAPE(gate, B, D);
  CHECK_CPU(cached);
  CHECK_FLOATING(cached);
  CHECK_SHAPE(cached, B, N, D);
  // The reference drops the trend term when w == 0 (FORA), so a NaN trend is ignored too.
  const bool use_trend = trend.has_value() && trend->defined() && w != 0.0;
  int64_t trend_stride = 0;
  if (trend.has_value() && trend->defined()) {
    const at::Tensor& t = *trend;
    check_cpu(kOp, "trend", t);
    check_floating(kOp, "trend", t);
    const auto s = t.sizes();
    const bool ok = (s.size() == 1 && s[0] == D) || (s.size() == 2 && s[0] == N && s[1] == D) ||
                    (s.size() == 3 && s[0] == 1 && s[1] == N && s[2] == D);
    TORCH_CHECK(ok, kOp, ": trend must have shape (D,) = (", D, ",), (N, D) = (", N, ", ", D, ") or (1, N, D), got ",
                shape_str(s), ". It is EOC's per-position trend T (one row per token) or one row for all tokens.");
    trend_stride = s.size() == 1 ? 0 : D;
  }
  Output out(x);
  if (x.numel() == 0) return out.finish();
  const auto xt = x.scalar_type();
  const auto acc = acc_type(xt);
  const at::Tensor xc = x.contiguous();
  const at::Tensor gate_a = gate.to(acc).contiguous();
  const Operand c = operand(cached, xt);
  const Operand t = use_trend ? operand(*trend, xt) : Operand{at::Tensor(), cpu::kSame};
  const auto fn = cpu::active_kernels().gated_rows[kernel_dtype(xt)][c.v][t.v];
  const void* xp = xc.const_data_ptr();
  const void* gp = gate_a.const_data_ptr();
  const void* cp = c.t.const_data_ptr();
  const void* tp = use_trend ? t.t.const_data_ptr() : nullptr;
  void* op = out.work.data_ptr();
  at::parallel_for(0, B * N, std::max<int64_t>(1, kGrainElems / D),
                   [&](int64_t begin, int64_t end) { fn(xp, gp, cp, tp, trend_stride, w, op, begin, end, N, D); });
  return out.finish();
}

at::Tensor apply_residual(const at::Tensor& x, const at::Tensor& r) {
  constexpr const char* kOp = "fastcache::apply_residual";
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  CHECK_CPU(r);
  CHECK_FLOATING(r);
  TORCH_CHECK(r.sizes() == x.sizes(), kOp, ": r (the cached residual) must have x's shape ", shape_str(x.sizes()),
              ", got ", shape_str(r.sizes()), ". A shape change needs a fresh cache (recompute the step).");
  Output out(x);
  if (x.numel() == 0) return out.finish();
  const auto xt = x.scalar_type();
  const at::Tensor xc = x.contiguous();
  const Operand rr = operand(r, xt);
  const auto fn = cpu::active_kernels().add[kernel_dtype(xt)][rr.v];
  const char* xp = static_cast<const char*>(xc.const_data_ptr());
  const char* rp = static_cast<const char*>(rr.t.const_data_ptr());
  char* op = static_cast<char*>(out.work.data_ptr());
  const size_t xs = xc.element_size(), rs = rr.t.element_size();
  at::parallel_for(0, x.numel(), kGrainElems, [&](int64_t begin, int64_t end) {
    fn(xp + begin * xs, rp + begin * rs, op + begin * xs, end - begin);
  });
  return out.finish();
}

void store_residual(const at::Tensor& out, const at::Tensor& x_in, const at::Tensor& flag, const at::Tensor& r) {
  constexpr const char* kOp = "fastcache::store_residual";
  CHECK_CPU(out);
  CHECK_FLOATING(out);
  CHECK_CPU(x_in);
  CHECK_FLOATING(x_in);
  CHECK_CPU(r);
  CHECK_FLOATING(r);
  CHECK_CPU(flag);
  TORCH_CHECK(x_in.sizes() == out.sizes() && r.sizes() == out.sizes(), kOp,
              ": out, x_in and r must have one shape, got out ", shape_str(out.sizes()), ", x_in ",
              shape_str(x_in.sizes()), ", r ", shape_str(r.sizes()), ".");
  TORCH_CHECK(flag.numel() == 1, kOp, ": flag must hold one value (the 0-dim bool from cache_decision), got shape ",
              shape_str(flag.sizes()), ".");
  TORCH_CHECK(!flag.is_complex(), kOp, ": flag must be a bool (or real) tensor, got ", dtype_str(flag.scalar_type()),
              ".");
  // Reading the flag is a host read, but on CPU that is a plain load, not a sync.
  const bool compute = flag.scalar_type() == c10::kBool ? *flag.const_data_ptr<bool>() : flag.ne(0).item<bool>();
  if (!compute || out.numel() == 0) return;
  const auto ot = out.scalar_type();
  const at::Tensor oc = out.contiguous();
  const Operand xi = operand(x_in, ot);
  const InPlace rr = in_place(r, ot);
  const auto fn = cpu::active_kernels().sub[kernel_dtype(ot)][xi.v][rr.v];
  const char* op = static_cast<const char*>(oc.const_data_ptr());
  const char* xp = static_cast<const char*>(xi.t.const_data_ptr());
  char* rp = static_cast<char*>(rr.work.data_ptr());
  const size_t os = oc.element_size(), xs = xi.t.element_size(), rs = rr.work.element_size();
  at::parallel_for(0, out.numel(), kGrainElems, [&](int64_t begin, int64_t end) {
    fn(op + begin * os, xp + begin * xs, rp + begin * rs, end - begin);
  });
  rr.finish();
}

}  // namespace fastcache
