// Runs the CUDA step kernels (csrc/cuda/lstm_steps_kernels.cuh) on the CPU under
// cuda_emulation.h and checks them against a float64 reference of their semantics
// (lstm_steps.h: ForwardStepArgs / HiddenGradStepArgs / BackwardStepArgs, as the CPU twin
// csrc/cpu/lstm_steps_cpu.cpp implements them; gate formulas of lstm_cell.h written out here).
// Command line and output: emulator_harness.h.
//
// Launches as lstm_steps_cuda.cu's host side does: the vector width from the same
// *_vectorizable predicates, the grids from the same blocks_for / reduce_grid, 256 threads,
// the fast path or the two-stage reduction by the same flags. Each hidden-grad and backward
// case runs every flag set (clip off / value / norm that rescales / norm that does not, each
// with and without sum_squares). Checks:
//  - the vector width the case is built for;
//  - close to the reference (float: |d| <= 1e-4 + 1e-4|ref|, double: 1e-10);
//  - every output written and nothing else: write-only outputs start as NaN; in-place
//    buffers' inactive rows, other columns and sum_squares when not asked for must keep their
//    values; every buffer sits between NaN guards; the c[t-1] source a row must not read is NaN;
//  - the three scheduling orders bit-identical (a difference is a race).
// The variants-* cases run the cell variants' kernels (one block per row) against the
// formulas of docs/ARCHITECTURE.md in float64, every flag set for the backward.
// The "emulator" case checks the emulation itself (shuffles, per-block __shared__, the
// divergence errors). The mutations this was checked with: tests/test_steps_emulated.py.
#include "cuda_emulation.h"
#include "emulator_harness.h"

#include "cuda/lstm_steps_kernels.cuh"

#include <functional>
#include <sstream>
#include <string>
#include <vector>

using namespace lstm_fused;
using namespace lstm_fused::cuda::steps_detail;

namespace {

// ------------------------------------------------------------------------------------------
// Launches, as lstm_steps_cuda.cu's host side (stream order: one kernel after the other).
// ------------------------------------------------------------------------------------------
struct Schedule {
  emu::Order order;
  unsigned seed;
};

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, const Schedule& s, const Args&... args) {
  emu::launch_kernel(kernel, static_cast<int>(blocks), kThreads, s.order, s.seed, args...);
}

// Runtime clip mode / telemetry flag -> template arguments, as the .cu's dispatch_* do.
template <typename Launch>
void dispatch_flags(int64_t clip_mode, bool sums, const Launch& run) {
  switch (clip_mode) {
    case kClipValue:
      return sums ? run.template operator()<kClipValue, true>()
                  : run.template operator()<kClipValue, false>();
    case kClipNorm:
      return sums ? run.template operator()<kClipNorm, true>()
                  : run.template operator()<kClipNorm, false>();
    default:
      return sums ? run.template operator()<kClipOff, true>()
                  : run.template operator()<kClipOff, false>();
  }
}

// run.operator()<VEC>() with VEC as the host side picks it; returns VEC.
template <typename T, typename Run>
int with_vec(bool vectorizable, const Run& run) {
  if (vectorizable) {
    run.template operator()<kVec<T>>();
    return kVec<T>;
  }
  run.template operator()<1>();
  return 1;
}

// A hidden-grad or backward step: the two-stage reduction when telemetry or norm clipping is
// asked for, else the fast path (nothing to launch without elements), as the .cu's
// launch_hidden_grad / launch_backward.
template <int64_t kClip, bool kSums, typename Args, typename Partial, typename Finish,
          typename Fast>
void launch_gradient_step(const Args& args, int64_t count, const Schedule& s, Partial partial,
                          Finish finish, Fast fast) {
  if constexpr (kClip == kClipNorm || kSums) {
    const ReduceGrid grid = reduce_grid(count, kClip == kClipNorm);
    launch(partial, grid.partial_blocks, s, args);
    launch(finish, grid.finish_blocks, s, args, grid.partial_blocks);
  } else if (count > 0) {
    launch(fast, blocks_for(count), s, args);
  }
}

// Each returns the vector width it ran with.
template <typename T>
int forward_step(const ForwardStepArgs<T>& args, const Schedule& s) {
  return with_vec<T>(forward_vectorizable(args), [&]<int VEC>() {
    const int64_t count = args.rows * (args.hidden / VEC);
    if (count > 0) launch(forward_step_kernel<T, VEC>, blocks_for(count), s, args);
  });
}

template <typename T>
int hidden_grad_step(const HiddenGradStepArgs<T>& args, const Schedule& s) {
  return with_vec<T>(hidden_grad_vectorizable(args), [&]<int VEC>() {
    const int64_t count = args.rows * (args.size / VEC);
    dispatch_flags(args.clip_mode, args.sum_squares != nullptr, [&]<int64_t kClip, bool kSums>() {
      launch_gradient_step<kClip, kSums>(args, count, s, hidden_grad_partial_kernel<T, VEC, kClip>,
                                         hidden_grad_finish_kernel<T, VEC, kClip, kSums>,
                                         hidden_grad_kernel<T, VEC, kClip>);
    });
  });
}

template <typename T>
int backward_step(const BackwardStepArgs<T>& args, const Schedule& s) {
  return with_vec<T>(backward_vectorizable(args), [&]<int VEC>() {
    const int64_t count = args.rows * (args.hidden / VEC);
    dispatch_flags(args.clip_mode, args.sum_squares != nullptr, [&]<int64_t kClip, bool kSums>() {
      // norm clipping: stage 1 stores the unclipped dc (pass 1), stage 2 finishes (pass 2)
      constexpr int kPass = kClip == kClipNorm ? 1 : 0;
      launch_gradient_step<kClip, kSums>(args, count, s,
                                         backward_partial_kernel<T, VEC, kClip, kPass>,
                                         backward_finish_kernel<T, VEC, kClip, kSums>,
                                         backward_step_kernel<T, VEC, kClip>);
    });
  });
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------
enum class Kind { kForward, kHiddenGrad, kBackward, kRowsZero, kEmulator, kVariantsForward,
                  kVariantsBackward, kBits16 };

struct Case {
  std::string name;
  Kind kind;
  bool is_double;
  int64_t rows, batch, hidden;  // active rows, allocated rows, H (P for the hidden gradient)
  int vec;                      // the vector width the host side must pick for this case
  int64_t stride = 0;           // output / grad_output row stride; 0: none (null)
  int64_t column = 0;           // this direction's first column in output / grad_output
  int64_t prev_split = 0;       // backward: rows below it continue from cells_prev
  bool misalign_grad_r = false; // backward: grad_r one value off 16 bytes (VEC 1, H aligned)
  int orders = 3;               // scheduling orders to run and compare
  bool grid_stride = false;     // the reduction must need more than one element per thread
  std::vector<std::string> flag_sets = {};  // hidden-grad / backward: empty = all of kFlagSets
  unsigned variants = 0;        // cell variants (CellVariant bits) of a kVariants* case
  bool variant_masks = true;    // zoneout by per-row masks (training), else by probability
};

// One way to call hidden-grad / backward. norm_fraction: clip = this fraction of the
// unclipped norm (< 1 rescales, > 1 does not); value clipping clamps at kValueClip.
struct FlagSet {
  const char* name;
  int64_t clip_mode;
  double norm_fraction;
  bool sums;
};
constexpr double kValueClip = 0.5;
const FlagSet kFlagSets[] = {
    {"off", kClipOff, 0, false},          {"off+sums", kClipOff, 0, true},
    {"value", kClipValue, 0, false},      {"value+sums", kClipValue, 0, true},
    {"norm", kClipNorm, 0.5, false},      {"norm+sums", kClipNorm, 0.5, true},
    {"norm-above", kClipNorm, 2, false},  {"norm-above+sums", kClipNorm, 2, true},
};

std::vector<FlagSet> flag_sets_of(const Case& c) {
  std::vector<FlagSet> v;
  for (const FlagSet& f : kFlagSets) {
    if (c.flag_sets.empty() ||
        std::find(c.flag_sets.begin(), c.flag_sets.end(), f.name) != c.flag_sets.end()) {
      v.push_back(f);
    }
  }
  return v;
}

const double kNaN = std::nan("");

template <typename T>
double tolerance() {
  return sizeof(T) == 4 ? 1e-4 : 1e-10;
}

// A device buffer stand-in: n values, 16-byte aligned (or `misalign` values past that), NaN
// until written, between guards of NaN that values() checks (a write out of bounds throws).
// Not copyable: data() must stay where it is.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n, int64_t misalign = 0)
      : storage_(n + 2 * kGuard + 16 / sizeof(T), T(kNaN)), size_(n) {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data() + kGuard);
    start_ = kGuard + static_cast<int64_t>((16 - address % 16) % 16 / sizeof(T)) + misalign;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return storage_.data() + start_; }
  std::vector<T> values() const {
    for (int64_t k = 0; k < static_cast<int64_t>(storage_.size()); ++k) {
      if ((k < start_ || k >= start_ + size_) && !std::isnan(storage_[k])) {
        throw std::runtime_error("a kernel wrote out of a buffer's bounds");
      }
    }
    return std::vector<T>(storage_.begin() + start_, storage_.begin() + start_ + size_);
  }
  // The first `values.size()` values, from `values`.
  void fill(const std::vector<T>& values) { std::copy(values.begin(), values.end(), data()); }

 private:
  static constexpr int64_t kGuard = 16;
  std::vector<T> storage_;
  int64_t start_ = 0, size_ = 0;
};

