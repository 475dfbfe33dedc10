// cache_decision on CPU: TeaCache's whole per-step decision as scalar fp32 code on the
// state tensor. It reproduces fastcache/ops/reference.py's cache_decision bit for bit:
// same fp32 operations in the same order (sum over b = 0..B-1, num / den, Horner as
// r = r * ratio + c with no FMA, the extension being built with -ffp-contract=off).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace fastcache {
namespace {

// All values of t in logical (row-major) order, cast to fp32 like `t.to(torch.float32)`.
std::vector<float> as_floats(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<float> out(c.numel());
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, c.scalar_type(), "fastcache_as_floats", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) out[i] = static_cast<float>(p[i]);
  });
  return out;
}

// The first value in logical order (`t.reshape(-1)[0]`: the element at index 0 in every
// dimension, which is where data_ptr points whatever the strides), cast to fp32.
float first_as_float(const at::Tensor& t) {
  float v = 0.0f;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "fastcache_first_as_float",
                             [&] { v = static_cast<float>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

}  // namespace

at::Tensor cache_decision(const at::Tensor& sums, const at::Tensor& timestep, const at::Tensor& coeffs,
                          const at::Tensor& state, double threshold, int64_t warmup, int64_t max_skips,
                          int64_t num_steps, const std::optional<at::Tensor>& hold, bool accumulate) {
  using namespace fastcache::state;
  constexpr const char* kOp = "fastcache::cache_decision";
  const bool held = read_hold(kOp, hold);
  CHECK_CPU(state);
  CHECK_DTYPE(state, at::kFloat);
  TORCH_CHECK(state.dim() == 1 && state.numel() >= HEADER, kOp, ": state must be a 1-D tensor of at least ", HEADER,
              " values (header + 3 history rows), got shape ", shape_str(state.sizes()),
              ". Create it with fastcache.ops.new_state().");
  CHECK_CPU(sums);
  TORCH_CHECK(sums.dim() >= 1 && sums.size(-1) == 2, kOp,
              ": sums must have shape (B, 2) or (2,) (the output of the rel-L1 ops), got ", shape_str(sums.sizes()),
              ".");
  TORCH_CHECK(sums.scalar_type() == at::kFloat, kOp, ": sums must have dtype torch.float32, got ",
              dtype_str(sums.scalar_type()), ". Use sums.float() (fastcache.ops.cache_decision does it for you).");
  CHECK_CPU(timestep);
  TORCH_CHECK(timestep.numel() >= 1, kOp, ": timestep must hold at least one value, got shape ",
              shape_str(timestep.sizes()), ".");
  TORCH_CHECK(!timestep.is_complex(), kOp, ": timestep must be real, got ", dtype_str(timestep.scalar_type()), ".");
  CHECK_CPU(coeffs);
  CHECK_DTYPE(coeffs, at::kFloat);
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() <= MAX_COEFFS, kOp, ": coeffs must be a 1-D tensor of at most ",
              MAX_COEFFS, " values (highest power first), got shape ", shape_str(coeffs.sizes()), ".");

  at::Tensor flag = at::empty({}, state.options().dtype(at::kBool));
  if (held) {
    // a repeated evaluation of the previous step: compute, state untouched
    *flag.data_ptr<bool>() = true;
    return flag;
  }
  const at::Tensor work = state.is_contiguous() ? state : state.contiguous();
  float* st = work.data_ptr<float>();
  const int64_t numel = work.numel();

  const float t = first_as_float(timestep);
  const bool new_run = t > st[PREV_T];
  if (new_run) {
    for (const int64_t i : {ACC, STEP, SKIPS, N_COMPUTED, N_SKIPPED}) st[i] = 0.0f;
  }
  st[N_RUNS] = st[N_RUNS] + (new_run ? 1.0f : 0.0f);

  const std::vector<float> s = as_floats(sums);
  float num = 0.0f, den = 0.0f;
  for (size_t b = 0; b + 1 < s.size(); b += 2) {
    num = num + s[b];
    den = den + s[b + 1];
  }
  const float ratio = den > 0.0f ? num / den : std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> cs = as_floats(coeffs);
  float rescaled = ratio;
  if (!cs.empty()) {
    rescaled = 0.0f;
    for (const float c : cs) rescaled = rescaled * ratio + c;
  }
  const bool valid = std::isfinite(ratio) && std::isfinite(rescaled);
  // accumulate=false (First-Block Cache): 0 + rescaled, the reference's order
  const float acc = valid ? (accumulate ? st[ACC] : 0.0f) + rescaled : 0.0f;
  const float step = st[STEP];
  // The reference compares fp32 tensors with Python ints / floats: both become fp32.
  bool forced = step < static_cast<float>(std::max<int64_t>(warmup, 1)) || !valid;
  if (num_steps > 0) forced = forced || step >= static_cast<float>(num_steps - 1);
  if (max_skips > 0) forced = forced || st[SKIPS] >= static_cast<float>(max_skips);
  if (threshold <= 0) forced = true;
  const bool compute = forced || acc >= static_cast<float>(threshold);
  const float cf = compute ? 1.0f : 0.0f;

  const int64_t H = (numel - HEADER) / 3;
  if (H > 0 && step < static_cast<float>(H)) {
    const auto idx = static_cast<int64_t>(std::min(step, static_cast<float>(H - 1)));
    const float vals[3] = {ratio, acc, cf};
    for (int64_t row = 0; row < 3; ++row) {
      const int64_t pos = HEADER + row * H + idx;
      if (pos >= 0 && pos < numel) st[pos] = vals[row];
    }
  }
  st[ACC] = compute ? 0.0f : acc;
  st[SKIPS] = compute ? 0.0f : st[SKIPS] + 1.0f;
  st[RATIO] = ratio;
  st[RESCALED] = rescaled;
  st[FLAG] = cf;
  st[N_COMPUTED] = st[N_COMPUTED] + cf;
  st[N_SKIPPED] = st[N_SKIPPED] + (1.0f - cf);
  st[STEP] = step + 1.0f;
  st[PREV_T] = t;
  if (!work.is_same(state)) state.copy_(work);

  *flag.data_ptr<bool>() = compute;
  return flag;
}

