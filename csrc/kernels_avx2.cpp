// AVX2 variant of the CPU kernels (x86-64-v3 class CPUs: Haswell and later, Zen).
//
// torch's BuildExtension compiles every source with the same flags, so the target is set
// here, before any #include: the pragma makes the compiler generate AVX2 code for every
// function defined in this file (including the inline code of the at::vec headers), and
// the feature macros are the ones `-mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mpopcnt`
// would predefine (the headers test them, e.g. sleef.h declares its 256-bit functions
// only under __AVX2__). cpu_dispatch.cpp calls in here only on CPUs with all of these.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#include "isa_macros_avx2.h"
// Lambdas in the at::vec headers we never call make GCC warn about the vector ABI.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CAPABILITY_NAME "avx2"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
