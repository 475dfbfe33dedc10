// Tensor-level C++ implementations of the fastcache ops (CPU). The schemas and exact
// semantics are defined in Python: fastcache/ops/_library.py (schemas) and
// fastcache/ops/reference.py (the eager oracle these functions reproduce).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastcache {

// Decision-state layout: the C++ copy of fastcache/ops/layout.py (the one Python
// definition; tests/ops/test_contracts.py checks that the two agree).
namespace state {
constexpr int64_t ACC = 0, STEP = 1, SKIPS = 2, PREV_T = 3, RATIO = 4, RESCALED = 5, FLAG = 6, N_COMPUTED = 7,
                  N_SKIPPED = 8, N_RUNS = 9;
constexpr int64_t HEADER = 16;
constexpr int64_t MAX_COEFFS = 8;  // polynomial coefficients of cache_decision
}  // namespace state

// Sampling-run counters of timestep_guard (fastcache/ops/layout.py AUX_*).
namespace aux {
constexpr int64_t REPEATS = 0, LAST_RUN_STEPS = 1, RUN_LENGTH_MISMATCHES = 2, JITTER = 3;
constexpr int64_t SIZE = 4;
}  // namespace aux

// `hold`: the optional 0-dim bool repeat flag of timestep_guard (a CPU tensor here, so
// reading it is a load, not a device sync). When set, prev / the decision state are
// left untouched (the sums are still computed; the decision returns true).
at::Tensor modulated_rel_l1_sums(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                                 const at::Tensor& prev, const std::optional<at::Tensor>& hold);
at::Tensor rel_l1_sums(const at::Tensor& x, const at::Tensor& prev, bool write_prev,
                       const std::optional<at::Tensor>& hold);
at::Tensor cache_decision(const at::Tensor& sums, const at::Tensor& timestep, const at::Tensor& coeffs,
                          const at::Tensor& state, double threshold, int64_t warmup, int64_t max_skips,
                          int64_t num_steps, const std::optional<at::Tensor>& hold, bool accumulate = true);
std::tuple<at::Tensor, at::Tensor> timestep_guard(const at::Tensor& timestep, const at::Tensor& state,
                                                  const at::Tensor& aux, double rtol, double atol, int64_t num_steps);
// The value of an optional hold flag (false when absent), checked: one bool value on CPU.
bool read_hold(const char* op, const std::optional<at::Tensor>& hold);
at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                          const std::optional<at::Tensor>& trend, double w);
void gated_residual_out(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                        const std::optional<at::Tensor>& trend, double w, const at::Tensor& out);
at::Tensor apply_residual(const at::Tensor& x, const at::Tensor& r);
void apply_residual_out(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out);
void store_residual(const at::Tensor& out, const at::Tensor& x_in, const at::Tensor& flag, const at::Tensor& r);
// TaylorSeer (csrc/taylor.cpp)
at::Tensor taylor_forecast(const at::Tensor& history, const at::Tensor& dx);
void taylor_update(const at::Tensor& history, const at::Tensor& f, const at::Tensor& dx, const at::Tensor& valid,
                   const at::Tensor& store);
// Multi-slot ops (csrc/slots.cpp)
at::Tensor forecast_residual(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& gates,
                             at::TensorList histories, const at::Tensor& dx);
void taylor_update_slots(at::TensorList histories, at::TensorList fs, const at::Tensor& dx, const at::Tensor& valid,
                         const at::Tensor& store);
at::Tensor history_combine(const at::Tensor& history, const at::Tensor& weights);

}  // namespace fastcache