// timestep_guard: fastcache/ops/reference.py's timestep_guard as scalar fp32 code, the
// same operations in the same order (tol = scale * rtol + atol rounded twice, no FMA).
std::tuple<at::Tensor, at::Tensor> timestep_guard(const at::Tensor& timestep, const at::Tensor& state,
                                                  const at::Tensor& aux, double rtol, double atol, int64_t num_steps) {
  constexpr const char* kOp = "fastcache::timestep_guard";
  CHECK_CPU(state);
  CHECK_DTYPE(state, at::kFloat);
  TORCH_CHECK(state.dim() == 1 && state.numel() >= state::HEADER, kOp, ": state must be a 1-D tensor of at least ",
              state::HEADER, " values, got shape ", shape_str(state.sizes()),
              ". Create it with fastcache.ops.new_state().");
  CHECK_CPU(aux);
  CHECK_DTYPE(aux, at::kFloat);
  TORCH_CHECK(aux.dim() == 1 && aux.numel() >= aux::SIZE && aux.is_contiguous(), kOp,
              ": aux must be a contiguous 1-D tensor of ", aux::SIZE, " counters, got shape ", shape_str(aux.sizes()),
              ". Create it with fastcache.ops.new_aux().");
  CHECK_CPU(timestep);
  TORCH_CHECK(timestep.numel() >= 1, kOp, ": timestep must hold at least one value, got shape ",
              shape_str(timestep.sizes()), ".");
  TORCH_CHECK(!timestep.is_complex(), kOp, ": timestep must be real, got ", dtype_str(timestep.scalar_type()), ".");
  TORCH_CHECK(rtol >= 0 && atol >= 0, kOp, ": rtol and atol must be >= 0, got rtol=", rtol, ", atol=", atol, ".");

  const at::Tensor work = state.is_contiguous() ? state : state.contiguous();  // read only
  const float* st = work.const_data_ptr<float>();
  const auto get = [&](int64_t i) { return st[i]; };
  float* ax = aux.data_ptr<float>();

  const float t0 = first_as_float(timestep);
  const float prev_t = get(state::PREV_T);
  const float step = get(state::STEP);
  const bool seen = std::isfinite(prev_t);
  const float scale = std::max(std::abs(t0), std::abs(seen ? prev_t : 0.0f));
  const float tol = scale * static_cast<float>(rtol) + static_cast<float>(atol);
  const float diff = t0 - prev_t;
  const bool same = seen && std::abs(diff) <= tol;
  const bool rep = same && step > 0.0f;
  const bool new_run = !seen || diff > tol;
  const bool had_run = get(state::N_RUNS) > 0.0f;
  const bool jitter = same && diff != 0.0f;
  ax[aux::REPEATS] = ax[aux::REPEATS] + (rep ? 1.0f : 0.0f);
  ax[aux::JITTER] = ax[aux::JITTER] + (jitter ? 1.0f : 0.0f);
  const bool ended = new_run && had_run;
  if (ended) ax[aux::LAST_RUN_STEPS] = step;
  if (num_steps > 0) {
    const bool mismatch = ended && step != static_cast<float>(num_steps);
    ax[aux::RUN_LENGTH_MISMATCHES] = ax[aux::RUN_LENGTH_MISMATCHES] + (mismatch ? 1.0f : 0.0f);
  }

  at::Tensor t_op = at::empty({1}, state.options());
  *t_op.data_ptr<float>() = same ? prev_t : t0;
  at::Tensor hold = at::empty({}, state.options().dtype(at::kBool));
  *hold.data_ptr<bool>() = rep;
  return {t_op, hold};
}

}  // namespace fastcache
