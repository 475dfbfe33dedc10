// Tensor-level C++ implementations of the fastcache ops (CPU). The schemas and exact
// semantics are defined in Python: fastcache/ops/_library.py (schemas) and
// fastcache/ops/reference.py (the eager oracle these functions reproduce).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastcache {

// Decision-state layout (fastcache/ops/reference.py; tests check the two agree).
namespace state {
constexpr int64_t ACC = 0, STEP = 1, SKIPS = 2, PREV_T = 3, RATIO = 4, RESCALED = 5, FLAG = 6, N_COMPUTED = 7,
                  N_SKIPPED = 8, N_RUNS = 9;
constexpr int64_t HEADER = 16;
}  // namespace state

at::Tensor modulated_rel_l1_sums(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                                 const at::Tensor& prev);
at::Tensor rel_l1_sums(const at::Tensor& x, const at::Tensor& prev, bool write_prev);
at::Tensor cache_decision(const at::Tensor& sums, const at::Tensor& timestep, const at::Tensor& coeffs,
                          const at::Tensor& state, double threshold, int64_t warmup, int64_t max_skips,
                          int64_t num_steps);
at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                          const std::optional<at::Tensor>& trend, double w);
void gated_residual_out(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cached,
                        const std::optional<at::Tensor>& trend, double w, const at::Tensor& out);
at::Tensor apply_residual(const at::Tensor& x, const at::Tensor& r);
void apply_residual_out(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out);
void store_residual(const at::Tensor& out, const at::Tensor& x_in, const at::Tensor& flag, const at::Tensor& r);

}  // namespace fastcache
