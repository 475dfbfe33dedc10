// The CPU kernels proper, written once with at::vec::Vectorized and compiled once per
// CPU variant. Include this ONLY from kernels_<variant>.cpp, after defining
// CPU_CAPABILITY (DEFAULT / AVX2 / AVX512), the matching CPU_CAPABILITY_<X> macro and the
// compiler target (see kernels_avx2.cpp): everything here then lands in the namespaces
// fastcache::cpu::<variant> and at::vec::<variant>, so the variants never share a
// symbol, and in an anonymous namespace, so nothing but kernel_table() is exported.
//
// Numerics (the contract every variant meets bit for bit):
//  * accumulation in fp32 (fp64 for fp64 inputs); the element-wise formula is evaluated
//    in exactly the eager reference's operation order, with no FMA (the extension is
//    built with -ffp-contract=off), so element-wise outputs equal the reference's;
//  * reductions use kLanes = 32 lanes: element i of a row feeds lane i % 32 in index
//    order (vector body and scalar tail alike), and the lanes are summed by a fixed
//    tree. Vector width never changes the order, so every variant gives the same bits,
//    and the callers' fixed chunking makes the result independent of the thread count.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "kernel_table.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h (see kernels_default.cpp)"
#endif

namespace fastcache::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

// The baseline build's at::vec is the generic (array-of-scalars) Vectorized, and its
// bf16/fp16 conversions run element by element through it. Plain loops, which GCC
// vectorises with SSE2 itself (fp32; the bf16 casts stay scalar), measured 2.1x (fp32
// gated residual) and 2.9x (bf16) faster on a DiT-XL/2 tensor. So the baseline variant's
// element-wise kernels are plain loops (same formula, same operation order: the same
// bits); kernels_default.cpp sets the macro.
#ifdef FASTCACHE_SCALAR_ELEMENTWISE
constexpr bool kScalarElementwise = true;
#else
constexpr bool kScalarElementwise = false;
#endif

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, BFloat16> || std::is_same_v<T, Half>;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Geometry for accumulation type A. Data moves in "units" of kUnit vectors (2 fp32
// vectors = one Vectorized<bf16/fp16>, so conversions stay whole; 1 fp64 vector); the
// vector body walks whole blocks of kElems elements, kVecs vectors, whose vector j feeds
// reduction accumulator j % kAccVecs (kLanes lanes in all).
template <typename A>
struct Geom {
  using Vec = Vectorized<A>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t kUnit = std::is_same_v<A, float> ? 2 : 1;
  static constexpr int64_t U = kUnit * V;
  static constexpr int64_t kAccVecs = kLanes / V;
  static constexpr int64_t kElems = std::max<int64_t>(kLanes, U);
  static constexpr int64_t kVecs = kElems / V;
  static constexpr int64_t kUnits = kVecs / kUnit;
  static_assert(kLanes % V == 0, "the vector width must divide the reduction lanes");
  static_assert(kElems % kLanes == 0 && kVecs % kUnit == 0, "a block must hold whole lane groups and units");
};

// Load / store one unit (kUnit vectors of A) from / to T, converting bf16/fp16 <-> fp32.
template <typename A, typename T>
inline void load_unit(const T* p, Vectorized<A>* v) {
  using G = Geom<A>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t k = 0; k < G::kUnit; ++k) v[k] = Vectorized<A>::loadu(p + k * G::V);
  } else {
    static_assert(std::is_same_v<A, float> && is_reduced_v<T>, "only bf16/fp16 -> fp32 loads convert");
    static_assert(Vectorized<T>::size() == G::U, "a reduced vector must hold exactly one unit");
    auto halves = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    v[0] = std::get<0>(halves);
    v[1] = std::get<1>(halves);
  }
}

template <typename A, typename T>
inline void store_unit(T* p, const Vectorized<A>* v) {
  using G = Geom<A>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t k = 0; k < G::kUnit; ++k) v[k].store(p + k * G::V);
  } else {
    static_assert(std::is_same_v<A, float> && is_reduced_v<T>, "only fp32 -> bf16/fp16 stores convert");
    at::vec::convert_from_float<T>(v[0], v[1]).store(p);
  }
}

