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
//  * reductions use kLanes = 16 lanes: element i of a row feeds lane i % 16 in index
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

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, BFloat16> || std::is_same_v<T, Half>;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Geometry of one vector "block" for accumulation type A: kElems elements held in kVecs
// vectors of V lanes; the 16 reduction lanes fit in kAccVecs vectors. For fp32, a block
// is at least 2V wide so that one Vectorized<bf16/fp16> (2V elements) converts to a
// whole number of fp32 vectors.
template <typename A>
struct Block {
  using Vec = Vectorized<A>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t kAccVecs = kLanes / V;
  static constexpr int64_t kElems = std::is_same_v<A, float> ? std::max<int64_t>(kLanes, 2 * V) : kLanes;
  static constexpr int64_t kVecs = kElems / V;
  static_assert(kLanes % V == 0, "the vector width must divide the 16 reduction lanes");
  static_assert(kElems % kLanes == 0, "a block must hold whole groups of 16 lanes");
};

template <typename A, typename T>
inline void load_block(const T* p, Vectorized<A>* v) {
  using B = Block<A>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t j = 0; j < B::kVecs; ++j) v[j] = Vectorized<A>::loadu(p + j * B::V);
  } else {
    static_assert(std::is_same_v<A, float> && is_reduced_v<T>, "only bf16/fp16 -> fp32 loads convert");
    static_assert(Vectorized<T>::size() == 2 * B::V, "a reduced vector must hold two fp32 vectors");
    for (int64_t j = 0; j < B::kVecs; j += 2) {
      auto halves = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p + j * B::V));
      v[j] = std::get<0>(halves);
      v[j + 1] = std::get<1>(halves);
    }
  }
}

template <typename A, typename T>
inline void store_block(T* p, const Vectorized<A>* v) {
  using B = Block<A>;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t j = 0; j < B::kVecs; ++j) v[j].store(p + j * B::V);
  } else {
    static_assert(std::is_same_v<A, float> && is_reduced_v<T>, "only fp32 -> bf16/fp16 stores convert");
    for (int64_t j = 0; j < B::kVecs; j += 2) at::vec::convert_from_float<T>(v[j], v[j + 1]).store(p + j * B::V);
  }
}

// 16 lane accumulators: vector j of a block feeds accumulator j % kAccVecs, so lane l
// sees elements l, l + 16, l + 32, ... in order.
template <typename A>
struct Lanes {
  using B = Block<A>;
  Vectorized<A> acc[B::kAccVecs];
  Lanes() {
    for (auto& a : acc) a = Vectorized<A>(A(0));
  }
  inline void add_block(const Vectorized<A>* v) {
    for (int64_t j = 0; j < B::kVecs; ++j) acc[j % B::kAccVecs] = acc[j % B::kAccVecs] + v[j];
  }
  // Spill to scalars for the tail: lane(i) += value for the elements past the last block.
  inline void spill(A* lanes) const {
    for (int64_t k = 0; k < B::kAccVecs; ++k) acc[k].store(lanes + k * B::V);
  }
};

// Fixed pairwise tree over the 16 lanes (the same in every variant).
template <typename A>
inline A reduce_lanes(A* lanes) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lanes[i] = lanes[i] + lanes[i + w];
  }
  return lanes[0];
}

