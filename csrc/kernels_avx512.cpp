// AVX-512 variant of the CPU kernels (x86-64-v4 class CPUs: Skylake-SP and later, Zen 4).
// Same scheme as kernels_avx2.cpp; cpu_dispatch.cpp calls in here only when the CPU and
// the OS support avx512f/bw/vl/dq/cd on top of the AVX2 set.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(                                                                                   \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#include "isa_macros_avx2.h"
// Lambdas in the at::vec headers we never call make GCC warn about the vector ABI.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 false positive on the _mm512_undefined_* operands of the fp16 conversions.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512CD__
#define __AVX512CD__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define CAPABILITY_NAME "avx512"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