// kLanes accumulators: element i (from the start of the row / chunk) goes to lane
// i % kLanes, in index order; vector j of a block holds lanes (j % kAccVecs) * V + [0, V).
template <typename A>
struct Lanes {
  using G = Geom<A>;
  Vectorized<A> acc[G::kAccVecs];
  Lanes() {
    for (auto& a : acc) a = Vectorized<A>(A(0));
  }
  // u-th unit of a block
  inline void add_unit(int64_t u, const Vectorized<A>* v) {
    for (int64_t k = 0; k < G::kUnit; ++k) {
      auto& a = acc[(u * G::kUnit + k) % G::kAccVecs];
      a = a + v[k];
    }
  }
  // To scalars, for the tail (elements past the last whole block) and the final tree.
  inline void spill(A* lanes) const {
    for (int64_t k = 0; k < G::kAccVecs; ++k) acc[k].store(lanes + k * G::V);
  }
};

// Fixed pairwise tree over the lanes (the same in every variant).
template <typename A>
inline A reduce_lanes(A* lanes) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lanes[i] = lanes[i] + lanes[i + w];
  }
  return lanes[0];
}

// ------------------------------------------------------------------ modulated_rel_l1_sums
template <typename T, typename P>
void modulated_rows(const void* x_, const void* shift_, const void* scale_, void* prev_, int64_t rows, int64_t D,
                    double eps, bool write_prev, void* sums_) {
  using A = acc_t<T>;
  using G = Geom<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  const A* shift = static_cast<const A*>(shift_);
  const A* scale = static_cast<const A*>(scale_);
  P* prev = static_cast<P*>(prev_);
  A* sums = static_cast<A*>(sums_);
  const int64_t Dv = D - D % G::kElems;
  const A eps_a = static_cast<A>(eps);  // the reference adds eps to an fp32 (fp64) tensor
  const A d_a = static_cast<A>(D);
  const Vec one(A(1));
  A num = 0, den = 0;
  alignas(64) A lanes[kLanes];
  alignas(64) A lanes_den[kLanes];
  // bf16/fp16 rows are converted once, in the first pass, into an fp32 scratch row that
  // the other two passes read back from L1 (converting three times costs more).
  constexpr bool kConvert = !std::is_same_v<T, A>;
  std::unique_ptr<A[]> scratch(kConvert ? new A[std::max<int64_t>(Dv, 1)] : nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    P* pr = prev + r * D;
    const A* xs = nullptr;  // x's row in the accumulation dtype, for passes 2 and 3
    if constexpr (kConvert) {
      xs = scratch.get();
    } else {
      xs = xr;
    }
    Vec v[G::kUnit], p[G::kUnit], sc[G::kUnit], sh[G::kUnit];
    // LayerNorm statistics, two passes as in the reference (the row is in L1 by now).
    Lanes<A> s1;
    for (int64_t i = 0; i < Dv; i += G::kElems) {
      for (int64_t u = 0; u < G::kUnits; ++u) {
        load_unit<A>(xr + i + u * G::U, v);
        if constexpr (kConvert) store_unit<A>(scratch.get() + i + u * G::U, v);
        s1.add_unit(u, v);
      }
    }
    s1.spill(lanes);
    for (int64_t i = Dv; i < D; ++i) lanes[i % kLanes] = lanes[i % kLanes] + static_cast<A>(xr[i]);
    const A mean = reduce_lanes(lanes) / d_a;
    const Vec vmean(mean);
    Lanes<A> s2;
    for (int64_t i = 0; i < Dv; i += G::kElems) {
      for (int64_t u = 0; u < G::kUnits; ++u) {
        load_unit<A>(xs + i + u * G::U, v);
        for (auto& e : v) {
          const Vec c = e - vmean;
          e = c * c;
        }
        s2.add_unit(u, v);
      }
    }
    s2.spill(lanes);
    for (int64_t i = Dv; i < D; ++i) {
      const A c = static_cast<A>(xr[i]) - mean;
      lanes[i % kLanes] = lanes[i % kLanes] + c * c;
    }
    const A var = reduce_lanes(lanes) / d_a;
    const A rstd = A(1) / std::sqrt(var + eps_a);
    const Vec vrstd(rstd);
    // m = LN(x) * (1 + scale) + shift; sums of |m - prev| and |prev|; prev <- m.
    Lanes<A> sn, sd;
    for (int64_t i = 0; i < Dv; i += G::kElems) {
      for (int64_t u = 0; u < G::kUnits; ++u) {
        const int64_t o = i + u * G::U;
        load_unit<A>(xs + o, v);
        load_unit<A>(pr + o, p);
        load_unit<A>(scale + o, sc);
        load_unit<A>(shift + o, sh);
        for (int64_t k = 0; k < G::kUnit; ++k) {
          const Vec m = ((v[k] - vmean) * vrstd) * (one + sc[k]) + sh[k];
          v[k] = m;
          sc[k] = (m - p[k]).abs();
          sh[k] = p[k].abs();
        }
        sn.add_unit(u, sc);
        sd.add_unit(u, sh);
        if (write_prev) store_unit<A>(pr + o, v);
      }
    }
    sn.spill(lanes);
    sd.spill(lanes_den);
    for (int64_t i = Dv; i < D; ++i) {
      const A m = ((static_cast<A>(xr[i]) - mean) * rstd) * (A(1) + scale[i]) + shift[i];
      const A pv = static_cast<A>(pr[i]);
      lanes[i % kLanes] = lanes[i % kLanes] + std::abs(m - pv);
      lanes_den[i % kLanes] = lanes_den[i % kLanes] + std::abs(pv);
      if (write_prev) pr[i] = static_cast<P>(m);
    }
    num = num + reduce_lanes(lanes);
    den = den + reduce_lanes(lanes_den);
  }
  sums[0] = num;
  sums[1] = den;
}