// The values of an in-place buffer, as the reference's starting point: inactive rows (and any
// place the kernel must not write) keep them.
template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The clip to pass to the kernel and the step's sum of squares after clipping.
struct Clipped {
  double clip, sum_squares;
};

// Clips the gradient g[0, count) of a step (its active rows) in the reference, as lstm_steps.h
// says: clamp each value to [-clip, clip], or rescale so that the L2 norm is at most clip.
Clipped clip_reference(std::vector<double>& g, int64_t count, const FlagSet& flags) {
  double sum = 0;
  for (int64_t e = 0; e < count; ++e) {
    if (flags.clip_mode == kClipValue) g[e] = std::min(std::max(g[e], -kValueClip), kValueClip);
    sum += g[e] * g[e];
  }
  if (flags.clip_mode != kClipNorm) return {kValueClip, sum};
  const double norm = std::sqrt(sum), clip = flags.norm_fraction * norm;
  const double scale = norm > clip ? clip / norm : 1.0;
  for (int64_t e = 0; e < count; ++e) g[e] *= scale;
  return {clip, sum * scale * scale};
}

// All of a run's outputs in one vector, for the bit comparison across orders.
template <typename T>
std::vector<T> concat(std::initializer_list<std::vector<T>> parts) {
  std::vector<T> all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

const char* const kRace = "results depend on the scheduling order (race)";

std::string check_vec(const Case& c, int vec) {
  if (vec == c.vec) return "";
  return "ran with VEC " + std::to_string(vec) + ", want " + std::to_string(c.vec);
}

std::string describe_grid(int64_t count, bool reduction, bool norm) {
  std::ostringstream os;
  if (reduction) {
    const ReduceGrid g = reduce_grid(count, norm);
    os << "blocks " << g.partial_blocks << "+" << g.finish_blocks;
  } else {
    os << "blocks " << (count > 0 ? blocks_for(count) : 0);
  }
  return os.str();
}

// The grids of a hidden-grad / backward case into info; "" or why the case misses its point.
std::string check_shape(const Case& c, int64_t count, std::string& info) {
  info = describe_grid(count, false, false) + ", reduction " + describe_grid(count, true, true);
  if (c.grid_stride && count <= int64_t(reduce_grid(count, true).partial_blocks) * kThreads) {
    return "the case does not reach the reduction's grid-stride loop";
  }
  return "";
}

// ------------------------------------------------------------------------------------------
// The 16-bit mode's rounding (bits16.h) against the definition of rounding to nearest, ties
// to even: the result's value is at least as near to the input as either neighbour's (the
// infinity counting as the next power of two past the largest finite value, as IEEE 754's
// overflow rule has it), an exact tie picks the even one, the sign is kept, a NaN gives
// torch's NaN (bfloat16 0x7FC0, float16 sign | 0x7E00).
// ------------------------------------------------------------------------------------------
double decode_bits16(Bits16 format, uint32_t magnitude) {
  if (format == Bits16::kBFloat16) {
    if (magnitude == 0x7f80u) return std::ldexp(1.0, 128);
    const uint32_t bits = magnitude << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  const uint32_t exponent = magnitude >> 10, fraction = magnitude & 1023u;
  if (exponent == 31) return 65536.0;  // infinity (the tests stay below NaNs)
  return exponent == 0 ? std::ldexp(double(fraction), -24)
                       : std::ldexp(double(1024 + fraction), int(exponent) - 25);
}

std::string check_rounding(Bits16 format, float input, uint16_t got) {
  uint32_t input_bits;
  std::memcpy(&input_bits, &input, sizeof input_bits);
  const uint32_t infinity = format == Bits16::kBFloat16 ? 0x7f80u : 0x7c00u;
  std::ostringstream os;
  os << std::hex << "input 0x" << input_bits << " gave 0x" << got << ": ";
  if (std::isnan(input)) {
    const bool ok = format == Bits16::kBFloat16 ? got == 0x7fc0 : (got & 0x7fffu) == 0x7e00u;
    return ok ? "" : os.str() + "not torch's NaN";
  }
  if ((got >> 15) != (input_bits >> 31)) return os.str() + "sign changed";
  const uint32_t magnitude = got & 0x7fffu;
  if (magnitude > infinity) return os.str() + "NaN for a number";
  const double v = std::fabs(double(input)), here = std::fabs(v - decode_bits16(format, magnitude));
  for (int step : {-1, 1}) {
    if ((step < 0 && magnitude == 0) || (step > 0 && magnitude == infinity)) continue;
    const double there = std::fabs(v - decode_bits16(format, magnitude + step));
    if (there < here || (there == here && (magnitude & 1u))) {
      return os.str() + "not the nearest (ties to even)";
    }
  }
  if (std::isinf(input) && magnitude != infinity) return os.str() + "infinity not kept";
  return "";
}

// TF32's rounding (tf32_round, the persistent kernels' TF32 product) against its definition:
// the nearer of the two TF32 values around the input (the low 13 bits cleared, or one TF32
// step further from zero; infinity counting as 2^128), ties away from zero; NaN stays NaN.
std::string check_tf32_rounding(float input, float got) {
  uint32_t input_bits, got_bits;
  std::memcpy(&input_bits, &input, sizeof input_bits);
  std::memcpy(&got_bits, &got, sizeof got_bits);
  std::ostringstream os;
  os << std::hex << "tf32: input 0x" << input_bits << " gave 0x" << got_bits << ": ";
  if (std::isnan(input)) return std::isnan(got) ? "" : os.str() + "NaN not kept";
  const uint32_t sign = input_bits & 0x80000000u, toward_zero = input_bits & 0xffffe000u;
  auto magnitude_of = [](uint32_t bits) {
    if ((bits & 0x7fffffffu) == 0x7f800000u) return std::ldexp(1.0, 128);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return std::fabs(double(value));
  };
  uint32_t want = toward_zero;
  if (!std::isinf(input) && toward_zero != input_bits) {
    const uint32_t away = ((toward_zero & 0x7fffffffu) + 0x2000u) | sign;
    const double v = std::fabs(double(input));
    const double below = v - magnitude_of(toward_zero), above = magnitude_of(away) - v;
    if (above <= below) want = away;  // a tie goes away from zero
  }
  return got_bits == want ? "" : os.str() + "not the nearest (ties away from zero)";
}

std::string run_bits16_rounding(const Case& c, std::string& info) {
  // Inputs: the edges (zeros, infinities, NaNs, the float16 overflow and subnormal bounds,
  // exact ties of both formats), then random bit patterns over the whole float range.
  std::vector<uint32_t> patterns = {
      0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
      0x7f800001u, 0x00000001u, 0x807fffffu, 0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu,
      0x477fe000u, 0x477fefffu, 0x477ff000u, 0xc77ff000u, 0x477fffffu, 0x47800000u,
      0x38800000u, 0x387fffffu, 0x387fe000u, 0x387ff000u, 0x33800000u, 0x33000000u,
      0x33000001u, 0x32ffffffu, 0xb3000000u, 0x33c00000u, 0x34200000u, 0x3f808000u,
      0x3f818000u, 0x3f801000u, 0x3f803000u, 0x3f800fffu};
  std::mt19937 rng(7);
  while (patterns.size() < static_cast<size_t>(c.rows * c.hidden)) {
    const uint32_t bits = rng();
    patterns.push_back(bits);
    // ties: the bits below bfloat16's / float16's last kept bit exactly half
    patterns.push_back((bits & 0xffff0000u) | 0x8000u);
    patterns.push_back((bits & 0xffffe000u) | 0x1000u);
  }
  info = std::to_string(patterns.size()) + " values, bfloat16, float16 and TF32";
  for (const uint32_t bits : patterns) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    for (Bits16 format : {Bits16::kBFloat16, Bits16::kFloat16}) {
      const std::string e = check_rounding(format, value, round_bits16(format, value));
      if (!e.empty()) return e;
    }
    const std::string e = check_tf32_rounding(value, tf32_round(value));
    if (!e.empty()) return e;
  }
  return "";
}

// The 16-bit mode's copy a step kernel writes beside its fp32 result (ForwardStepArgs::
// hidden_16bit, BackwardStepArgs::dgates_16bit): the rounding of the first `active` values
// (round_bits16, checked by bits16-rounding), the rest left as they were (kGuard16).
constexpr uint16_t kGuard16 = 0xabcd;

template <typename T>
std::string check_16bit_copy(const char* what, const std::vector<uint16_t>& copy,
                             const std::vector<T>& values, int64_t active, Bits16 format) {
  for (int64_t idx = 0; idx < static_cast<int64_t>(copy.size()); ++idx) {
    const uint16_t want =
        idx < active ? round_bits16(format, static_cast<float>(values[idx])) : kGuard16;
    if (copy[idx] != want) return std::string(what) + "[" + std::to_string(idx) + "] wrong";
  }
  return "";
}

// ---- forward
template <typename T>
std::string run_forward(const Case& c, std::string& info) {
  const int64_t H = c.hidden, B = c.batch, R = c.rows, S = c.stride;
  std::mt19937 rng(1234);
  std::vector<T> pre = emu::randn<T>(rng, B * 4 * H, 2.0), cell_in = emu::randn<T>(rng, B * H, 1.0);
  // in place: gates, cell_state (inactive rows keep their values); the rest starts as NaN
  std::vector<double> want_gates = as_double(pre), want_cell_state = as_double(cell_in),
                      want_cells(B * H, kNaN), want_hidden(B * H, kNaN), want_output(B * S, kNaN);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < H; ++j) {
      const T* p = &pre[r * 4 * H + j];
      const double i = sigmoid(p[0]), f = sigmoid(p[H]), g = std::tanh(p[2 * H]),
                   o = sigmoid(p[3 * H]);
      const double cell = f * cell_in[r * H + j] + i * g, h = o * std::tanh(cell);
      double* G = &want_gates[r * 4 * H + j];
      G[0] = i, G[H] = f, G[2 * H] = g, G[3 * H] = o;
      want_cell_state[r * H + j] = cell;
      want_cells[r * H + j] = cell;
      want_hidden[r * H + j] = h;
      if (S) want_output[r * S + c.column + j] = h;
    }
  }
  const double tol = tolerance<T>();
  info = describe_grid(R * (H / c.vec), false, false);
  // float: the 16-bit mode's copy of h[t] too (bfloat16 for the vector path, float16 else)
  const bool rounds = std::is_same_v<T, float>;
  const Bits16 format = c.vec > 1 ? Bits16::kBFloat16 : Bits16::kFloat16;
  std::vector<T> first;
  for (int k = 0; k < c.orders; ++k) {
    Buffer<T> gates(B * 4 * H), cell_state(B * H), cells(B * H), hidden(B * H), output(B * S);
    std::vector<uint16_t> hidden_16bit(rounds ? B * H : 0, kGuard16);
    gates.fill(pre);
    cell_state.fill(cell_in);
    ForwardStepArgs<T> a{R, H, gates.data(), cell_state.data(), cells.data(), hidden.data(),
                         S ? output.data() + c.column : nullptr, S};
    if (rounds) {
      a.hidden_16bit = hidden_16bit.data();
      a.format_16bit = format;
    }
    const int vec = forward_step(a, {emu::kOrders[k], 7});
    std::string e;
    if (!(e = check_vec(c, vec)).empty()) return e;
    if (!(e = check_16bit_copy("hidden_16bit", hidden_16bit, hidden.values(), R * H, format))
             .empty()) {
      return e;
    }
    if (!(e = emu::compare_all<T>({{"gates", gates.values(), want_gates},
                                   {"cell_state", cell_state.values(), want_cell_state},
                                   {"cells", cells.values(), want_cells},
                                   {"hidden_state", hidden.values(), want_hidden},
                                   {"output", output.values(), want_output}},
                                  tol))
             .empty()) {
      return e;
    }
    const auto all = concat<T>({gates.values(), cell_state.values(), cells.values(),
                                hidden.values(), output.values()});
    if (!emu::same_bits_as_first(first, all)) return kRace;
  }
  return "";
}

