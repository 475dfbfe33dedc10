// TaylorSeer's device work on CPU (docs/methods.md section 8, Eq. TS1-TS2): the forecast
// from the finite-difference history and the in-place difference update. Element-wise
// over the feature's E elements, history laid out (order+1, E) contiguous; fp32 math
// (fp64 for fp64), the same operation order as fastcache/ops/reference.py (built with
// -ffp-contract=off, so no FMA changes the rounding).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace fastcache {
namespace {

constexpr int64_t kGrain = 32768;
constexpr int64_t kChunk = 512;  // elements per vectorized chunk (stack arrays)

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_history(const char* kOp, const at::Tensor& history, const at::Tensor& dx) {
  CHECK_CPU(history);
  CHECK_FLOATING(history);
  CHECK_CPU(dx);
  TORCH_CHECK(history.dim() >= 2 && history.size(0) >= 1, kOp,
              ": history must be (order+1, *feature_shape) (at least 2-D), got shape ", shape_str(history.sizes()),
              ".");
  TORCH_CHECK(history.is_contiguous(), kOp,
              ": history must be contiguous (the device-resident Taylor state, written in place), got strides ",
              shape_str(history.strides()), ".");
  TORCH_CHECK(dx.numel() == 1 && dx.scalar_type() == c10::kFloat, kOp,
              ": dx must be a one-element torch.float32 tensor (steps since the last computed step), got ",
              dtype_str(dx.scalar_type()), " ", shape_str(dx.sizes()), ".");
}

}  // namespace