// ------------------------------------------------------------------------- rel_l1_sums
template <typename T, typename P>
void rel_l1_chunk(const void* x_, void* prev_, int64_t n, bool write_prev, void* sums_) {
  using A = acc_t<T>;
  using G = Geom<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  P* prev = static_cast<P*>(prev_);
  A* sums = static_cast<A*>(sums_);
  const int64_t nv = n - n % G::kElems;
  Lanes<A> sn, sd;
  Vec v[G::kUnit], p[G::kUnit], dn[G::kUnit], dd[G::kUnit];
  for (int64_t i = 0; i < nv; i += G::kElems) {
    for (int64_t u = 0; u < G::kUnits; ++u) {
      const int64_t o = i + u * G::U;
      load_unit<A>(x + o, v);
      load_unit<A>(prev + o, p);
      for (int64_t k = 0; k < G::kUnit; ++k) {
        dn[k] = (v[k] - p[k]).abs();
        dd[k] = p[k].abs();
      }
      sn.add_unit(u, dn);
      sd.add_unit(u, dd);
      if (write_prev) store_unit<A>(prev + o, v);
    }
  }
  alignas(64) A lanes[kLanes];
  alignas(64) A lanes_den[kLanes];
  sn.spill(lanes);
  sd.spill(lanes_den);
  for (int64_t i = nv; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A pv = static_cast<A>(prev[i]);
    lanes[i % kLanes] = lanes[i % kLanes] + std::abs(xv - pv);
    lanes_den[i % kLanes] = lanes_den[i % kLanes] + std::abs(pv);
    if (write_prev) prev[i] = static_cast<P>(xv);
  }
  sums[0] = reduce_lanes(lanes);
  sums[1] = reduce_lanes(lanes_den);
}

// ---------------------------------------------------------------------- gated_residual
// Element-wise ops walk units; no lanes are involved, so any split of the work gives the
// same bits.
template <typename T, typename C, typename R>
void gated_rows(const void* x_, const void* gate_, const void* cached_, const void* trend_, int64_t trend_row_stride,
                double w, void* out_, int64_t rows, int64_t D) {
  using A = acc_t<T>;
  using G = Geom<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  const A* gr = static_cast<const A*>(gate_);
  const C* cached = static_cast<const C*>(cached_);
  const R* trend = static_cast<const R*>(trend_);
  T* out = static_cast<T*>(out_);
  const int64_t Dv = D - D % G::U;
  const A w_a = static_cast<A>(w);  // the reference multiplies an fp32 tensor by w
  const Vec vw(w_a), one(A(1));
  Vec v[G::kUnit], c[G::kUnit], g[G::kUnit], t[G::kUnit];
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    const C* cr = cached + r * D;
    const R* tr = trend ? trend + r * trend_row_stride : nullptr;
    T* orow = out + r * D;
    if constexpr (kScalarElementwise) {
      if (tr) {
        for (int64_t i = 0; i < D; ++i) {
          const A f = static_cast<A>(cr[i]) * (A(1) + w_a * static_cast<A>(tr[i]));
          orow[i] = static_cast<T>(static_cast<A>(xr[i]) + gr[i] * f);
        }
      } else {
        for (int64_t i = 0; i < D; ++i) orow[i] = static_cast<T>(static_cast<A>(xr[i]) + gr[i] * static_cast<A>(cr[i]));
      }
      continue;
    }
    for (int64_t i = 0; i < Dv; i += G::U) {
      load_unit<A>(xr + i, v);
      load_unit<A>(cr + i, c);
      load_unit<A>(gr + i, g);
      if (tr) {
        load_unit<A>(tr + i, t);
        for (int64_t k = 0; k < G::kUnit; ++k) c[k] = c[k] * (one + vw * t[k]);
      }
      for (int64_t k = 0; k < G::kUnit; ++k) v[k] = v[k] + g[k] * c[k];
      store_unit<A>(orow + i, v);
    }
    for (int64_t i = Dv; i < D; ++i) {
      A f = static_cast<A>(cr[i]);
      if (tr) f = f * (A(1) + w_a * static_cast<A>(tr[i]));
      orow[i] = static_cast<T>(static_cast<A>(xr[i]) + gr[i] * f);
    }
  }
}