// ---- hidden gradient
template <typename T>
std::string run_hidden_grad_flags(const Case& c, const FlagSet& flags,
                                  const std::vector<T>& dh_next, const std::vector<T>& dy) {
  const int64_t P = c.hidden, B = c.batch, R = c.rows, S = c.stride;
  std::vector<double> want = as_double(dh_next);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < P; ++j) {
      double d = dh_next[r * P + j];
      if (S) d += dy[r * S + c.column + j];
      want[r * P + j] = d;
    }
  }
  const auto [clip, sum] = clip_reference(want, R * P, flags);
  const double tol = tolerance<T>();
  std::vector<T> first;
  for (int k = 0; k < c.orders; ++k) {
    Buffer<T> dhidden(B * P), grad_output(B * S), sum_squares(1), partials(kReduceBlocks);
    dhidden.fill(dh_next);
    grad_output.fill(dy);
    const bool reduction = flags.sums || flags.clip_mode == kClipNorm;
    const HiddenGradStepArgs<T> a{R,
                                  P,
                                  S ? grad_output.data() + c.column : nullptr,
                                  S,
                                  dhidden.data(),
                                  flags.clip_mode,
                                  static_cast<T>(clip),
                                  flags.sums ? sum_squares.data() : nullptr,
                                  reduction ? partials.data() : nullptr};
    const int vec = hidden_grad_step(a, {emu::kOrders[k], 11});
    std::string e;
    if (!(e = check_vec(c, vec)).empty()) return e;
    if (!(e = emu::compare("dhidden", dhidden.values(), want, tol)).empty()) return e;
    if (!(e = emu::compare("sum_squares", sum_squares.values(), {flags.sums ? sum : kNaN}, tol))
             .empty()) {
      return e;
    }
    if (!emu::same_bits_as_first(first, concat<T>({dhidden.values(), sum_squares.values()}))) {
      return kRace;
    }
  }
  return "";
}

template <typename T>
std::string run_hidden_grad(const Case& c, std::string& info) {
  const int64_t P = c.hidden, B = c.batch, R = c.rows, S = c.stride;
  std::mt19937 rng(4321);
  std::vector<T> dh_next = emu::randn<T>(rng, B * P, 1.0), dy = emu::randn<T>(rng, B * S, 1.0);
  const std::string e = check_shape(c, R * (P / c.vec), info);
  if (!e.empty()) return e;
  for (const FlagSet& flags : flag_sets_of(c)) {
    const std::string e = run_hidden_grad_flags(c, flags, dh_next, dy);
    if (!e.empty()) return std::string(flags.name) + ": " + e;
  }
  return "";
}

