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
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorUtils.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <utility>
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

// Same, keeping t's strides (the tile loops read strided operands directly).
Operand operand_any(const at::Tensor& t, c10::ScalarType x_type) {
  if (t.scalar_type() == x_type || t.scalar_type() == acc_type(x_type)) {
    return {t, t.scalar_type() == x_type ? cpu::kSame : cpu::kAcc};
  }
  return {t.to(acc_type(x_type)), cpu::kAcc};
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

// ------------------------------------------------------------------ strided operands
// The ops take strides instead of copying a non-contiguous input whole (a transposed
// patch-embedding view (B, N, D) with strides (N*D, 1, N) would otherwise be copied every
// step). Every operand is seen as (B, N, D) with its own element strides; the work is
// cut into tiles of whole rows of one batch element, and an operand whose tile is not
// one contiguous block is gathered into (or, for an output, scattered from) a per-task
// scratch of at most ~kGrainElems elements, which stays in L1/L2. The kernels always see
// contiguous rows, so the values they compute, and their bits, do not depend on layout.
struct Strided {
  char* base = nullptr;
  int64_t sb = 0, sn = 0, sd = 0;  // element strides of (B, N, D)
  int64_t es = 0;                  // element size in bytes
};

// t viewed as (B, N, D) in the logical row-major order of t's own shape: a view whenever
// t's strides allow one (any contiguous tensor, a transposed 2-D or 3-D one), else a
// copy (reshape), the one case that still pays for a whole-tensor copy.
at::Tensor view3(const at::Tensor& t, int64_t B, int64_t N, int64_t D) {
  if (t.dim() == 3 && t.size(0) == B && t.size(1) == N && t.size(2) == D) return t;
  const std::vector<int64_t> shape{B, N, D};
  if (auto st = at::detail::computeStride(t.sizes(), t.strides(), shape)) return t.as_strided(shape, *st);
  return t.reshape(shape);
}

Strided strided(const at::Tensor& t3) {
  return {static_cast<char*>(const_cast<void*>(t3.const_data_ptr())), t3.stride(0), t3.stride(1), t3.stride(2),
          static_cast<int64_t>(t3.element_size())};
}

bool rows_contiguous(const Strided& s, int64_t rows, int64_t D) {
  return (s.sd == 1 || D == 1) && (rows == 1 || s.sn == D);
}

template <typename E>
void copy_rows(const Strided& s, int64_t b, int64_t n0, int64_t rows, int64_t D, E* buf, bool to_buf) {
  E* base = reinterpret_cast<E*>(s.base) + b * s.sb + n0 * s.sn;
  if (std::abs(s.sn) < std::abs(s.sd)) {
    // transposed-like: tokens are the fast axis in memory, so walk them innermost
    for (int64_t d = 0; d < D; ++d) {
      E* src = base + d * s.sd;
      for (int64_t r = 0; r < rows; ++r) {
        if (to_buf) {
          buf[r * D + d] = src[r * s.sn];
        } else {
          src[r * s.sn] = buf[r * D + d];
        }
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      E* src = base + r * s.sn;
      for (int64_t d = 0; d < D; ++d) {
        if (to_buf) {
          buf[r * D + d] = src[d * s.sd];
        } else {
          src[d * s.sd] = buf[r * D + d];
        }
      }
    }
  }
}

// Copy rows [n0, n0 + rows) of batch element b between the strided tensor and a
// contiguous (rows, D) buffer (raw element copies: no conversion, so no rounding).
void transfer_rows(const Strided& s, int64_t b, int64_t n0, int64_t rows, int64_t D, void* buf, bool to_buf) {
  switch (s.es) {
    case 2:
      return copy_rows(s, b, n0, rows, D, static_cast<uint16_t*>(buf), to_buf);
    case 4:
      return copy_rows(s, b, n0, rows, D, static_cast<uint32_t*>(buf), to_buf);
    default:
      return copy_rows(s, b, n0, rows, D, static_cast<uint64_t*>(buf), to_buf);
  }
}

// A tile of one operand as the kernels want it: a pointer to contiguous (rows, D) data,
// either into the tensor itself or into `scratch` (gathered first when `read`).
char* tile_ptr(const Strided& s, int64_t b, int64_t n0, int64_t rows, int64_t D, std::vector<char>& scratch,
               bool read) {
  if (rows_contiguous(s, rows, D)) return s.base + (b * s.sb + n0 * s.sn) * s.es;
  scratch.resize(static_cast<size_t>(rows * D * s.es));
  if (read) transfer_rows(s, b, n0, rows, D, scratch.data(), true);
  return scratch.data();
}

// Run fn(b, n0, rows) over (B, N, D) in tiles of whole rows of one batch element, about
// kGrainElems elements each, in parallel.
template <typename F>
void for_each_tile(int64_t B, int64_t N, int64_t D, const F& fn) {
  const int64_t rows_per_tile = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1));
  const int64_t tiles = ceil_div(N, rows_per_tile);
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / tiles, n0 = (k % tiles) * rows_per_tile;
      fn(b, n0, std::min(rows_per_tile, N - n0));
    }
  });
}

