// The ISA-neutral interface between the Tensor-level ops (ops.cpp, compiled for the
// baseline CPU) and the raw-pointer kernels (kernels_impl.h, compiled once per CPU
// variant: kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
//
// Only plain structs and declarations live here: no inline function bodies, so this
// header cannot smuggle an AVX-512 copy of anything into baseline code (see the note on
// link order in setup.py).
#pragma once

#include <cstdint>

namespace fastcache::cpu {

// Element types the kernels are instantiated for. Accumulation is fp32 for the first
// three and fp64 for kF64.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3, kNumDTypes = 4 };

// Second index of the tables below: the dtype of a secondary tensor relative to x.
// kSame = x's dtype, kAcc = the accumulation dtype (fp32, or fp64 for fp64 x). For fp32
// and fp64 inputs both entries hold the same kernel. Any other combination is converted
// to kAcc by the caller first (exact: bf16/fp16 -> fp32 is lossless).
enum Variant : int { kSame = 0, kAcc = 1 };

// Every reduction keeps kLanes partial sums per row (per chunk for rel_l1): element i
// of a row goes to lane i % kLanes in index order, whatever the vector width, then the
// lanes are summed by a fixed tree. Results are therefore bitwise identical across
// variants and thread counts. 32 lanes = two independent AVX-512 accumulators (a little
// faster than 16, no slower than 64) and shorter fp32 summation chains.
constexpr int64_t kLanes = 32;

// LayerNorm + modulation + rel-L1 partial sums over `rows` consecutive rows of one batch
// element. x, prev: (rows, D) of x's / prev's dtype; shift, scale: (D,) of the
// accumulation dtype. Writes sums[0] = sum|m - prev|, sums[1] = sum|prev| (acc dtype,
// rows summed in order) and, when write_prev, prev <- m (the sums do not depend on it).
using ModulatedRowsFn = void (*)(const void* x, const void* shift, const void* scale, void* prev, int64_t rows,
                                 int64_t D, double eps, bool write_prev, void* sums);

// Rel-L1 partial sums over n contiguous elements (n is a multiple of kLanes except for the
// last chunk of a row): sums = [sum|x - prev|, sum|prev|]; prev <- x if write_prev.
using RelL1ChunkFn = void (*)(const void* x, void* prev, int64_t n, bool write_prev, void* sums);

// out[i] = x[i] + gate * (cached[i] * (1 + w * trend[i])) for `rows` consecutive rows of D
// elements of ONE batch element: x, cached, out point at the first row (contiguous rows);
// gate at that batch element's (D,) row in the acc dtype; trend at the first row's trend
// row, successive rows trend_row_stride apart (0 for a (D,) trend); nullptr = no trend.
// out may be x itself (in place): element i is read before it is written.
using GatedRowsFn = void (*)(const void* x, const void* gate, const void* cached, const void* trend,
                             int64_t trend_row_stride, double w, void* out, int64_t rows, int64_t D);

// out = a + b (out in a's dtype) / out = a - b (out in its own dtype), n elements.
using AddFn = void (*)(const void* a, const void* b, void* out, int64_t n);
using SubFn = void (*)(const void* a, const void* b, void* out, int64_t n);

struct KernelTable {
  const char* name;
  ModulatedRowsFn modulated_rows[kNumDTypes][2];  // [x][prev]
  RelL1ChunkFn rel_l1_chunk[kNumDTypes][2];       // [x][prev]
  GatedRowsFn gated_rows[kNumDTypes][2][2];       // [x][cached][trend]
  AddFn add[kNumDTypes][2];                       // [x][r]: x + r
  SubFn sub[kNumDTypes][2][2];                    // [out][x_in][r]: r <- out - x_in
};

// One table per compiled variant; only call a getter the running CPU supports
// (cpu_dispatch.cpp checks).
namespace DEFAULT {
const KernelTable* kernel_table();
}
#if defined(__x86_64__) || defined(_M_X64)
#define FASTCACHE_HAVE_X86_VARIANTS 1
namespace AVX2 {
const KernelTable* kernel_table();
}
namespace AVX512 {
const KernelTable* kernel_table();
}
#endif

}  // namespace fastcache::cpu