// ---------------------------------------------------------- apply / store residual
template <typename T, typename R>
void add_kernel(const void* a_, const void* b_, void* out_, int64_t n) {
  using A = acc_t<T>;
  using G = Geom<A>;
  const T* a = static_cast<const T*>(a_);
  const R* b = static_cast<const R*>(b_);
  T* out = static_cast<T*>(out_);
  const int64_t nv = kScalarElementwise ? 0 : n - n % G::U;
  Vectorized<A> va[G::kUnit], vb[G::kUnit];
  for (int64_t i = 0; i < nv; i += G::U) {
    load_unit<A>(a + i, va);
    load_unit<A>(b + i, vb);
    for (int64_t k = 0; k < G::kUnit; ++k) va[k] = va[k] + vb[k];
    store_unit<A>(out + i, va);
  }
  for (int64_t i = nv; i < n; ++i) out[i] = static_cast<T>(static_cast<A>(a[i]) + static_cast<A>(b[i]));
}

// out_ is the residual buffer (dtype O), a the block stack's output (dtype T), b its input.
template <typename T, typename I, typename O>
void sub_kernel(const void* a_, const void* b_, void* out_, int64_t n) {
  using A = acc_t<T>;
  using G = Geom<A>;
  const T* a = static_cast<const T*>(a_);
  const I* b = static_cast<const I*>(b_);
  O* out = static_cast<O*>(out_);
  const int64_t nv = kScalarElementwise ? 0 : n - n % G::U;
  Vectorized<A> va[G::kUnit], vb[G::kUnit];
  for (int64_t i = 0; i < nv; i += G::U) {
    load_unit<A>(a + i, va);
    load_unit<A>(b + i, vb);
    for (int64_t k = 0; k < G::kUnit; ++k) va[k] = va[k] - vb[k];
    store_unit<A>(out + i, va);
  }
  for (int64_t i = nv; i < n; ++i) out[i] = static_cast<O>(static_cast<A>(a[i]) - static_cast<A>(b[i]));
}

// ----------------------------------------------------------------------------- table
template <typename T>
void fill(KernelTable& t, DType d) {
  using A = acc_t<T>;
  t.modulated_rows[d][kSame] = &modulated_rows<T, T>;
  t.modulated_rows[d][kAcc] = &modulated_rows<T, A>;
  t.rel_l1_chunk[d][kSame] = &rel_l1_chunk<T, T>;
  t.rel_l1_chunk[d][kAcc] = &rel_l1_chunk<T, A>;
  t.gated_rows[d][kSame][kSame] = &gated_rows<T, T, T>;
  t.gated_rows[d][kSame][kAcc] = &gated_rows<T, T, A>;
  t.gated_rows[d][kAcc][kSame] = &gated_rows<T, A, T>;
  t.gated_rows[d][kAcc][kAcc] = &gated_rows<T, A, A>;
  t.add[d][kSame] = &add_kernel<T, T>;
  t.add[d][kAcc] = &add_kernel<T, A>;
  t.sub[d][kSame][kSame] = &sub_kernel<T, T, T>;
  t.sub[d][kSame][kAcc] = &sub_kernel<T, T, A>;
  t.sub[d][kAcc][kSame] = &sub_kernel<T, A, T>;
  t.sub[d][kAcc][kAcc] = &sub_kernel<T, A, A>;
}

KernelTable make_table() {
  KernelTable t{};
  t.name = CAPABILITY_NAME;
  fill<float>(t, kF32);
  fill<BFloat16>(t, kBF16);
  fill<Half>(t, kF16);
  fill<double>(t, kF64);
  return t;
}

}  // namespace

const KernelTable* kernel_table() {
  static const KernelTable table = make_table();
  return &table;
}

}  // namespace fastcache::cpu::CPU_CAPABILITY