// The logical (B, N, D) of an element-wise op over a tensor of any shape.
std::array<int64_t, 3> dims3(const at::Tensor& x) {
  if (x.dim() == 3) return {x.size(0), x.size(1), x.size(2)};
  if (x.dim() == 0) return {1, 1, 1};
  const int64_t D = x.size(-1);
  return {1, D == 0 ? 0 : x.numel() / D, D};
}

// Do the byte ranges [first, last element] of a and b intersect? (conservative: strided
// views that interleave without touching the same element still count)
bool extents_intersect(const at::Tensor& a, const at::Tensor& b) {
  auto extent = [](const at::Tensor& t) {
    const char* p = static_cast<const char*>(t.const_data_ptr());
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < t.dim(); ++i) {
      const int64_t span = (t.size(i) - 1) * t.stride(i);
      (span < 0 ? lo : hi) += span;
    }
    return std::make_pair(p + lo * t.element_size(), p + (hi + 1) * t.element_size());
  };
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  return a0 < b1 && b0 < a1;
}

// out must be x's shape and dtype; it may BE x or r (an in-place update reads element i
// before writing it), but must not partially overlap them.
void check_out(const char* op, const at::Tensor& out, const at::Tensor& x,
               std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  check_cpu(op, "out", out);
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have x's shape ", shape_str(x.sizes()), ", got ",
              shape_str(out.sizes()), ".");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ", dtype_str(x.scalar_type()),
              ", got ", dtype_str(out.scalar_type()), ".");
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out has overlapping elements (an expanded or self-overlapping view: shape ", shape_str(out.sizes()),
              ", strides ", shape_str(out.strides()), "); pass a dense buffer.");
  for (const auto& [name, t] : inputs) {
    if (t->numel() == 0 || out.numel() == 0) continue;
    // out IS the input (same start, same strides): an in-place update, element i read
    // before it is written
    if (t->const_data_ptr() == out.const_data_ptr() && t->strides() == out.strides()) continue;
    // anything else must not share bytes (byte extents, so non-dense views count too)
    TORCH_CHECK(!extents_intersect(out, *t), op, ": out shares memory with ", name, " but is not ", name,
                " itself (a shifted or re-strided view of it); pass out=", name,
                " for an in-place update, or a separate buffer.");
  }
}

void run_add(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  const auto xt = x.scalar_type();
  const Operand rr = operand_any(r, xt);
  const auto fn = cpu::active_kernels().add[kernel_dtype(xt)][rr.v];
  if (x.is_contiguous() && rr.t.is_contiguous() && out.is_contiguous()) {
    const char* xp = static_cast<const char*>(x.const_data_ptr());
    const char* rp = static_cast<const char*>(rr.t.const_data_ptr());
    char* op = static_cast<char*>(out.data_ptr());
    const size_t xs = x.element_size(), rs = rr.t.element_size();
    at::parallel_for(0, x.numel(), kGrainElems, [&](int64_t begin, int64_t end) {
      fn(xp + begin * xs, rp + begin * rs, op + begin * xs, end - begin);
    });
    return;
  }
  const auto [B, N, D] = dims3(x);
  const Strided sx = strided(view3(x, B, N, D)), sr = strided(view3(rr.t, B, N, D));
  at::Tensor out3 = view3(out, B, N, D);
  // an out whose strides admit no (B, N, D) view (rare: a permuted >3-D buffer) is
  // written through a temporary
  const bool via_temp = !out3.is_alias_of(out);
  if (via_temp) out3 = at::empty({B, N, D}, out.options());
  const Strided so = strided(out3);
  for_each_tile(B, N, D, [&](int64_t b, int64_t n0, int64_t rows) {
    std::vector<char> bx, br, bo;
    const char* xp = tile_ptr(sx, b, n0, rows, D, bx, true);
    const char* rp = tile_ptr(sr, b, n0, rows, D, br, true);
    char* op = tile_ptr(so, b, n0, rows, D, bo, false);
    fn(xp, rp, op, rows * D);
    if (!bo.empty()) transfer_rows(so, b, n0, rows, D, bo.data(), false);
  });
  if (via_temp) out.copy_(out3.view(out.sizes()));
}