// ------------------------------------------------------------------ modulated_rel_l1_sums
template <typename T, typename P>
void modulated_rows(const void* x_, const void* shift_, const void* scale_, void* prev_, int64_t rows,
                    int64_t D, double eps, void* sums_) {
  using A = acc_t<T>;
  using B = Block<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  const A* shift = static_cast<const A*>(shift_);
  const A* scale = static_cast<const A*>(scale_);
  P* prev = static_cast<P*>(prev_);
  A* sums = static_cast<A*>(sums_);
  const int64_t Dv = D - D % B::kElems;
  const A eps_a = static_cast<A>(eps);  // the reference adds eps to an fp32 (fp64) tensor
  const A d_a = static_cast<A>(D);
  const Vec one(A(1));
  A num = 0, den = 0;
  alignas(64) A lanes[kLanes];
  alignas(64) A lanes_den[kLanes];
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    P* pr = prev + r * D;
    Vec v[B::kVecs];
    // LayerNorm statistics, two passes as in the reference (the row is in L1 by now).
    Lanes<A> s1;
    for (int64_t i = 0; i < Dv; i += B::kElems) {
      load_block<A>(xr + i, v);
      s1.add_block(v);
    }
    s1.spill(lanes);
    for (int64_t i = Dv; i < D; ++i) lanes[i % kLanes] = lanes[i % kLanes] + static_cast<A>(xr[i]);
    const A mean = reduce_lanes(lanes) / d_a;
    const Vec vmean(mean);
    Lanes<A> s2;
    for (int64_t i = 0; i < Dv; i += B::kElems) {
      load_block<A>(xr + i, v);
      for (auto& e : v) {
        const Vec c = e - vmean;
        e = c * c;
      }
      s2.add_block(v);
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
    Vec p[B::kVecs], sc[B::kVecs], sh[B::kVecs];
    for (int64_t i = 0; i < Dv; i += B::kElems) {
      load_block<A>(xr + i, v);
      load_block<A>(pr + i, p);
      load_block<A>(scale + i, sc);
      load_block<A>(shift + i, sh);
      for (int64_t j = 0; j < B::kVecs; ++j) {
        const Vec m = ((v[j] - vmean) * vrstd) * (one + sc[j]) + sh[j];
        v[j] = m;
        sc[j] = (m - p[j]).abs();
        sh[j] = p[j].abs();
      }
      sn.add_block(sc);
      sd.add_block(sh);
      store_block<A>(pr + i, v);
    }
    sn.spill(lanes);
    sd.spill(lanes_den);
    for (int64_t i = Dv; i < D; ++i) {
      const A m = ((static_cast<A>(xr[i]) - mean) * rstd) * (A(1) + scale[i]) + shift[i];
      const A pv = static_cast<A>(pr[i]);
      lanes[i % kLanes] = lanes[i % kLanes] + std::abs(m - pv);
      lanes_den[i % kLanes] = lanes_den[i % kLanes] + std::abs(pv);
      pr[i] = static_cast<P>(m);
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
  using B = Block<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  P* prev = static_cast<P*>(prev_);
  A* sums = static_cast<A*>(sums_);
  const int64_t nv = n - n % B::kElems;
  Lanes<A> sn, sd;
  Vec v[B::kVecs], p[B::kVecs], dn[B::kVecs], dd[B::kVecs];
  for (int64_t i = 0; i < nv; i += B::kElems) {
    load_block<A>(x + i, v);
    load_block<A>(prev + i, p);
    for (int64_t j = 0; j < B::kVecs; ++j) {
      dn[j] = (v[j] - p[j]).abs();
      dd[j] = p[j].abs();
    }
    sn.add_block(dn);
    sd.add_block(dd);
    if (write_prev) store_block<A>(prev + i, v);
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
template <typename T, typename C, typename R>
void gated_rows(const void* x_, const void* gate_, const void* cached_, const void* trend_,
                int64_t trend_row_stride, double w, void* out_, int64_t row_begin, int64_t row_end, int64_t N,
                int64_t D) {
  using A = acc_t<T>;
  using B = Block<A>;
  using Vec = Vectorized<A>;
  const T* x = static_cast<const T*>(x_);
  const A* gate = static_cast<const A*>(gate_);
  const C* cached = static_cast<const C*>(cached_);
  const R* trend = static_cast<const R*>(trend_);
  T* out = static_cast<T*>(out_);
  const int64_t Dv = D - D % B::kElems;
  const A w_a = static_cast<A>(w);  // the reference multiplies an fp32 tensor by w
  const Vec vw(w_a), one(A(1));
  Vec v[B::kVecs], c[B::kVecs], g[B::kVecs], t[B::kVecs];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * D;
    const C* cr = cached + r * D;
    const A* gr = gate + (r / N) * D;
    const R* tr = trend ? trend + (r % N) * trend_row_stride : nullptr;
    T* orow = out + r * D;
    for (int64_t i = 0; i < Dv; i += B::kElems) {
      load_block<A>(xr + i, v);
      load_block<A>(cr + i, c);
      load_block<A>(gr + i, g);
      if (tr) {
        load_block<A>(tr + i, t);
        for (int64_t j = 0; j < B::kVecs; ++j) c[j] = c[j] * (one + vw * t[j]);
      }
      for (int64_t j = 0; j < B::kVecs; ++j) v[j] = v[j] + g[j] * c[j];
      store_block<A>(orow + i, v);
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
  using B = Block<A>;
  const T* a = static_cast<const T*>(a_);
  const R* b = static_cast<const R*>(b_);
  T* out = static_cast<T*>(out_);
  const int64_t nv = n - n % B::kElems;
  Vectorized<A> va[B::kVecs], vb[B::kVecs];
  for (int64_t i = 0; i < nv; i += B::kElems) {
    load_block<A>(a + i, va);
    load_block<A>(b + i, vb);
    for (int64_t j = 0; j < B::kVecs; ++j) va[j] = va[j] + vb[j];
    store_block<A>(out + i, va);
  }
  for (int64_t i = nv; i < n; ++i) out[i] = static_cast<T>(static_cast<A>(a[i]) + static_cast<A>(b[i]));
}

// out_ is the residual buffer (dtype O), a the block stack's output (dtype T), b its input.
template <typename T, typename I, typename O>
void sub_kernel(const void* a_, const void* b_, void* out_, int64_t n) {
  using A = acc_t<T>;
  using B = Block<A>;
  const T* a = static_cast<const T*>(a_);
  const I* b = static_cast<const I*>(b_);
  O* out = static_cast<O*>(out_);
  const int64_t nv = n - n % B::kElems;
  Vectorized<A> va[B::kVecs], vb[B::kVecs];
  for (int64_t i = 0; i < nv; i += B::kElems) {
    load_block<A>(a + i, va);
    load_block<A>(b + i, vb);
    for (int64_t j = 0; j < B::kVecs; ++j) va[j] = va[j] - vb[j];
    store_block<A>(out + i, va);
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
