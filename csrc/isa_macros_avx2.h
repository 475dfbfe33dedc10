// The feature macros that `-mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mpopcnt` predefine
// (GCC 12: diff of `g++ -dM -E` with and without the flags). Include only right after a
// matching `#pragma GCC target` (kernels_avx2.cpp, kernels_avx512.cpp); a pragma alone
// changes code generation but not the macros the headers test.
#pragma once
#ifndef __SSE3__
#define __SSE3__ 1
#endif
#ifndef __SSSE3__
#define __SSSE3__ 1
#endif
#ifndef __SSE4_1__
#define __SSE4_1__ 1
#endif
#ifndef __SSE4_2__
#define __SSE4_2__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