template <typename A>
void run_modulated(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                   const InPlace& prev, bool write_prev, at::Tensor& sums) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / D);
  const int64_t chunks = ceil_div(N, rows_per_chunk);
  const auto fn = cpu::active_kernels().modulated_rows[kernel_dtype(x.scalar_type())][prev.v];
  const Strided sx = strided(x);  // any strides: rows are gathered when not contiguous
  const size_t p_size = prev.work.element_size();
  char* pp = static_cast<char*>(prev.work.data_ptr());
  const A* sh = shift.const_data_ptr<A>();
  const A* sc = scale.const_data_ptr<A>();
  std::vector<A> partial(B * chunks * 2);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (rows_per_chunk * D));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks, row0 = (c % chunks) * rows_per_chunk;
      const int64_t rows = std::min(rows_per_chunk, N - row0);
      const int64_t off = (b * N + row0) * D;
      const char* xp = tile_ptr(sx, b, row0, rows, D, scratch, true);
      fn(xp, sh + b * D, sc + b * D, pp + off * p_size, rows, D, eps, write_prev, &partial[c * 2]);
    }
  });
  sum_partials(partial, B, chunks, sums);
}

// Gather elements [e0, e0 + n) of batch element b of a strided (B, N, D) tensor, in
// row-major order, into a contiguous buffer.
template <typename E>
void gather_flat_t(const Strided& s, int64_t b, int64_t e0, int64_t n, int64_t D, E* buf) {
  const E* base = reinterpret_cast<const E*>(s.base) + b * s.sb;
  for (int64_t e = e0; e < e0 + n;) {
    const int64_t row = e / D, d0 = e % D, len = std::min(D - d0, e0 + n - e);
    const E* src = base + row * s.sn + d0 * s.sd;
    for (int64_t i = 0; i < len; ++i) buf[e - e0 + i] = src[i * s.sd];
    e += len;
  }
}

void gather_flat(const Strided& s, int64_t b, int64_t e0, int64_t n, int64_t D, void* buf) {
  switch (s.es) {
    case 2:
      return gather_flat_t(s, b, e0, n, D, static_cast<uint16_t*>(buf));
    case 4:
      return gather_flat_t(s, b, e0, n, D, static_cast<uint32_t*>(buf));
    default:
      return gather_flat_t(s, b, e0, n, D, static_cast<uint64_t*>(buf));
  }
}

template <typename A>
void run_rel_l1(const at::Tensor& x, const InPlace& prev, bool write_prev, at::Tensor& sums) {
  const int64_t B = x.size(0), M = x.numel() / B;
  const int64_t chunks = std::max<int64_t>(1, ceil_div(M, kChunkElems));
  const auto fn = cpu::active_kernels().rel_l1_chunk[kernel_dtype(x.scalar_type())][prev.v];
  const size_t x_size = x.element_size(), p_size = prev.work.element_size();
  const bool contiguous = x.is_contiguous();
  // Non-contiguous x: seen as (B, N', D') (D' = its last dim) and gathered per chunk in
  // x's logical order, so the sums are the bits of the contiguous case.
  const int64_t Dl = x.dim() >= 2 ? x.size(-1) : 1;
  const Strided sx = contiguous ? Strided{} : strided(view3(x, B, Dl == 0 ? 0 : M / Dl, Dl));
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* pp = static_cast<char*>(prev.work.data_ptr());
  std::vector<A> partial(B * chunks * 2);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / kChunkElems);
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks, e0 = (c % chunks) * kChunkElems;
      const int64_t n = std::min(kChunkElems, M - e0);
      const int64_t off = b * M + e0;
      const char* src = xp + off * x_size;
      if (!contiguous) {
        scratch.resize(static_cast<size_t>(std::max<int64_t>(n, 1)) * x_size);
        gather_flat(sx, b, e0, n, Dl, scratch.data());
        src = scratch.data();
      }
      fn(src, pp + off * p_size, n, write_prev, &partial[c * 2]);
    }
  });
  sum_partials(partial, B, chunks, sums);
}

}  // namespace

