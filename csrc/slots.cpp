// Multi-slot ops on CPU (fastcache/ops/reference.py: forecast_residual, taylor_update_slots):
// a whole stack's forecast / reused residuals of one stream in one op, and every slot's
// Taylor history update in one op. fp32 math (fp64 for fp64), the per-element operation
// order of the per-slot ops they replace (taylor_forecast, then gated_residual /
// apply_residual, the stream rounded to its dtype after every slot), built with
// -ffp-contract=off: the same bits as the per-block path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace fastcache {
namespace {

constexpr int64_t kRowGrain = 64;
constexpr int64_t kChunk = 512;

template <typename T>
using slot_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct SlotView {
  const void* h = nullptr;
  int64_t order = -1;  // -1: a cached feature of x's shape; else the Taylor history's m
  bool gated = false;
  int64_t gate_batch = 1;  // 1: broadcast over the batch
  std::vector<double> gate;  // (gate_batch, D), converted once (the per-slot op converts too)
};

}  // namespace

at::Tensor forecast_residual(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& gates,
                             at::TensorList histories, const at::Tensor& dx) {
  constexpr const char* kOp = "fastcache::forecast_residual";
  CHECK_CPU(x);
  CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() == 3, kOp, ": x must be (B, N, D), got shape ", shape_str(x.sizes()), ".");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(static_cast<int64_t>(gates.size()) == static_cast<int64_t>(histories.size()), kOp, ": gates has ",
              gates.size(), " entries but histories has ", histories.size(),
              "; pass one gate (or None for an ungated residual) per slot.");
  CHECK_CPU(dx);
  TORCH_CHECK(dx.numel() == 1 && dx.scalar_type() == c10::kFloat, kOp,
              ": dx must be a one-element fp32 tensor (torch.float32, steps since the last computed step), got ",
              dtype_str(dx.scalar_type()), " ", shape_str(dx.sizes()), ".");
  const int64_t K = static_cast<int64_t>(histories.size());
  std::vector<at::Tensor> keep;  // contiguous copies of strided cached features (rare)
  std::vector<SlotView> slots(K);
  for (int64_t i = 0; i < K; ++i) {
    const std::string name = "histories[" + std::to_string(i) + "]";
    const at::Tensor& h = histories[i];
    check_cpu(kOp, name.c_str(), h);
    TORCH_CHECK(h.scalar_type() == x.scalar_type(), kOp, ": ", name, " must have x's dtype ",
                dtype_str(x.scalar_type()), ", got ", dtype_str(h.scalar_type()), ".");
    const bool plain = h.sizes() == x.sizes();
    const bool hist = h.dim() == 4 && h.sizes().slice(1) == x.sizes() && h.size(0) >= 1 && h.size(0) <= 5;
    TORCH_CHECK(plain || hist, kOp, ": ", name, " has shape ", shape_str(h.sizes()), "; expected x's shape ",
                shape_str(x.sizes()), " (a cached feature) or (m+1, ", B, ", ", N, ", ", D,
                ") with 1 <= m+1 <= 5 (a Taylor history).");
    if (hist) {
      TORCH_CHECK(h.is_contiguous(), kOp, ": ", name, " must be contiguous (the Taylor state is allocated "
                  "contiguous), got strides ", shape_str(h.strides()), ".");
      slots[i].h = h.const_data_ptr();
      slots[i].order = h.size(0) - 1;
    } else {
      keep.push_back(h.contiguous());
      slots[i].h = keep.back().const_data_ptr();
    }
    const auto& go = gates.get(i);
    if (!go.has_value() || !go->defined()) continue;
    const at::Tensor& g = *go;
    const std::string gname = "gates[" + std::to_string(i) + "]";
    check_cpu(kOp, gname.c_str(), g);
    check_floating(kOp, gname.c_str(), g);
    const bool ok = (g.dim() == 1 && g.size(0) == D) ||
                    (g.dim() == 2 && (g.size(0) == 1 || g.size(0) == B) && g.size(1) == D) ||
                    (g.dim() == 3 && (g.size(0) == 1 || g.size(0) == B) && g.size(1) == 1 && g.size(2) == D);
    TORCH_CHECK(ok, kOp, ": ", gname, " has shape ", shape_str(g.sizes()), "; a gate must be (", B, ", 1, ", D,
                "), (", B, ", ", D, "), (1, ", D, ") or (", D, ",) for x of shape ", shape_str(x.sizes()),
                ", or None for an ungated residual.");
    SlotView& s = slots[i];
    s.gated = true;
    s.gate_batch = g.dim() == 1 ? 1 : g.size(0);
    const int64_t sb = g.dim() == 1 ? 0 : g.stride(0);
    const int64_t sd = g.stride(g.dim() - 1);
    s.gate.resize(s.gate_batch * D);
    AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, g.scalar_type(), "forecast_residual_gate", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < s.gate_batch; ++b)
        for (int64_t d = 0; d < D; ++d) s.gate[b * D + d] = static_cast<double>(gp[b * sb + d * sd]);
    });
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t E = x.numel();
  if (E == 0) return out;
  const float x32 = *dx.const_data_ptr<float>();  // a CPU scalar: a plain load, no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, x.scalar_type(), "forecast_residual", [&] {
    using A = slot_acc_t<scalar_t>;
    A c[5];
    c[0] = A(1);
    for (int64_t k = 1; k <= 4; ++k) c[k] = c[k - 1] * A(x32) / A(k);
    // the gates in the accumulation type (exact from any floating dtype up to A; the
    // per-slot op converts its gate to A the same way)
    std::vector<std::vector<A>> gA(K);
    for (int64_t i = 0; i < K; ++i) {
      gA[i].resize(slots[i].gate.size());
      for (size_t j = 0; j < slots[i].gate.size(); ++j) gA[i][j] = static_cast<A>(slots[i].gate[j]);
    }
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, std::max<int64_t>(1, kRowGrain * 1024 / std::max<int64_t>(D, 1)),
                     [&](int64_t r0, int64_t r1) {
      A acc[kChunk];
      A f[kChunk];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N;
        for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
          const int64_t n = std::min(kChunk, D - d0);
          const int64_t base = r * D + d0;
          for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<A>(xp[base + i]);
          for (int64_t s = 0; s < K; ++s) {
            const SlotView& sv = slots[s];
            const scalar_t* h = static_cast<const scalar_t*>(sv.h) + base;
            for (int64_t i = 0; i < n; ++i) f[i] = static_cast<A>(h[i]);
            if (sv.order >= 1) {
              for (int64_t k = 1; k <= sv.order; ++k) {
                const scalar_t* hk = h + k * E;
                const A ck = c[k];
                for (int64_t i = 0; i < n; ++i) f[i] = f[i] + static_cast<A>(hk[i]) * ck;
              }
              // the forecast in the history's dtype, as taylor_forecast returns it
              for (int64_t i = 0; i < n; ++i) f[i] = static_cast<A>(static_cast<scalar_t>(f[i]));
            }
            if (sv.gated) {
              const A* g = gA[s].data() + (sv.gate_batch == 1 ? 0 : b * D) + d0;
              for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<A>(static_cast<scalar_t>(acc[i] + g[i] * f[i]));
            } else {
              for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<A>(static_cast<scalar_t>(acc[i] + f[i]));
            }
          }
          for (int64_t i = 0; i < n; ++i) op[base + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  });
  return out;
}

void taylor_update_slots(at::TensorList histories, at::TensorList fs, const at::Tensor& dx, const at::Tensor& valid,
                         const at::Tensor& store) {
  constexpr const char* kOp = "fastcache::taylor_update_slots";
  TORCH_CHECK(histories.size() == fs.size(), kOp, ": histories has ", histories.size(), " entries but fs has ",
              fs.size(), "; pass one new feature per history.");
  for (size_t i = 0; i < histories.size(); ++i) taylor_update(histories[i], fs[i], dx, valid, store);
}

}  // namespace fastcache
