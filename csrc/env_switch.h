// On/off switches read from the environment once, on first use (persistent CUDA kernels,
// subnormal flushing): the value's spelling, in one place.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lstm_fused {

// true for 1/true/yes/on, false for 0/false/no/off (any case of those), else `fallback`
// (unset or another value).
inline bool env_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  for (const char* on : {"1", "true", "yes", "on", "TRUE", "True", "YES", "ON"}) {
    if (std::strcmp(value, on) == 0) return true;
  }
  for (const char* off : {"0", "false", "no", "off", "FALSE", "False", "NO", "OFF"}) {
    if (std::strcmp(value, off) == 0) return false;
  }
  return fallback;
}

}  // namespace lstm_fused