bool read_hold(const char* op, const std::optional<at::Tensor>& hold) {
  if (!hold.has_value() || !hold->defined()) return false;
  const at::Tensor& h = *hold;
  check_cpu(op, "hold", h);
  TORCH_CHECK(h.scalar_type() == c10::kBool && h.numel() == 1, op,
              ": hold must be a 0-dim bool tensor (the repeat flag from timestep_guard), got ",
              dtype_str(h.scalar_type()), " ", shape_str(h.sizes()), ".");
  // a CPU tensor: a plain load, not a device sync
  return *h.const_data_ptr<bool>();
}

at::Tensor modulated_rel_l1_sums(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                                 const at::Tensor& prev, const std::optional<at::Tensor>& hold) {
  constexpr const char* kOp = "fastcache::modulated_rel_l1_sums";
  const bool held = read_hold(kOp, hold);
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
  const at::Tensor shift_a = shift.to(acc).contiguous();
  const at::Tensor scale_a = scale.to(acc).contiguous();
  const InPlace p = in_place(prev, x.scalar_type());
  if (acc == c10::kDouble) {
    run_modulated<double>(x, shift_a, scale_a, eps, p, !held, sums);
  } else {
    run_modulated<float>(x, shift_a, scale_a, eps, p, !held, sums);
  }
  if (!held) p.finish();
  return sums;
}

at::Tensor rel_l1_sums(const at::Tensor& x, const at::Tensor& prev, bool write_prev,
                       const std::optional<at::Tensor>& hold) {
  constexpr const char* kOp = "fastcache::rel_l1_sums";
  write_prev = write_prev && !read_hold(kOp, hold);
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
  const InPlace p = in_place(prev, x.scalar_type());
  if (acc == c10::kDouble) {
    run_rel_l1<double>(x, p, write_prev, sums);
  } else {
    run_rel_l1<float>(x, p, write_prev, sums);
  }
  if (write_prev) p.finish();
  return sums;
}

