// fastcache._C: registers the C++ CPU kernels with the dispatcher (so that
// torch.ops.fastcache.<op> on CPU tensors runs them) and exposes the same functions, plus
// the CPU-variant controls, to Python through pybind11.
//
// The schemas are defined in Python (fastcache/ops/_library.py imports this module right
// after defining them). The kernels are registered from the module init rather than by a
// static TORCH_LIBRARY_IMPL(fastcache, CPU, m) block: a static registrar that throws
// (say, a C++ signature that no longer matches an edited schema) runs inside dlopen and
// aborts the process, whereas here it becomes an ImportError and fastcache falls back to
// the eager reference with a warning.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "cpu_dispatch.h"
#include "ops.h"

namespace py = pybind11;

namespace {

void register_cpu_kernels() {
  // Same as the body of TORCH_LIBRARY_IMPL(fastcache, CPU, m). If any impl() throws, the
  // Library's destructor removes the registrations made so far: nothing half-registered.
  auto m =
      std::make_unique<torch::Library>(torch::Library::IMPL, "fastcache", c10::DispatchKey::CPU, __FILE__, __LINE__);
  m->impl("modulated_rel_l1_sums", TORCH_FN(fastcache::modulated_rel_l1_sums));
  m->impl("rel_l1_sums", TORCH_FN(fastcache::rel_l1_sums));
  m->impl("cache_decision", TORCH_FN(fastcache::cache_decision));
  m->impl("timestep_guard", TORCH_FN(fastcache::timestep_guard));
  m->impl("gated_residual", TORCH_FN(fastcache::gated_residual));
  m->impl("gated_residual_out", TORCH_FN(fastcache::gated_residual_out));
  m->impl("apply_residual", TORCH_FN(fastcache::apply_residual));
  m->impl("apply_residual_out", TORCH_FN(fastcache::apply_residual_out));
  m->impl("store_residual", TORCH_FN(fastcache::store_residual));
  m->impl("taylor_forecast", TORCH_FN(fastcache::taylor_forecast));
  m->impl("taylor_update", TORCH_FN(fastcache::taylor_update));
  m->impl("forecast_residual", TORCH_FN(fastcache::forecast_residual));
  m->impl("taylor_update_slots", TORCH_FN(fastcache::taylor_update_slots));
  m->impl("history_combine", TORCH_FN(fastcache::history_combine));
  // Kept for the life of the process (the dispatcher holds the kernels).
  static torch::Library* registered = m.release();
  (void)registered;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastcache's C++ CPU kernels (csrc/). Importing registers them as the CPU implementation of "
      "torch.ops.fastcache.*; the functions below call the kernels directly.";
  try {
    fastcache::cpu::init_capability_from_env();
  } catch (const std::exception& e) {
    throw py::import_error(std::string("fastcache._C: ") + e.what());
  }
  const std::string why =
      "fastcache._C could not register its CPU kernels with the dispatcher (do the schemas in "
      "fastcache/ops/_library.py still match the C++ signatures in csrc/ops.h? Rebuild with `pip install -e . "
      "--no-build-isolation`): ";
  try {
    register_cpu_kernels();
  } catch (const c10::Error& e) {
    throw py::import_error(why + e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw py::import_error(why + e.what());
  }

  m.def("modulated_rel_l1_sums", &fastcache::modulated_rel_l1_sums, py::arg("x"), py::arg("shift"), py::arg("scale"),
        py::arg("eps"), py::arg("prev"), py::arg("hold") = py::none(),
        "LN(x)*(1+scale)+shift vs prev: (B, 2) [sum|m-prev|, sum|prev|]; prev <- m unless hold. x, prev (B, N, D); "
        "shift, scale (B, D).");
  m.def("rel_l1_sums", &fastcache::rel_l1_sums, py::arg("x"), py::arg("prev"), py::arg("write_prev"),
        py::arg("hold") = py::none(),
        "(B, 2) [sum|x-prev|, sum|prev|] per batch element; prev <- x if write_prev and not hold.");
  m.def("cache_decision", &fastcache::cache_decision, py::arg("sums"), py::arg("timestep"), py::arg("coeffs"),
        py::arg("state"), py::arg("threshold"), py::arg("warmup"), py::arg("max_skips"), py::arg("num_steps"),
        py::arg("hold") = py::none(), py::arg("accumulate") = true,
        "One TeaCache decision on the state tensor (updated in place); returns a 0-dim bool, True = compute. "
        "hold set: state untouched, True. accumulate=False: compute iff this step's distance >= threshold.");
  m.def("timestep_guard", &fastcache::timestep_guard, py::arg("timestep"), py::arg("state"), py::arg("aux"),
        py::arg("rtol"), py::arg("atol"), py::arg("num_steps"),
        "(t_op (1,) fp32, hold 0-dim bool): the timestep the decision sees and the repeated-call flag; aux "
        "counters updated in place.");
  m.def("gated_residual", &fastcache::gated_residual, py::arg("x"), py::arg("gate"), py::arg("cached"),
        py::arg("trend"), py::arg("w"), "x + gate[:, None] * (cached * (1 + w * trend)) in fp32, x.dtype out.");
  m.def("gated_residual_out", &fastcache::gated_residual_out, py::arg("x"), py::arg("gate"), py::arg("cached"),
        py::arg("trend"), py::arg("w"), py::arg("out"), "gated_residual written into out (which may be x).");
  m.def("apply_residual", &fastcache::apply_residual, py::arg("x"), py::arg("r"), "x + r in fp32, x.dtype out.");
  m.def("apply_residual_out", &fastcache::apply_residual_out, py::arg("x"), py::arg("r"), py::arg("out"),
        "out <- x + r (out may be x or r: in place).");
  m.def("store_residual", &fastcache::store_residual, py::arg("out"), py::arg("x_in"), py::arg("flag"), py::arg("r"),
        "r <- out - x_in if flag.");
  m.def("taylor_forecast", &fastcache::taylor_forecast, py::arg("history"), py::arg("dx"),
        "sum_k history[k] * dx^k / k! (TaylorSeer forecast), fp32 math, history.dtype out.");
  m.def("taylor_update", &fastcache::taylor_update, py::arg("history"), py::arg("f"), py::arg("dx"), py::arg("valid"),
        py::arg("store"), "TaylorSeer finite-difference update of history in place, if store.");
  // forecast_residual / taylor_update_slots take lists of tensors (Tensor?[]): they are
  // reached through the dispatcher (torch.ops.fastcache.*), which runs these CPU kernels.
  m.def("history_combine", &fastcache::history_combine, py::arg("history"), py::arg("weights"),
        "sum_k weights[k] * history[k] (a fitted forecast), fp32 math, history.dtype out.");

  m.def("cpu_capability", &fastcache::cpu::active_capability,
        "The CPU kernel variant in use: 'baseline', 'avx2' or 'avx512'.");
  m.def("set_cpu_capability", &fastcache::cpu::set_capability, py::arg("name"),
        "Switch the CPU kernel variant (one of supported_cpu_capabilities()); returns the previous one.");
  m.def("compiled_cpu_capabilities", &fastcache::cpu::compiled_capabilities,
        "The CPU kernel variants built into this extension.");
  m.def("supported_cpu_capabilities", &fastcache::cpu::supported_capabilities,
        "The compiled variants this CPU can run, lowest first.");
  m.attr("STATE_HEADER") = fastcache::state::HEADER;
  m.attr("MAX_COEFFS") = fastcache::state::MAX_COEFFS;
  m.attr("AUX_SIZE") = fastcache::aux::SIZE;
  m.attr("AUX_INDEX") = py::dict(py::arg("AUX_REPEATS") = fastcache::aux::REPEATS,
                                 py::arg("AUX_LAST_RUN_STEPS") = fastcache::aux::LAST_RUN_STEPS,
                                 py::arg("AUX_RUN_LENGTH_MISMATCHES") = fastcache::aux::RUN_LENGTH_MISMATCHES,
                                 py::arg("AUX_JITTER") = fastcache::aux::JITTER);
  m.attr("STATE_INDEX") =
      py::dict(py::arg("ACC") = fastcache::state::ACC, py::arg("STEP") = fastcache::state::STEP,
               py::arg("SKIPS") = fastcache::state::SKIPS, py::arg("PREV_T") = fastcache::state::PREV_T,
               py::arg("RATIO") = fastcache::state::RATIO, py::arg("RESCALED") = fastcache::state::RESCALED,
               py::arg("FLAG") = fastcache::state::FLAG, py::arg("N_COMPUTED") = fastcache::state::N_COMPUTED,
               py::arg("N_SKIPPED") = fastcache::state::N_SKIPPED, py::arg("N_RUNS") = fastcache::state::N_RUNS);
}
