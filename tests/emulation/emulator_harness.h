// What the emulator programs (persistent_emulator.cpp, steps_emulator.cpp) share besides the
// emulation itself: random data, the comparison of a kernel's results with a float64
// reference, the bit-identity check across scheduling orders, and the command line:
//
//   <emulator> [case-name ...]      all cases when none is named
//   <emulator> --list               the case names
//
// One line per case, PASS or FAIL with the reason; exit status 1 if any case failed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace emu {

const Order kOrders[] = {Order::kForward, Order::kReverse, Order::kShuffled};

template <typename T = float>
std::vector<T> randn(std::mt19937& rng, int64_t n, double scale) {
  std::normal_distribution<T> dist(T(0), static_cast<T>(scale));
  std::vector<T> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// "" when got matches want within |got - want| <= tol + tol |want|, else the first mismatch.
// A NaN in want marks a place the kernel must not write (got stays NaN, as it started).
// (stride, col, width): got is a strided matrix, compare columns [col, col + width) of it.
template <typename T>
std::string compare(const char* what, const std::vector<T>& got, const std::vector<double>& want,
                    double tol, int64_t stride = 0, int64_t col = 0, int64_t width = 0) {
  const int64_t n = static_cast<int64_t>(want.size());
  for (int64_t e = 0; e < n; ++e) {
    const int64_t g = stride ? (e / width) * stride + col + e % width : e;
    const double a = got[g], b = want[e];
    const bool ok = std::isnan(b) ? std::isnan(a) : std::fabs(a - b) <= tol + tol * std::fabs(b);
    if (!ok) {
      std::ostringstream os;
      os.precision(17);
      os << what << "[" << e << "] = " << a << ", want " << b;
      if (std::isnan(b)) os << " (not to be written)";
      return os.str();
    }
  }
  return "";
}

// One named result and what it must be, for compare_all.
template <typename T>
struct Expected {
  const char* what;
  std::vector<T> got;
  const std::vector<double>& want;
};

// compare() over each result in turn: "" when all match, else the first mismatch.
template <typename T>
std::string compare_all(std::initializer_list<Expected<T>> results, double tol) {
  for (const Expected<T>& r : results) {
    std::string e = compare(r.what, r.got, r.want, tol);
    if (!e.empty()) return e;
  }
  return "";
}

// The first order's results are the reference; any later order must give the same bits.
template <typename T>
bool same_bits_as_first(std::vector<T>& first, const std::vector<T>& all) {
  if (first.empty()) {
    first = all;
    return true;
  }
  return first.size() == all.size() &&
         std::memcmp(all.data(), first.data(), all.size() * sizeof(T)) == 0;
}

// The command line over `cases` (each with a `name`); run(case, info) returns "" or the
// failure, and may fill `info` with what the case ran (launch shapes).
template <typename Case, typename Run>
int run_cases(int argc, char** argv, const std::vector<Case>& cases, Run run) {
  std::vector<std::string> wanted(argv + 1, argv + argc);
  if (wanted.size() == 1 && wanted[0] == "--list") {
    for (const Case& c : cases) std::cout << c.name << "\n";
    return 0;
  }
  int failed = 0, ran = 0;
  for (const Case& c : cases) {
    const bool named = std::find(wanted.begin(), wanted.end(), c.name) != wanted.end();
    if (!wanted.empty() && !named) continue;
    ++ran;
    std::string info, error;
    try {
      error = run(c, info);
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (error.empty()) {
      std::cout << "PASS " << c.name << " (" << info << ")" << std::endl;
    } else {
      ++failed;
      std::cout << "FAIL " << c.name << " (" << info << "): " << error << std::endl;
    }
  }
  if (ran == 0) {
    std::cout << "no such case" << std::endl;
    return 2;
  }
  return failed ? 1 : 0;
}

}  // namespace emu