namespace {

// The body of gated_residual and gated_residual_out: checks, then out = x + gate * (...).
void gated_into(const char* kOp, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                const std::optional<at::Tensor>& trend, double w, const at::Tensor& out) {
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
  if (x.numel() == 0) return;
  const auto xt = x.scalar_type();
  const auto acc = acc_type(xt);
  const at::Tensor gate_a = gate.to(acc).contiguous();  // (B, D): small
  const Operand c = operand_any(cached, xt);
  const Operand t = use_trend ? operand(*trend, xt) : Operand{at::Tensor(), cpu::kSame};  // (N, D) or (D,)
  const auto fn = cpu::active_kernels().gated_rows[kernel_dtype(xt)][c.v][t.v];
  const char* gp = static_cast<const char*>(gate_a.const_data_ptr());
  const char* tp = use_trend ? static_cast<const char*>(t.t.const_data_ptr()) : nullptr;
  const size_t gs = gate_a.element_size(), ts = use_trend ? t.t.element_size() : 0;
  const Strided sx = strided(x), sc = strided(c.t), so = strided(out);
  const bool flat = x.is_contiguous() && c.t.is_contiguous() && out.is_contiguous();
  for_each_tile(B, N, D, [&](int64_t b, int64_t n0, int64_t rows) {
    std::vector<char> bx, bc, bo;
    const char* xp = flat ? sx.base + (b * N + n0) * D * sx.es : tile_ptr(sx, b, n0, rows, D, bx, true);
    const char* cp = flat ? sc.base + (b * N + n0) * D * sc.es : tile_ptr(sc, b, n0, rows, D, bc, true);
    char* op = flat ? so.base + (b * N + n0) * D * so.es : tile_ptr(so, b, n0, rows, D, bo, false);
    const char* trow = tp ? tp + n0 * trend_stride * ts : nullptr;
    fn(xp, gp + b * D * gs, cp, trow, trend_stride, w, op, rows, D);
    if (!bo.empty()) transfer_rows(so, b, n0, rows, D, bo.data(), false);
  });
}

// torch.empty_like(x) (the fake implementation's output); a contiguous x's output is
// made by the CPU allocator directly: the dispatcher round trip of empty_like costs a
// measurable part of a small cached step when the caches are cold.
at::Tensor output_like(const at::Tensor& x) {
  if (x.is_contiguous() && !x.is_quantized() && x.layout() == c10::kStrided) {
    return at::detail::empty_cpu(x.sizes(), x.scalar_type(), /*pin_memory=*/false);
  }
  return at::empty_like(x);
}

void check_apply_args(const char* kOp, const at::Tensor& x, const at::Tensor& r) {
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  CHECK_CPU(r);
  CHECK_FLOATING(r);
  TORCH_CHECK(r.sizes() == x.sizes(), kOp, ": r (the cached residual) must have x's shape ", shape_str(x.sizes()),
              ", got ", shape_str(r.sizes()), ". A shape change needs a fresh cache (recompute the step).");
}

}  // namespace

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                          const std::optional<at::Tensor>& trend, double w) {
  // empty_like(x), like the fake implementation: x's layout when x is dense.
  at::Tensor out = x.dim() == 3 ? output_like(x) : at::Tensor();
  gated_into("fastcache::gated_residual", x, gate, cached, trend, w, out);
  return out;
}

void gated_residual_out(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                        const std::optional<at::Tensor>& trend, double w, const at::Tensor& out) {
  constexpr const char* kOp = "fastcache::gated_residual_out";
  CHECK_CPU(x);
  check_out(kOp, out, x, {{"x", &x}, {"cached", &cached}});
  gated_into(kOp, x, gate, cached, trend, w, out);
}

at::Tensor apply_residual(const at::Tensor& x, const at::Tensor& r) {
  check_apply_args("fastcache::apply_residual", x, r);
  at::Tensor out = output_like(x);
  if (x.numel() != 0) run_add(x, r, out);
  return out;
}

void apply_residual_out(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  constexpr const char* kOp = "fastcache::apply_residual_out";
  check_apply_args(kOp, x, r);
  check_out(kOp, out, x, {{"x", &x}, {"r", &r}});
  if (x.numel() != 0) run_add(x, r, out);
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
  const Operand xi = operand_any(x_in, ot);
  const InPlace rr = in_place(r, ot);
  const auto fn = cpu::active_kernels().sub[kernel_dtype(ot)][xi.v][rr.v];
  if (out.is_contiguous() && xi.t.is_contiguous()) {
    const char* op = static_cast<const char*>(out.const_data_ptr());
    const char* xp = static_cast<const char*>(xi.t.const_data_ptr());
    char* rp = static_cast<char*>(rr.work.data_ptr());
    const size_t os = out.element_size(), xs = xi.t.element_size(), rs = rr.work.element_size();
    at::parallel_for(0, out.numel(), kGrainElems, [&](int64_t begin, int64_t end) {
      fn(op + begin * os, xp + begin * xs, rp + begin * rs, end - begin);
    });
  } else {
    // the block stack's output / input may be strided views: tiles, r written contiguously
    const auto [B, N, D] = dims3(out);
    const Strided so = strided(view3(out, B, N, D)), sx = strided(view3(xi.t, B, N, D));
    char* rp = static_cast<char*>(rr.work.data_ptr());
    const size_t rs = rr.work.element_size();
    for_each_tile(B, N, D, [&](int64_t b, int64_t n0, int64_t rows) {
      std::vector<char> bo, bx;
      const char* op = tile_ptr(so, b, n0, rows, D, bo, true);
      const char* xp = tile_ptr(sx, b, n0, rows, D, bx, true);
      fn(op, xp, rp + ((b * N + n0) * D) * rs, rows * D);
    });
  }
  rr.finish();
}

}  // namespace fastcache
