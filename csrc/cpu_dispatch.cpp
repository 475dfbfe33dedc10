// Run-time choice of the CPU kernel variant. Compiled for the baseline ISA: it must run
// (and refuse cleanly) on any CPU.
#include "cpu_dispatch.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

namespace fastcache::cpu {
namespace {

enum Capability : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kNumCapabilities = 3 };
constexpr const char* kNames[kNumCapabilities] = {"baseline", "avx2", "avx512"};

bool compiled(Capability c) {
#ifdef FASTCACHE_HAVE_X86_VARIANTS
  (void)c;
  return true;
#else
  return c == kBaseline;
#endif
}

bool cpu_supports(Capability c) {
  if (c == kBaseline) return true;
#if defined(FASTCACHE_HAVE_X86_VARIANTS) && (defined(__GNUC__) || defined(__clang__))
  // libgcc / compiler-rt also check that the OS saves the ymm / zmm state (XGETBV).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("lzcnt") && __builtin_cpu_supports("popcnt");
  if (c == kAvx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
#else
  return false;
#endif
}

const KernelTable* table_for(Capability c) {
  switch (c) {
#ifdef FASTCACHE_HAVE_X86_VARIANTS
    case kAvx512:
      return AVX512::kernel_table();
    case kAvx2:
      return AVX2::kernel_table();
#endif
    default:
      return DEFAULT::kernel_table();
  }
}

Capability best() {
  for (int c = kNumCapabilities - 1; c > kBaseline; --c) {
    if (compiled(Capability(c)) && cpu_supports(Capability(c))) return Capability(c);
  }
  return kBaseline;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& e : v) s += (s.empty() ? "" : ", ") + e;
  return s;
}

Capability parse(std::string name, const char* source) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (name == "default") name = "baseline";
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (name != kNames[c]) continue;
    if (!compiled(Capability(c))) {
      throw std::invalid_argument(std::string(source) + "='" + name + "': this build of fastcache._C has no " + name +
                                  " kernels (compiled: " + join(compiled_capabilities()) + ").");
    }
    if (!cpu_supports(Capability(c))) {
      throw std::invalid_argument(std::string(source) + "='" + name + "': this CPU cannot run the " + name +
                                  " kernels (it supports: " + join(supported_capabilities()) +
                                  "); choose one of those or unset it.");
    }
    return Capability(c);
  }
  throw std::invalid_argument(std::string(source) + "='" + name +
                              "' is not a CPU kernel variant; use baseline, avx2 or avx512 (or leave it unset "
                              "for the best one this CPU supports).");
}

struct Active {
  explicit Active(Capability c) : capability(c), table(table_for(c)) {}
  std::atomic<int> capability;
  std::atomic<const KernelTable*> table;
};

Active& active() {
  static Active a(best());  // thread-safe initialisation, on first use
  return a;
}

}  // namespace

const KernelTable& active_kernels() { return *active().table.load(); }

std::string active_capability() { return kNames[active().capability.load()]; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> out;
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (compiled(Capability(c))) out.emplace_back(kNames[c]);
  }
  return out;
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (compiled(Capability(c)) && cpu_supports(Capability(c))) out.emplace_back(kNames[c]);
  }
  return out;
}

std::string set_capability(const std::string& name) {
  const Capability c = parse(name, "cpu capability");
  Active& a = active();
  const std::string previous = kNames[a.capability.load()];
  a.table.store(table_for(c));
  a.capability.store(c);
  return previous;
}

void init_capability_from_env() {
  const char* env = std::getenv("FASTCACHE_CPU_CAPABILITY");
  if (env == nullptr || env[0] == '\0') return;
  const Capability c = parse(env, "FASTCACHE_CPU_CAPABILITY");
  Active& a = active();
  a.table.store(table_for(c));
  a.capability.store(c);
}

}  // namespace fastcache::cpu