// ---- backward
template <typename T>
struct BackwardInputs {
  std::vector<T> gates, cells, cells_prev, cell_initial, grad_r, dcell;
  std::vector<T> grad_output;  // [B, kGradOutputStride]: dy of the folded hidden gradient
};

// Row stride of grad_output in the folded runs (a bidirectional layer's 2H with H = 8 columns
// of it read, at column 0; a multiple of every VEC).
constexpr int64_t kGradOutputPad = 8;

// fold: BackwardStepArgs::fold_hidden_grad, grad_r as dh_next and the kernel adding dy[t]
// (clamped with value clipping) itself: the reference's dL/dr is that sum.
template <typename T>
std::string run_backward_flags(const Case& c, const FlagSet& flags, const BackwardInputs<T>& in,
                               bool fold) {
  const int64_t H = c.hidden, B = c.batch, R = c.rows, S = H + kGradOutputPad;
  std::vector<double> want_dgates(B * 4 * H, kNaN), want_dcell = as_double(in.dcell);
  std::vector<double> dc(R * H), dr = as_double(in.grad_r);
  if (fold) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < H; ++j) {
        double& d = dr[r * H + j];
        d += in.grad_output[r * S + j];
        if (flags.clip_mode == kClipValue) d = std::min(std::max(d, -kValueClip), kValueClip);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < H; ++j) {
      const T* G = &in.gates[r * 4 * H + j];
      const double t = std::tanh(double(in.cells[r * H + j]));
      dc[r * H + j] = in.dcell[r * H + j] + dr[r * H + j] * G[3 * H] * (1 - t * t);
    }
  }
  const auto [clip, sum] = clip_reference(dc, R * H, flags);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < H; ++j) {
      const T* G = &in.gates[r * 4 * H + j];
      const double i = G[0], f = G[H], g = G[2 * H], o = G[3 * H], d = dc[r * H + j];
      const double t = std::tanh(double(in.cells[r * H + j]));
      const double cell_prev =
          r < c.prev_split ? in.cells_prev[r * H + j] : in.cell_initial[r * H + j];
      double* D = &want_dgates[r * 4 * H + j];
      D[0] = d * g * i * (1 - i);
      D[H] = d * cell_prev * f * (1 - f);
      D[2 * H] = d * i * (1 - g * g);
      D[3 * H] = dr[r * H + j] * t * o * (1 - o);
      want_dcell[r * H + j] = d * f;
    }
  }
  const double tol = tolerance<T>();
  std::vector<T> first;
  for (int k = 0; k < c.orders; ++k) {
    Buffer<T> gates(B * 4 * H), cells(B * H), cells_prev(B * H), cell_initial(B * H),
        grad_r(B * H, c.misalign_grad_r ? 1 : 0), dcell(B * H), dgates(B * 4 * H),
        sum_squares(1), partials(kReduceBlocks), grad_output(B * S);
    // float: the 16-bit mode's copy of dG too (bfloat16 for the vector path, float16 else)
    const bool rounds = std::is_same_v<T, float>;
    const Bits16 format = c.vec > 1 ? Bits16::kBFloat16 : Bits16::kFloat16;
    std::vector<uint16_t> dgates_16bit(rounds ? B * 4 * H : 0, kGuard16);
    gates.fill(in.gates);
    cells.fill(in.cells);
    cells_prev.fill(in.cells_prev);
    cell_initial.fill(in.cell_initial);
    grad_r.fill(in.grad_r);
    dcell.fill(in.dcell);
    grad_output.fill(in.grad_output);
    const bool reduction = flags.sums || flags.clip_mode == kClipNorm;
    BackwardStepArgs<T> a;
    a.rows = R;
    a.hidden = H;
    a.gates = gates.data();
    a.cells = cells.data();
    a.cells_prev = c.prev_split > 0 ? cells_prev.data() : nullptr;  // null where no row reads it
    a.cell_initial = c.prev_split < R ? cell_initial.data() : nullptr;
    a.prev_split = c.prev_split;
    a.grad_r = grad_r.data();
    a.dcell = dcell.data();
    a.dgates = dgates.data();
    a.clip_mode = flags.clip_mode;
    a.clip = static_cast<T>(clip);
    a.sum_squares = flags.sums ? sum_squares.data() : nullptr;
    a.partials = reduction ? partials.data() : nullptr;
    if (rounds) {
      a.dgates_16bit = dgates_16bit.data();
      a.format_16bit = format;
    }
    if (fold) {
      a.fold_hidden_grad = true;
      a.grad_output = grad_output.data();
      a.grad_output_stride = S;
    }
    const int vec = backward_step(a, {emu::kOrders[k], 13});
    std::string e;
    if (!(e = check_vec(c, vec)).empty()) return e;
    if (!(e = check_16bit_copy("dgates_16bit", dgates_16bit, dgates.values(), R * 4 * H, format))
             .empty()) {
      return e;
    }
    if (!(e = emu::compare("dgates", dgates.values(), want_dgates, tol)).empty()) return e;
    if (!(e = emu::compare("dcell", dcell.values(), want_dcell, tol)).empty()) return e;
    if (!(e = emu::compare("sum_squares", sum_squares.values(), {flags.sums ? sum : kNaN}, tol))
             .empty()) {
      return e;
    }
    const auto all = concat<T>({dgates.values(), dcell.values(), sum_squares.values()});
    if (!emu::same_bits_as_first(first, all)) return kRace;
  }
  return "";
}

// Activated gates in their ranges: sigmoid for i, f, o, tanh for g.
template <typename T>
std::vector<T> activated_gates(std::mt19937& rng, int64_t rows, int64_t H) {
  std::vector<T> gates = emu::randn<T>(rng, rows * 4 * H, 2.0);
  for (int64_t e = 0; e < rows * 4 * H; ++e) {
    const bool g_gate = (e / H) % 4 == 2;
    gates[e] = static_cast<T>(g_gate ? std::tanh(double(gates[e])) : sigmoid(gates[e]));
  }
  return gates;
}

template <typename T>
std::string run_backward(const Case& c, std::string& info) {
  const int64_t H = c.hidden, B = c.batch, R = c.rows;
  std::mt19937 rng(99);
  BackwardInputs<T> in;
  in.gates = activated_gates<T>(rng, B, H);
  in.cells = emu::randn<T>(rng, B * H, 1.0);
  in.cells_prev = emu::randn<T>(rng, B * H, 1.0);
  in.cell_initial = emu::randn<T>(rng, B * H, 1.0);
  in.grad_r = emu::randn<T>(rng, B * H, 1.0);
  in.dcell = emu::randn<T>(rng, B * H, 1.0);
  in.grad_output = emu::randn<T>(rng, B * (H + kGradOutputPad), 1.0);
  // each row reads c[t-1] from one of the two: the other's copy of the row is NaN
  const int64_t continuing = std::min(c.prev_split, R);
  std::fill(in.cells_prev.begin() + continuing * H, in.cells_prev.end(), T(kNaN));
  std::fill(in.cell_initial.begin(), in.cell_initial.begin() + continuing * H, T(kNaN));
  const std::string e = check_shape(c, R * (H / c.vec), info);
  if (!e.empty()) return e;
  for (const FlagSet& flags : flag_sets_of(c)) {
    const std::string e = run_backward_flags(c, flags, in, /*fold=*/false);
    if (!e.empty()) return std::string(flags.name) + ": " + e;
    // the driver folds the hidden gradient in without norm clipping or telemetry only
    if (flags.clip_mode != kClipNorm && !flags.sums) {
      const std::string f = run_backward_flags(c, flags, in, /*fold=*/true);
      if (!f.empty()) return std::string(flags.name) + "+fold: " + f;
    }
  }
  return "";
}

