// Run-time choice of the CPU kernel variant (baseline / avx2 / avx512).
#pragma once

#include <string>
#include <vector>

#include "kernel_table.h"

namespace fastcache::cpu {

// The kernels of the active variant (the best one the CPU supports unless
// FASTCACHE_CPU_CAPABILITY or set_capability() asked for a lower one).
const KernelTable& active_kernels();
std::string active_capability();
std::vector<std::string> compiled_capabilities();   // built into this extension
std::vector<std::string> supported_capabilities();  // compiled AND runnable on this CPU

// Select a variant by name (baseline|avx2|avx512, "default" = baseline); returns the
// previous one. Throws std::invalid_argument for an unknown or unsupported name.
std::string set_capability(const std::string& name);

// Apply FASTCACHE_CPU_CAPABILITY if set (same names, "" = best); throws like above.
void init_capability_from_env();

}  // namespace fastcache::cpu
