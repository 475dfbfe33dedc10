// Baseline variant of the CPU kernels: plain x86-64 (SSE2) or the platform's default
// ISA elsewhere. Always compiled; the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#define CAPABILITY_NAME "baseline"
#define FASTCACHE_SCALAR_ELEMENTWISE 1  // plain loops for the element-wise kernels (kernels_impl.h)
#include "kernels_impl.h"