// ---- cell variants (layer norm, zoneout, recurrent dropout's masked h): one block per row
// Launches as lstm_steps_cuda.cu's launch_forward_variants / launch_backward_variants.
template <unsigned kBits, typename T>
void variants_forward_step(const ForwardStepArgs<T>& args, const Schedule& s) {
  if (args.rows > 0) {
    launch(forward_variants_kernel<T, kBits>, variant_blocks(args.rows, false), s, args);
  }
}

template <unsigned kBits, typename T>
void variants_backward_step(const BackwardStepArgs<T>& args, const Schedule& s) {
  dispatch_flags(args.clip_mode, args.sum_squares != nullptr, [&]<int64_t kClip, bool kSums>() {
    if constexpr (kClip == kClipNorm || kSums) {
      const int blocks = variant_blocks(args.rows, true);
      if constexpr (kClip == kClipNorm) {
        launch(backward_variants_kernel<T, kBits, kClip, 1, true>, blocks, s, args);
        launch(backward_variants_finish_kernel<T, kBits, kSums>, blocks, s, args, blocks);
      } else {
        launch(backward_variants_kernel<T, kBits, kClip, 0, true>, blocks, s, args);
        launch(backward_finish_kernel<T, 1, kClip, true>, 1, s, args, blocks);
      }
    } else if (args.rows > 0) {
      launch(backward_variants_kernel<T, kBits, kClip, 0, false>,
             variant_blocks(args.rows, false), s, args);
    }
    if constexpr ((kBits & kCellLayerNorm) != 0) {
      const int64_t width = kLayerNormGradWidth * args.hidden;
      if (args.rows > 0) {
        launch(add_rows_in_order_kernel<T>, blocks_for(width), s, args.ln_grad_rows, args.rows,
               width, args.ln_grad_sums);
      }
    }
  });
}

// The bits of the cases (a template flag each).
template <typename Run>
void with_bits(unsigned bits, const Run& run) {
  switch (bits) {
    case 1: return run.template operator()<1u>();
    case 6: return run.template operator()<6u>();
    case 7: return run.template operator()<7u>();
    default: return run.template operator()<15u>();
  }
}

struct RowStatsD {
  double mean, rstd;
};

RowStatsD stats_of(const double* v, int64_t n) {
  double mean = 0, var = 0;
  for (int64_t k = 0; k < n; ++k) mean += v[k];
  mean /= n;
  for (int64_t k = 0; k < n; ++k) var += (v[k] - mean) * (v[k] - mean);
  return {mean, 1.0 / std::sqrt(var / n + kLayerNormEps)};
}

