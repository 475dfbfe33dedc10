// Named argument checks for the Tensor-level ops: every failure is a TORCH_CHECK, so
// Python sees a RuntimeError that names the op and the argument, shows what was expected
// and what was passed, and says how to fix it. Use the macros inside an op that defines
// `constexpr const char* kOp = "fastcache::<name>";`:
//
//   CHECK_CPU(x);  CHECK_FLOATING(x);  CHECK_SHAPE(shift, B, D);
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace fastcache {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline std::string dtype_str(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return "torch.float32";
    case c10::kBFloat16:
      return "torch.bfloat16";
    case c10::kHalf:
      return "torch.float16";
    case c10::kDouble:
      return "torch.float64";
    case c10::kBool:
      return "torch.bool";
    case c10::kLong:
      return "torch.int64";
    case c10::kInt:
      return "torch.int32";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_kernel_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf || t == c10::kDouble;
}

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor; pass a real tensor.");
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the C++ kernels, got device ",
              t.device().str(), ". Move it with .cpu(), or call torch.ops.fastcache on the tensor's own device.");
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": ", name,
              " must have dtype torch.float32, torch.bfloat16, torch.float16 or torch.float64, got ",
              dtype_str(t.scalar_type()), ". Convert it, e.g. ", name, ".float().");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must have dtype ", dtype_str(expected), ", got ",
              dtype_str(t.scalar_type()), ".");
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> expected,
                        const char* dims) {
  const c10::IntArrayRef want(expected.begin(), expected.size());
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape (", dims, ") = ", shape_str(want), ", got ",
              shape_str(t.sizes()),
              ". The Python wrappers in fastcache.ops accept broadcastable shapes and reshape them for you.");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* dims) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D (", dims, "), got shape ", shape_str(t.sizes()),
              ".");
}

}  // namespace fastcache

#define CHECK_CPU(t) ::fastcache::check_cpu(kOp, #t, t)
#define CHECK_FLOATING(t) ::fastcache::check_floating(kOp, #t, t)
#define CHECK_DTYPE(t, dtype) ::fastcache::check_dtype(kOp, #t, t, dtype)
#define CHECK_DIM(t, n, dims) ::fastcache::check_dim(kOp, #t, t, n, dims)
#define CHECK_SHAPE(t, ...) ::fastcache::check_shape(kOp, #t, t, {__VA_ARGS__}, #__VA_ARGS__)
