// Baseline variant of the CPU kernels: plain x86-64 (SSE2) or the platform's default
// ISA elsewhere. Always compiled; the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#define CAPABILITY_NAME "baseline"
#include "kernels_impl.h"