// rstd * (d - mean(d) - x mean(d x)): the input gradient of x = (v - mean) * rstd.
void layer_norm_backward(const double* d, const double* x, double rstd, int64_t n, double* out) {
  double m1 = 0, m2 = 0;
  for (int64_t k = 0; k < n; ++k) m1 += d[k], m2 += d[k] * x[k];
  m1 /= n, m2 /= n;
  for (int64_t k = 0; k < n; ++k) out[k] = rstd * (d[k] - m1 - x[k] * m2);
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// The inputs both variant cases draw: products, parameters, masks (0/1, or the probabilities).
template <typename T>
struct VariantInputs {
  std::vector<T> projection, recurrent, ln_ih, ln_hh, ln_cw, ln_cb, bias, zone_c, zone_h,
      dropout;
  T z_c = T(0.3), z_h = T(0.4);
};

template <typename T>
VariantInputs<T> variant_inputs(std::mt19937& rng, const Case& c) {
  const int64_t H = c.hidden, B = c.batch;
  VariantInputs<T> in;
  in.projection = emu::randn<T>(rng, B * 4 * H, 1.5);
  in.recurrent = emu::randn<T>(rng, B * 4 * H, 1.5);
  auto around_one = [&](int64_t n) {
    std::vector<T> v = emu::randn<T>(rng, n, 0.3);
    for (T& x : v) x += T(1);
    return v;
  };
  in.ln_ih = around_one(4 * H);
  in.ln_hh = around_one(4 * H);
  in.ln_cw = around_one(H);
  in.ln_cb = emu::randn<T>(rng, H, 0.3);
  in.bias = emu::randn<T>(rng, 4 * H, 0.5);
  auto bernoulli = [&](int64_t n, double p, double scale) {
    std::bernoulli_distribution keep(p);
    std::vector<T> v(n);
    for (T& x : v) x = static_cast<T>(keep(rng) ? scale : 0.0);
    return v;
  };
  in.zone_c = bernoulli(B * H, 0.3, 1.0);
  in.zone_h = bernoulli(B * H, 0.4, 1.0);
  in.dropout = bernoulli(B * H, 0.75, 1.0 / 0.75);
  return in;
}

template <typename T>
StepVariants<T> variant_args(unsigned bits, const Case& c, const VariantInputs<T>& in,
                             Buffer<T>& ln_ih, Buffer<T>& ln_hh, Buffer<T>& ln_cw,
                             Buffer<T>& ln_cb, Buffer<T>& bias, Buffer<T>& zone_c,
                             Buffer<T>& zone_h, Buffer<T>& dropout) {
  for (auto [buffer, values] : {std::pair{&ln_ih, &in.ln_ih}, {&ln_hh, &in.ln_hh},
                                {&ln_cw, &in.ln_cw}, {&ln_cb, &in.ln_cb}, {&bias, &in.bias},
                                {&zone_c, &in.zone_c}, {&zone_h, &in.zone_h},
                                {&dropout, &in.dropout}}) {
    buffer->fill(*values);
  }
  StepVariants<T> v;
  v.variants = bits;
  if (bits & kCellLayerNorm) {
    v.ln_ih = ln_ih.data(), v.ln_hh = ln_hh.data(), v.ln_cell_weight = ln_cw.data();
    v.ln_cell_bias = ln_cb.data(), v.bias = bias.data();
  }
  if ((bits & kCellZoneoutCell) && c.variant_masks) v.zoneout_cell_mask = zone_c.data();
  if ((bits & kCellZoneoutHidden) && c.variant_masks) v.zoneout_hidden_mask = zone_h.data();
  v.zoneout_cell = in.z_c;
  v.zoneout_hidden = in.z_h;
  if (bits & kCellMaskedHidden) v.dropout_mask = dropout.data();
  return v;
}

template <typename T>
double keep_of(const Case& c, const std::vector<T>& mask, T probability, int64_t idx) {
  return c.variant_masks ? double(mask[idx]) : double(probability);
}

// The forward step with variants against the formulas (docs/ARCHITECTURE.md) in float64.
template <typename T>
std::string run_variants_forward(const Case& c, std::string& info) {
  const unsigned bits = c.variants;
  const bool norm = bits & kCellLayerNorm;
  const int64_t H = c.hidden, B = c.batch, R = c.rows;
  std::mt19937 rng(4321);
  const VariantInputs<T> in = variant_inputs<T>(rng, c);
  const std::vector<T> pre = emu::randn<T>(rng, B * 4 * H, 2.0);
  const std::vector<T> cell_in = emu::randn<T>(rng, B * H, 1.0);
  const std::vector<T> hidden_in = emu::randn<T>(rng, B * H, 1.0);
  // gates: in place without layer norm; with it written only (the products are read)
  std::vector<double> want_gates = norm ? std::vector<double>(B * 4 * H, kNaN) : to_double(pre);
  std::vector<double> want_cell = to_double(cell_in), want_cells(B * H, kNaN),
                      want_hidden = to_double(hidden_in), want_output(B * H, kNaN),
                      want_masked(B * H, kNaN);
  for (int64_t r = 0; r < R; ++r) {
    std::vector<double> a(4 * H), rec(4 * H), g(4 * H), cell_new(H);
    for (int64_t k = 0; k < 4 * H; ++k) a[k] = in.projection[r * 4 * H + k];
    for (int64_t k = 0; k < 4 * H; ++k) rec[k] = in.recurrent[r * 4 * H + k];
    const RowStatsD sa = stats_of(a.data(), 4 * H), sr = stats_of(rec.data(), 4 * H);
    for (int64_t k = 0; k < 4 * H; ++k) {
      g[k] = norm ? (a[k] - sa.mean) * sa.rstd * in.ln_ih[k] +
                        (rec[k] - sr.mean) * sr.rstd * in.ln_hh[k] + in.bias[k]
                  : double(pre[r * 4 * H + k]);
    }
    for (int64_t j = 0; j < H; ++j) {
      const double i = sigmoid(g[j]), f = sigmoid(g[H + j]), gg = std::tanh(g[2 * H + j]),
                   o = sigmoid(g[3 * H + j]);
      double* G = &want_gates[r * 4 * H + j];
      G[0] = i, G[H] = f, G[2 * H] = gg, G[3 * H] = o;
      cell_new[j] = f * cell_in[r * H + j] + i * gg;
    }
    const RowStatsD sc = stats_of(cell_new.data(), H);
    for (int64_t j = 0; j < H; ++j) {
      const int64_t idx = r * H + j;
      const double n = norm ? (cell_new[j] - sc.mean) * sc.rstd * in.ln_cw[j] + in.ln_cb[j]
                            : cell_new[j];
      double h = want_gates[r * 4 * H + 3 * H + j] * std::tanh(n), cell = cell_new[j];
      if (bits & kCellZoneoutCell) {
        const double keep = keep_of(c, in.zone_c, in.z_c, idx);
        cell = keep * cell_in[idx] + (1 - keep) * cell;
      }
      if (bits & kCellZoneoutHidden) {
        const double keep = keep_of(c, in.zone_h, in.z_h, idx);
        h = keep * hidden_in[idx] + (1 - keep) * h;
      }
      want_cell[idx] = want_cells[idx] = cell;
      want_hidden[idx] = want_output[idx] = h;
      if (bits & kCellMaskedHidden) want_masked[idx] = h * in.dropout[idx];
    }
  }
  info = "blocks " + std::to_string(R > 0 ? variant_blocks(R, false) : 0);
  const double tol = tolerance<T>();
  std::vector<T> first;
  for (int k = 0; k < c.orders; ++k) {
    Buffer<T> gates(B * 4 * H), cell_state(B * H), cells(B * H), hidden(B * H), output(B * H),
        masked(B * H), projection(B * 4 * H), recurrent(B * 4 * H), ln_ih(4 * H), ln_hh(4 * H),
        ln_cw(H), ln_cb(H), bias(4 * H), zone_c(B * H), zone_h(B * H), dropout(B * H);
    if (!norm) gates.fill(pre);
    cell_state.fill(cell_in);
    hidden.fill(hidden_in);
    projection.fill(in.projection);
    recurrent.fill(in.recurrent);
    ForwardStepArgs<T> a{R, H, gates.data(), cell_state.data(), cells.data(), hidden.data(),
                         output.data(), H};
    a.variant = variant_args(bits, c, in, ln_ih, ln_hh, ln_cw, ln_cb, bias, zone_c, zone_h,
                             dropout);
    if (norm) a.projection = projection.data(), a.recurrent = recurrent.data();
    if (bits & kCellMaskedHidden) a.hidden_masked = masked.data();
    with_bits(bits, [&]<unsigned kBits>() { variants_forward_step<kBits>(a, {emu::kOrders[k], 7}); });
    const std::string e = emu::compare_all<T>({{"gates", gates.values(), want_gates},
                                               {"cell_state", cell_state.values(), want_cell},
                                               {"cells", cells.values(), want_cells},
                                               {"hidden_state", hidden.values(), want_hidden},
                                               {"output", output.values(), want_output},
                                               {"hidden_masked", masked.values(), want_masked}},
                                              tol);
    if (!e.empty()) return e;
    const auto all = concat<T>({gates.values(), cell_state.values(), cells.values(),
                                hidden.values(), masked.values()});
    if (!emu::same_bits_as_first(first, all)) return kRace;
  }
  return "";
}

// The backward step with variants against the formulas in float64 (every flag set).
template <typename T>
std::string run_variants_backward_flags(const Case& c, const FlagSet& flags,
                                        const VariantInputs<T>& in, const BackwardInputs<T>& bin,
                                        const std::vector<T>& sums_in) {
  const unsigned bits = c.variants;
  const bool norm = bits & kCellLayerNorm;
  const int64_t H = c.hidden, B = c.batch, R = c.rows, W = kLayerNormGradWidth * H;
  std::vector<double> dc(R * H), keep_c(R * H, 0.0), dout(R * H), dn(R * H), normed(R * H),
      cell_prev(R * H);
  std::vector<double> want_dgates(B * 4 * H, kNaN), want_dcell = to_double(bin.dcell),
      want_grad_recurrent(B * 4 * H, kNaN), want_rows(B * W, kNaN), want_sums = to_double(sums_in);
  // front: dL/dc~ before clipping
  for (int64_t r = 0; r < R; ++r) {
    std::vector<double> cell_new(H);
    for (int64_t j = 0; j < H; ++j) {
      const int64_t idx = r * H + j;
      const T* G = &bin.gates[r * 4 * H + j];
      cell_prev[idx] = r < c.prev_split ? bin.cells_prev[idx] : bin.cell_initial[idx];
      cell_new[j] = (bits & kCellZoneoutCell) ? G[H] * cell_prev[idx] + G[0] * G[2 * H]
                                              : double(bin.cells[idx]);
    }
    const RowStatsD sc = stats_of(cell_new.data(), H);
    std::vector<double> grad_normalized(H), xhat(H), from_output(H);
    for (int64_t j = 0; j < H; ++j) {
      const int64_t idx = r * H + j;
      const double o = bin.gates[r * 4 * H + 3 * H + j];
      xhat[j] = (cell_new[j] - sc.mean) * sc.rstd;
      const double n = norm ? xhat[j] * in.ln_cw[j] + in.ln_cb[j] : cell_new[j];
      const double t = std::tanh(n);
      double dr = bin.grad_r[idx];
      if (bits & kCellZoneoutHidden) dr *= 1 - keep_of(c, in.zone_h, in.z_h, idx);
      dout[idx] = dr * t * o * (1 - o);
      dn[idx] = dr * o * (1 - t * t);
      grad_normalized[j] = dn[idx] * in.ln_cw[j];
      normed[idx] = xhat[j];
    }
    if (norm) {
      layer_norm_backward(grad_normalized.data(), xhat.data(), sc.rstd, H, from_output.data());
    } else {
      for (int64_t j = 0; j < H; ++j) from_output[j] = dn[r * H + j];
    }
    for (int64_t j = 0; j < H; ++j) {
      const int64_t idx = r * H + j;
      if (bits & kCellZoneoutCell) keep_c[idx] = keep_of(c, in.zone_c, in.z_c, idx);
      dc[idx] = from_output[j] + (1 - keep_c[idx]) * bin.dcell[idx];
    }
  }
  const auto [clip, sum] = clip_reference(dc, R * H, flags);
  // back: gate gradients, the carried dL/dc, layer norm's backward and parameter gradients
  for (int64_t r = 0; r < R; ++r) {
    std::vector<double> dg(4 * H);
    for (int64_t j = 0; j < H; ++j) {
      const int64_t idx = r * H + j;
      const T* G = &bin.gates[r * 4 * H + j];
      const double i = G[0], f = G[H], g = G[2 * H], d = dc[idx];
      dg[j] = d * g * i * (1 - i);
      dg[H + j] = d * cell_prev[idx] * f * (1 - f);
      dg[2 * H + j] = d * i * (1 - g * g);
      dg[3 * H + j] = dout[idx];
      want_dcell[idx] = d * f + keep_c[idx] * bin.dcell[idx];
    }
    if (!norm) {
      for (int64_t k = 0; k < 4 * H; ++k) want_dgates[r * 4 * H + k] = dg[k];
      continue;
    }
    std::vector<double> a(4 * H), rec(4 * H), ahat(4 * H), rhat(4 * H), da(4 * H), drec(4 * H);
    for (int64_t k = 0; k < 4 * H; ++k) {
      a[k] = in.projection[r * 4 * H + k];
      rec[k] = in.recurrent[r * 4 * H + k];
    }
    const RowStatsD sa = stats_of(a.data(), 4 * H), sr = stats_of(rec.data(), 4 * H);
    std::vector<double> ga(4 * H), gr(4 * H);
    for (int64_t k = 0; k < 4 * H; ++k) {
      ahat[k] = (a[k] - sa.mean) * sa.rstd;
      rhat[k] = (rec[k] - sr.mean) * sr.rstd;
      ga[k] = dg[k] * in.ln_ih[k];
      gr[k] = dg[k] * in.ln_hh[k];
    }
    layer_norm_backward(ga.data(), ahat.data(), sa.rstd, 4 * H, da.data());
    layer_norm_backward(gr.data(), rhat.data(), sr.rstd, 4 * H, drec.data());
    double* row = &want_rows[r * W];
    for (int64_t k = 0; k < 4 * H; ++k) {
      want_dgates[r * 4 * H + k] = da[k];
      want_grad_recurrent[r * 4 * H + k] = drec[k];
      row[kGradBias * H + k] = dg[k];
      row[kGradInputGain * H + k] = dg[k] * ahat[k];
      row[kGradRecurrentGain * H + k] = dg[k] * rhat[k];
    }
    for (int64_t j = 0; j < H; ++j) {
      row[kGradCellGain * H + j] = dn[r * H + j] * normed[r * H + j];
      row[kGradCellBias * H + j] = dn[r * H + j];
    }
    for (int64_t k = 0; k < W; ++k) want_sums[k] += row[k];
  }
  const double tol = tolerance<T>();
  std::vector<T> first;
  for (int k = 0; k < c.orders; ++k) {
    Buffer<T> gates(B * 4 * H), cells(B * H), cells_prev(B * H), cell_initial(B * H),
        grad_r(B * H), dcell(B * H), dgates(B * 4 * H), sum_squares(1), partials(kReduceBlocks),
        projection(B * 4 * H), recurrent(B * 4 * H), grad_recurrent(B * 4 * H),
        ln_rows(B * W), ln_sums(W), ln_ih(4 * H), ln_hh(4 * H), ln_cw(H), ln_cb(H), bias(4 * H),
        zone_c(B * H), zone_h(B * H), dropout(B * H);
    gates.fill(bin.gates);
    cells.fill(bin.cells);
    cells_prev.fill(bin.cells_prev);
    cell_initial.fill(bin.cell_initial);
    grad_r.fill(bin.grad_r);
    dcell.fill(bin.dcell);
    projection.fill(in.projection);
    recurrent.fill(in.recurrent);
    ln_sums.fill(sums_in);
    const bool reduction = flags.sums || flags.clip_mode == kClipNorm;
    BackwardStepArgs<T> a;
    a.rows = R;
    a.hidden = H;
    a.gates = gates.data();
    a.cells = cells.data();
    a.cells_prev = c.prev_split > 0 ? cells_prev.data() : nullptr;
    a.cell_initial = c.prev_split < R ? cell_initial.data() : nullptr;
    a.prev_split = c.prev_split;
    a.grad_r = grad_r.data();
    a.dcell = dcell.data();
    a.dgates = dgates.data();
    a.clip_mode = flags.clip_mode;
    a.clip = static_cast<T>(clip);
    a.sum_squares = flags.sums ? sum_squares.data() : nullptr;
    a.partials = reduction ? partials.data() : nullptr;
    a.variant = variant_args(bits, c, in, ln_ih, ln_hh, ln_cw, ln_cb, bias, zone_c, zone_h,
                             dropout);
    if (norm) {
      a.projection = projection.data(), a.recurrent = recurrent.data();
      a.grad_recurrent = grad_recurrent.data();
      a.ln_grad_rows = ln_rows.data(), a.ln_grad_sums = ln_sums.data();
    }
    with_bits(bits, [&]<unsigned kBits>() {
      variants_backward_step<kBits>(a, {emu::kOrders[k], 13});
    });
    std::string e;
    if (!(e = emu::compare("dgates", dgates.values(), want_dgates, tol)).empty()) return e;
    if (!(e = emu::compare("dcell", dcell.values(), want_dcell, tol)).empty()) return e;
    if (!(e = emu::compare("sum_squares", sum_squares.values(), {flags.sums ? sum : kNaN}, tol))
             .empty()) {
      return e;
    }
    if (!(e = emu::compare("grad_recurrent", grad_recurrent.values(), want_grad_recurrent, tol))
             .empty()) {
      return e;
    }
    if (norm && !(e = emu::compare("ln_grad_rows", ln_rows.values(), want_rows, tol)).empty()) {
      return e;
    }
    if (!(e = emu::compare("ln_grad_sums", ln_sums.values(), want_sums, tol)).empty()) return e;
    const auto all = concat<T>({dgates.values(), dcell.values(), sum_squares.values(),
                                grad_recurrent.values(), ln_sums.values()});
    if (!emu::same_bits_as_first(first, all)) return kRace;
  }
  return "";
}

template <typename T>
std::string run_variants_backward(const Case& c, std::string& info) {
  const int64_t H = c.hidden, B = c.batch, R = c.rows;
  std::mt19937 rng(77);
  const VariantInputs<T> in = variant_inputs<T>(rng, c);
  BackwardInputs<T> bin;
  bin.gates = activated_gates<T>(rng, B, H);
  bin.cells = emu::randn<T>(rng, B * H, 1.0);
  bin.cells_prev = emu::randn<T>(rng, B * H, 1.0);
  bin.cell_initial = emu::randn<T>(rng, B * H, 1.0);
  bin.grad_r = emu::randn<T>(rng, B * H, 1.0);
  bin.dcell = emu::randn<T>(rng, B * H, 1.0);
  const int64_t continuing = std::min(c.prev_split, R);
  std::fill(bin.cells_prev.begin() + continuing * H, bin.cells_prev.end(), T(kNaN));
  std::fill(bin.cell_initial.begin(), bin.cell_initial.begin() + continuing * H, T(kNaN));
  // with zoneout of c the kernel recomputes c~ from the gates: the saved c[t] is not read
  if (c.variants & kCellZoneoutCell) std::fill(bin.cells.begin(), bin.cells.end(), T(kNaN));
  // layer norm adds to running sums; without it they are not touched (NaN stays NaN)
  const std::vector<T> sums_in = (c.variants & kCellLayerNorm)
                                     ? emu::randn<T>(rng, kLayerNormGradWidth * H, 1.0)
                                     : std::vector<T>(kLayerNormGradWidth * H, T(kNaN));
  info = "blocks " + std::to_string(variant_blocks(R, false)) + ", reduction " +
         std::to_string(variant_blocks(R, true));
  for (const FlagSet& flags : flag_sets_of(c)) {
    const std::string e = run_variants_backward_flags(c, flags, in, bin, sums_in);
    if (!e.empty()) return std::string(flags.name) + ": " + e;
  }
  return "";
}

// ---- the emulation itself
void shuffle_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  float v = static_cast<float>(t);
  for (unsigned offset = 1; offset < 32; offset <<= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  out[t] = v;
}

void half_mask_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffu, 1.f, 1);
}

