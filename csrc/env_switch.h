// On/off switches read from the environment once, on first use (persistent CUDA kernels,
// subnormal flushing): the value's spelling, in one place.
#pragma once

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

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

// A run-time choice among fixed names (the CPU's bf16 product, its GEMM library): the first
// name unless the environment variable holds another of them, then changed by a setter op.
// Thread-safe; the caller checks a new value is one of the names.
class EnvChoice {
 public:
  EnvChoice(const char* env_name, std::initializer_list<const char*> names)
      : names_(names.begin(), names.end()), value_(names_.front()) {
    const char* env = std::getenv(env_name);
    if (env != nullptr && is_name(env)) value_ = env;
  }
  bool is_name(const std::string& value) const {
    for (const std::string& name : names_) {
      if (name == value) return true;
    }
    return false;
  }
  std::string get() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return value_;
  }
  std::string exchange(const std::string& value) {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::string previous = value_;
    value_ = value;
    return previous;
  }

 private:
  std::vector<std::string> names_;
  std::string value_;
  mutable std::mutex mutex_;
};

}  // namespace lstm_fused