at::Tensor taylor_forecast(const at::Tensor& history, const at::Tensor& dx) {
  constexpr const char* kOp = "fastcache::taylor_forecast";
  check_history(kOp, history, dx);
  at::Tensor out = at::empty(history.sizes().slice(1), history.options());
  const int64_t E = out.numel();
  const int64_t M = history.size(0) - 1;
  if (E == 0) return out;
  const float x32 = *dx.const_data_ptr<float>();  // a CPU scalar: a plain load, no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, history.scalar_type(), "taylor_forecast", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* h = history.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<A> c(M + 1);
    c[0] = A(1);
    for (int64_t k = 1; k <= M; ++k) c[k] = c[k - 1] * A(x32) / A(k);
    at::parallel_for(0, E, kGrain, [&](int64_t b, int64_t e) {
      // chunks with the order loop outside: the element loops vectorize; per element the
      // terms are still added in the order k = 1, 2, ... (the reference's rounding)
      A acc[kChunk];
      for (int64_t c0 = b; c0 < e; c0 += kChunk) {
        const int64_t n = std::min(kChunk, e - c0);
        const scalar_t* h0 = h + c0;
        for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<A>(h0[i]);
        for (int64_t k = 1; k <= M; ++k) {
          const scalar_t* hk = h + k * E + c0;
          const A ck = c[k];
          for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + static_cast<A>(hk[i]) * ck;
        }
        for (int64_t i = 0; i < n; ++i) o[c0 + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

void taylor_update(const at::Tensor& history, const at::Tensor& f, const at::Tensor& dx, const at::Tensor& valid,
                   const at::Tensor& store) {
  constexpr const char* kOp = "fastcache::taylor_update";
  check_history(kOp, history, dx);
  CHECK_CPU(f);
  CHECK_CPU(valid);
  CHECK_CPU(store);
  TORCH_CHECK(f.sizes() == history.sizes().slice(1), kOp, ": f must have the history's feature shape ",
              shape_str(history.sizes().slice(1)), ", got ", shape_str(f.sizes()), ".");
  TORCH_CHECK(f.scalar_type() == history.scalar_type(), kOp, ": f must have the history's dtype ",
              dtype_str(history.scalar_type()), ", got ", dtype_str(f.scalar_type()), ".");
  TORCH_CHECK(f.is_contiguous(), kOp, ": f must be contiguous (fastcache.ops.taylor_update makes it so), got strides ",
              shape_str(f.strides()), ".");
  TORCH_CHECK(valid.numel() == 1 && valid.scalar_type() == c10::kFloat, kOp,
              ": valid must be a one-element torch.float32 tensor (the orders the history holds), got ",
              dtype_str(valid.scalar_type()), " ", shape_str(valid.sizes()), ".");
  TORCH_CHECK(store.numel() == 1 && store.scalar_type() == c10::kBool, kOp,
              ": store must be a 0-dim torch.bool tensor (the store flag of the step), got ",
              dtype_str(store.scalar_type()), " ", shape_str(store.sizes()), ".");
  // CPU scalars: plain loads, not a device sync.
  if (!*store.const_data_ptr<bool>()) return;
  const int64_t E = f.numel();
  const int64_t M = history.size(0) - 1;
  if (E == 0) return;
  const float x32 = *dx.const_data_ptr<float>();
  const float nv = *valid.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, history.scalar_type(), "taylor_update", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* h = history.data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const A x = A(x32);
    at::parallel_for(0, E, kGrain, [&](int64_t b, int64_t e) {
      A d[kChunk];
      for (int64_t c0 = b; c0 < e; c0 += kChunk) {
        const int64_t n = std::min(kChunk, e - c0);
        for (int64_t i = 0; i < n; ++i) d[i] = static_cast<A>(fp[c0 + i]);
        for (int64_t k = 0; k <= M; ++k) {
          scalar_t* hk = h + k * E + c0;
          if (k == M) {
            for (int64_t i = 0; i < n; ++i) hk[i] = static_cast<scalar_t>(d[i]);
          } else if (A(nv) > A(k)) {  // D^{k+1} = (D^k_new - D^k_old) / dx
            for (int64_t i = 0; i < n; ++i) {
              const A old = static_cast<A>(hk[i]);
              hk[i] = static_cast<scalar_t>(d[i]);
              d[i] = (d[i] - old) / x;
            }
          } else {  // an order the history did not hold yet: 0 from here up
            for (int64_t i = 0; i < n; ++i) {
              hk[i] = static_cast<scalar_t>(d[i]);
              d[i] = A(0);
            }
          }
        }
      }
    });
  });
}

// A fitted forecast from the same history (docs/methods.md section 12, "Fitted filler"):
// out = sum_k weights[k] * history[k], k = 0 .. m in that order, fp32 math (fp64 for fp64).
// weights: (m+1,) fp32, one per history row, written by the host at plan time.
at::Tensor history_combine(const at::Tensor& history, const at::Tensor& weights) {
  constexpr const char* kOp = "fastcache::history_combine";
  CHECK_CPU(history);
  CHECK_FLOATING(history);
  CHECK_CPU(weights);
  TORCH_CHECK(history.dim() >= 2 && history.size(0) >= 1, kOp,
              ": history must be (order+1, *feature_shape) (at least 2-D), got shape ", shape_str(history.sizes()),
              ".");
  TORCH_CHECK(history.is_contiguous(), kOp,
              ": history must be contiguous (the device-resident Taylor state, written in place), got strides ",
              shape_str(history.strides()), ".");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == history.size(0) && weights.scalar_type() == c10::kFloat, kOp,
              ": weights must be a 1-D torch.float32 tensor of ", history.size(0),
              " values (one per history row), got ", dtype_str(weights.scalar_type()), " ",
              shape_str(weights.sizes()), ".");
  at::Tensor out = at::empty(history.sizes().slice(1), history.options());
  const int64_t E = out.numel();
  const int64_t M = history.size(0) - 1;
  if (E == 0) return out;
  const at::Tensor wc = weights.contiguous();
  const float* w32 = wc.const_data_ptr<float>();  // a CPU tensor: plain loads, no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, history.scalar_type(), "history_combine", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* h = history.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<A> w(M + 1);
    for (int64_t k = 0; k <= M; ++k) w[k] = A(w32[k]);
    at::parallel_for(0, E, kGrain, [&](int64_t b, int64_t e) {
      // chunks with the row loop outside (the element loops vectorize); per element the
      // terms are added in the order k = 0, 1, ..., m (the reference's rounding)
      A acc[kChunk];
      for (int64_t c0 = b; c0 < e; c0 += kChunk) {
        const int64_t n = std::min(kChunk, e - c0);
        const scalar_t* h0 = h + c0;
        const A w0 = w[0];
        for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<A>(h0[i]) * w0;
        for (int64_t k = 1; k <= M; ++k) {
          const scalar_t* hk = h + k * E + c0;
          const A wk = w[k];
          for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + static_cast<A>(hk[i]) * wk;
        }
        for (int64_t i = 0; i < n; ++i) o[c0 + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

}  // namespace fastcache