void divergent_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}

// Reads the block's __shared__ value before and after writing it, across a grid barrier
// (there blocks interleave: the array must still be the block's own).
void shared_kernel(float* before, float* after) {
  __shared__ float value[1];
  if (threadIdx.x == 0) before[blockIdx.x] = value[0];
  __syncthreads();
  if (threadIdx.x == 0) value[0] = static_cast<float>(blockIdx.x);
  lstm_fused::cuda::persistent_detail::cg::this_grid().sync();
  after[blockIdx.x * blockDim.x + threadIdx.x] = value[0];
}

std::string expect_error(const std::function<void()>& launch_it, const char* what) {
  try {
    launch_it();
  } catch (const std::exception& e) {
    if (std::string(e.what()).find(what) != std::string::npos) return "";
    return std::string("wrong error: ") + e.what();
  }
  return std::string("no error for ") + what;
}

std::string run_emulator_checks(std::string& info) {
  info = "shuffle, divergence, __shared__";
  for (emu::Order order : emu::kOrders) {
    // lane l sums lanes l, l+1, ..: each step adds what lane l+offset holds, or (past the
    // warp) its own value again
    std::vector<float> out(64, kNaN);
    emu::launch_kernel(shuffle_kernel, 1, 64, order, 3, out.data());
    for (int t = 0; t < 64; ++t) {
      std::vector<float> v(32);
      for (int l = 0; l < 32; ++l) v[l] = static_cast<float>(t / 32 * 32 + l);
      for (int offset = 1; offset < 32; offset <<= 1) {
        std::vector<float> next(v);
        for (int l = 0; l < 32; ++l) next[l] += l + offset < 32 ? v[l + offset] : v[l];
        v = next;
      }
      if (out[t] != v[t % 32]) {
        return "shuffle: thread " + std::to_string(t) + " got " + std::to_string(out[t]);
      }
    }
    // (the launches before this one left values in every block's array)
    std::vector<float> before(3, kNaN), after(3 * 32, kNaN);
    emu::launch_kernel(shared_kernel, 3, 32, order, 5, before.data(), after.data());
    for (int b = 0; b < 3; ++b) {
      if (before[b] != 0) return "__shared__ does not start as zeros in every block";
      for (int t = 0; t < 32; ++t) {
        if (after[b * 32 + t] != b) return "__shared__ is not per block";
      }
    }
  }
  std::vector<float> out(64);
  const emu::Order order = emu::Order::kForward;
  std::string e = expect_error(
      [&] { emu::launch_kernel(divergent_shuffle_kernel, 1, 64, order, 1, out.data()); },
      "16 of 32 lanes wait at __shfl_down_sync");
  if (!e.empty()) return e;
  e = expect_error(  // a partial warp: 16 lanes
      [&] { emu::launch_kernel(shuffle_kernel, 1, 48, order, 1, out.data()); },
      "16 of 32 lanes wait at __shfl_down_sync");
  if (!e.empty()) return e;
  return expect_error(
      [&] { emu::launch_kernel(half_mask_shuffle_kernel, 1, 64, order, 1, out.data()); },
      "only full-warp shuffles");
}

// ---- a step without rows: nothing launched or read, sums written as 0
template <typename T>
std::string run_rows_zero(const Case& c, std::string& info) {
  std::string e = run_forward<T>(c, info);
  if (!e.empty()) return "forward: " + e;
  e = run_hidden_grad<T>(c, info);
  if (!e.empty()) return "hidden-grad: " + e;
  e = run_backward<T>(c, info);
  if (!e.empty()) return "backward: " + e;
  return "";
}

template <typename T>
std::string run_typed(const Case& c, std::string& info) {
  switch (c.kind) {
    case Kind::kForward: return run_forward<T>(c, info);
    case Kind::kHiddenGrad: return run_hidden_grad<T>(c, info);
    case Kind::kBackward: return run_backward<T>(c, info);
    case Kind::kRowsZero: return run_rows_zero<T>(c, info);
    case Kind::kEmulator: return run_emulator_checks(info);
    case Kind::kVariantsForward: return run_variants_forward<T>(c, info);
    case Kind::kVariantsBackward: return run_variants_backward<T>(c, info);
    case Kind::kBits16: return run_bits16_rounding(c, info);
  }
  return "unknown kind";
}

std::string run_case(const Case& c, std::string& info) {
  return c.is_double ? run_typed<double>(c, info) : run_typed<float>(c, info);
}

std::vector<Case> cases() {
  using K = Kind;
  std::vector<Case> v;
  v.push_back({"emulator", K::kEmulator, false, 0, 0, 0, 1});
  // 9 of 11 rows active, H a multiple of 4: VEC 4 / 2; H odd or a stride / pointer off the
  // 16-byte grid: VEC 1. Outputs and grad_output in the second direction's columns.
  v.push_back({"forward-float-vec4", K::kForward, false, 9, 11, 148, 4, 296, 148});
  v.push_back({"forward-float-vec1", K::kForward, false, 9, 11, 147, 1});  // no output
  v.push_back({"forward-double-vec2", K::kForward, true, 9, 11, 148, 2, 296, 148});
  v.push_back({"forward-double-vec1", K::kForward, true, 9, 11, 148, 1, 297, 148});
  v.push_back({"hidden-grad-float-vec4", K::kHiddenGrad, false, 9, 11, 148, 4, 296, 148});
  v.push_back({"hidden-grad-float-vec1", K::kHiddenGrad, false, 9, 11, 147, 1, 147, 0});
  v.push_back({"hidden-grad-double-vec2", K::kHiddenGrad, true, 9, 11, 148, 2});  // no grad_output
  v.push_back({"hidden-grad-double-vec1", K::kHiddenGrad, true, 9, 11, 148, 1, 297, 148});
  // packed: rows from prev_split on start from cell_initial
  v.push_back({"backward-float-vec4", K::kBackward, false, 9, 11, 148, 4, 0, 0, 6});
  v.push_back({"backward-float-vec1", K::kBackward, false, 9, 11, 147, 1, 0, 0, 9});
  v.push_back({"backward-double-vec2", K::kBackward, true, 9, 11, 148, 2, 0, 0, 0});
  v.push_back({"backward-double-vec1", K::kBackward, true, 9, 11, 148, 1, 0, 0, 4, true});
  v.push_back({"rows-0-float", K::kRowsZero, false, 0, 3, 148, 4, 296, 0, 0});
  v.push_back({"rows-0-double", K::kRowsZero, true, 0, 3, 147, 1, 147, 0, 0});
  // more packed elements (80 x 4096 / 4 = 81,920) than the reduction's 256 x 256 threads:
  // stage 1 and the norm-clip stage 2 on 256 blocks with a grid-stride loop
  Case big_hidden{"big-hidden-grad", K::kHiddenGrad, false, 80, 81, 4096, 4, 4096, 0};
  big_hidden.flag_sets = {"value+sums", "norm+sums"};
  big_hidden.grid_stride = true;
  v.push_back(big_hidden);
  Case big_backward{"big-backward", K::kBackward, false, 80, 81, 4096, 4, 0, 0, 50};
  big_backward.flag_sets = {"value+sums", "norm+sums"};
  big_backward.grid_stride = true;
  v.push_back(big_backward);
  // the cell variants: all of them (layer norm, zoneout of c and h, masked h) by masks and
  // by probability (eval), layer norm alone (the saved c[t] is c~), zoneout alone; H = 300
  // has more units than a block has threads; 9 of 11 rows, packed (prev_split)
  auto variant = [&](const char* name, Kind kind, bool is_double, int64_t hidden, unsigned bits,
                     bool masks) {
    Case c{name, kind, is_double, 9, 11, hidden, 1, 0, 0, 5};
    c.variants = bits;
    c.variant_masks = masks;
    v.push_back(c);
  };
  variant("variants-forward-float-all", K::kVariantsForward, false, 20, 15, true);
  variant("variants-forward-double-all-eval", K::kVariantsForward, true, 20, 15, false);
  variant("variants-forward-float-layer-norm", K::kVariantsForward, false, 300, 1, true);
  variant("variants-forward-double-zoneout", K::kVariantsForward, true, 17, 6, true);
  variant("variants-backward-float-all", K::kVariantsBackward, false, 20, 7, true);
  variant("variants-backward-double-all-eval", K::kVariantsBackward, true, 20, 7, false);
  variant("variants-backward-float-layer-norm", K::kVariantsBackward, false, 300, 1, true);
  variant("variants-backward-double-zoneout", K::kVariantsBackward, true, 17, 6, true);
  v.push_back({"bits16-rounding", K::kBits16, false, 40, 40, 700, 1});  // 28,000 values
  return v;
}

}  // namespace

int main(int argc, char** argv) { return emu::run_cases(argc, argv, cases(), run_case); }
