// Runs the persistent CUDA kernels (csrc/cuda/lstm_persistent_kernels.cuh) on the CPU under
// cuda_emulation.h and checks them against a float64 reference of the driver's semantics
// (lstm_steps.h: ForwardSequenceArgs / BackwardSequenceArgs, csrc/ops.cpp's per-step loop).
// Command line and output: emulator_harness.h.
//
// For every case: the plan the host side would use for an emulated device (SM count and
// shared memory chosen to reach the code paths: several blocks, a last block with fewer units,
// K split into chunks, rows split into chunks, the scalar staging path), then the forward and
// the backward kernel, each in three scheduling orders (forward, reverse, shuffled). Checks:
// every output written (outputs start as NaN), close to the reference (|d| <= 1e-4 + 1e-4|ref|),
// the three orders bit-identical (a difference means a race between barriers).
//
// Every case also runs the tensor-core kernels (emulated mma.sync): the 16-bit ones in
// bfloat16 ("-bf16") and float16 ("-fp16"), where W_hh and h0 are 16-bit values and the
// reference rounds h[t-1] and dG[t] to 16 bits before they multiply W_hh, as the kernels do
// (whose dG output is itself rounded to 16 bits); and the TF32 one ("-tf32") for float32
// layers, where the reference rounds W_hh, h[t-1] and dG[t] to TF32 in the products. The
// tolerance is then that of the operands' format.
#include "cuda_emulation.h"
#include "emulator_harness.h"

#include "cuda/lstm_persistent_kernels.cuh"

#include <sstream>

using namespace lstm_fused;
using namespace lstm_fused::cuda::persistent_detail;
using emu::compare;
using emu::kOrders;
using emu::randn;
using emu::same_bits_as_first;

namespace {

struct Case {
  std::string name;
  int64_t hidden;
  std::vector<int64_t> lengths;  // one per batch row, non-increasing; equal = unpacked
  bool reverse = false;
  int directions = 1;            // output / grad_output hold D*H columns, this one at d*H
  bool grad_output = true;
  bool bias = true;              // the forward adds b_ih + b_hh itself (ForwardSequenceArgs::bias)
  int64_t sm_count = 4;
  int64_t avail_forward = 0;     // > 0: shared memory = W slice + state + this (forces chunks)
  int64_t avail_backward = 0;
  Operand op = Operand::kFloat32;
  bool unaligned_dgates = false;  // 16-bit: dG one value off 8 bytes (scalar staging)
};

// A float32 value as the product of `op` sees it (unchanged for float32).
double operand_value(Operand op, double value) {
  if (op == Operand::kFloat32) return value;
  if (op == Operand::kTf32) return tf32_round(static_cast<float>(value));
  const bool bf16 = op == Operand::kBFloat16;
  const uint16_t bits =
      round_bits16(bf16 ? Bits16::kBFloat16 : Bits16::kFloat16, static_cast<float>(value));
  return emu::bits16_value(bits, bf16);
}

uint16_t bits_of(Operand op, float value) {
  return round_bits16(op == Operand::kBFloat16 ? Bits16::kBFloat16 : Bits16::kFloat16, value);
}

struct Layout {
  int64_t steps = 0, batch = 0, rows = 0;
  std::vector<int64_t> batch_sizes, offsets;
};

// Step t of a direction: its rows, their offset, the step before it (-1 at the first) and how
// many of its rows continue a sequence of that step (the rest start from h0 / c0).
struct StepRef {
  int64_t t, rows, offset, prev, continuing;
};

StepRef step_ref(const Layout& l, int64_t s, bool reverse) {
  const int64_t t = reverse ? l.steps - 1 - s : s;
  int64_t prev = reverse ? t + 1 : t - 1;
  if (prev < 0 || prev >= l.steps) prev = -1;
  const int64_t rows = l.batch_sizes[t];
  return {t, rows, l.offsets[t], prev, prev < 0 ? 0 : std::min(rows, l.batch_sizes[prev])};
}

Layout layout_of(const Case& c) {
  Layout l;
  l.batch = static_cast<int64_t>(c.lengths.size());
  l.steps = c.lengths.empty() ? 0 : c.lengths[0];
  for (int64_t t = 0; t < l.steps; ++t) {
    int64_t n = 0;
    for (int64_t len : c.lengths) n += len > t;
    l.batch_sizes.push_back(n);
    l.offsets.push_back(l.rows);
    l.rows += n;
  }
  return l;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct Problem {
  Operand op;
  int64_t H, B, N, T, ld, col;
  std::vector<float> gx, bias, w, h0, c0, gy, dh_n, dc_n;  // bias empty: none
  std::vector<uint16_t> w16;  // 16-bit kernels: W_hh's bits (w holds their values)
};

// float64 reference of one direction's forward: activated gates, cells, output columns, h_n, c_n.
struct ForwardRef {
  std::vector<double> gates, cells, output, h_n, c_n;
};

ForwardRef forward_reference(const Problem& p, const Layout& l, bool reverse) {
  const int64_t H = p.H;
  ForwardRef r;
  r.gates.assign(p.N * 4 * H, 0);
  r.cells.assign(p.N * H, 0);
  r.output.assign(p.N * H, 0);
  std::vector<double> c(p.c0.begin(), p.c0.end()), h_last(p.B * H, 0);
  for (int64_t s = 0; s < l.steps; ++s) {
    const auto [t, rows, off, prev, cont] = step_ref(l, s, reverse);
    for (int64_t b = 0; b < rows; ++b) {
      std::vector<double> hp(H);
      for (int64_t k = 0; k < H; ++k) {
        hp[k] = operand_value(
            p.op, b < cont ? r.output[(l.offsets[prev] + b) * H + k] : p.h0[b * H + k]);
      }
      for (int64_t j = 0; j < H; ++j) {
        double pre[4];
        for (int g = 0; g < 4; ++g) {
          double acc = p.gx[(off + b) * 4 * H + g * H + j];
          if (!p.bias.empty()) acc += p.bias[g * H + j];
          for (int64_t k = 0; k < H; ++k) {
            acc += operand_value(p.op, p.w[(g * H + j) * H + k]) * hp[k];
          }
          pre[g] = acc;
        }
        const double i = sigmoid(pre[0]), f = sigmoid(pre[1]), gg = std::tanh(pre[2]),
                     o = sigmoid(pre[3]);
        const double cn = f * c[b * H + j] + i * gg;
        const double hn = o * std::tanh(cn);
        double* G = &r.gates[(off + b) * 4 * H + j];
        G[0] = i, G[H] = f, G[2 * H] = gg, G[3 * H] = o;
        r.cells[(off + b) * H + j] = cn;
        r.output[(off + b) * H + j] = hn;
        c[b * H + j] = cn;
        h_last[b * H + j] = hn;
      }
    }
  }
  r.h_n = h_last;
  r.c_n = c;
  return r;
}

struct BackwardRef {
  std::vector<double> dgates, dh0, dc0;
};

// float64 reference of one direction's backward, from float gates/cells (what the kernel reads).
BackwardRef backward_reference(const Problem& p, const Layout& l, bool reverse, bool with_gy,
                               const std::vector<float>& gates, const std::vector<float>& cells) {
  const int64_t H = p.H;
  BackwardRef r;
  r.dgates.assign(p.N * 4 * H, 0);
  std::vector<double> dh(p.dh_n.begin(), p.dh_n.end()), dc(p.dc_n.begin(), p.dc_n.end());
  for (int64_t s = l.steps - 1; s >= 0; --s) {
    const auto [t, rows, off, prev, cont] = step_ref(l, s, reverse);
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        double d = dh[b * H + j];
        if (with_gy) d += p.gy[(off + b) * p.ld + p.col + j];
        const float* G = &gates[(off + b) * 4 * H + j];
        const double i = G[0], f = G[H], g = G[2 * H], o = G[3 * H];
        const double cell = cells[(off + b) * H + j];
        const double cp = b < cont ? cells[(l.offsets[prev] + b) * H + j] : p.c0[b * H + j];
        const double tc = std::tanh(cell);
        const double dcell = dc[b * H + j] + d * o * (1 - tc * tc);
        double* D = &r.dgates[(off + b) * 4 * H + j];
        D[0] = dcell * g * i * (1 - i);
        D[H] = dcell * cp * f * (1 - f);
        D[2 * H] = dcell * i * (1 - g * g);
        D[3 * H] = d * tc * o * (1 - o);
        dc[b * H + j] = dcell * f;
      }
    }
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < 4 * H; ++k) {
          acc += operand_value(p.op, r.dgates[(off + b) * 4 * H + k]) *
                 operand_value(p.op, p.w[k * H + j]);
        }
        dh[b * H + j] = acc;
      }
    }
  }
  r.dh0 = dh;
  r.dc0 = dc;
  return r;
}

// float kernels against the float64 reference; the 16-bit kernels' outputs carry rounding
// differences of their operands (2^-9 relative in bfloat16, 2^-12 in float16) and dG is
// compared as the 16 bits the kernel writes
double tolerance(Operand op) {
  return op == Operand::kFloat32 ? 1e-4 : op == Operand::kBFloat16 ? 1e-2 : 2e-3;  // TF32: fp16's
}

const int64_t kSmemLarge = 232448;  // an H100's opt-in shared memory per block

persistent::Plan plan_for(const Case& c, int64_t batch, bool backward) {
  const persistent::Product product = product_of(c.op);
  persistent::Plan p =
      persistent::plan(backward, c.hidden, batch, c.sm_count, kSmemLarge, 1, product);
  const int64_t avail = backward ? c.avail_backward : c.avail_forward;
  if (avail > 0 && p.ok) {
    const int64_t smem = 4 * (p.stage_offset + p.state_floats + avail);  // W slice at 0
    p = persistent::plan(backward, c.hidden, batch, c.sm_count, smem, 1, product);
  }
  return p;
}

std::string describe(const persistent::Plan& p) {
  std::ostringstream os;
  os << "U=" << p.units << " blocks=" << p.blocks << " tiles=" << p.row_tiles << "x" << p.col_tiles
     << " slices=" << p.k_slices << " rows_chunk=" << p.rows_chunk << " k_chunk=" << p.k_chunk
     << "x" << p.k_chunks;
  return os.str();
}

// Runs one persistent kernel under the emulation: its parameters from the driver's arguments
// and the plan, then the launch in the given scheduling order. False when the packed-sequence
// segments do not fit the kernel parameters.
template <typename Params, typename Args, typename Fill, typename Kernel>
bool emulate_launch(const Args& a, const persistent::Plan& plan, emu::Order order, int seed,
                    Fill fill, Kernel kernel) {
  Params params;
  if (!persistent::make_segments(a, params.segments)) return false;
  fill(a, plan, params);
  emu::launch(static_cast<int>(plan.blocks), persistent::kThreads,
              static_cast<size_t>(plan.smem_bytes), order, seed, [&] { kernel(params); });
  return true;
}

template <Operand kOp>
std::string run_case_as(const Case& c, std::string& info) {
  const Layout l = layout_of(c);
  const double kTol = tolerance(kOp);
  constexpr bool k16 = is_16bit(kOp);
  std::mt19937 rng(1234);
  Problem p;
  p.op = kOp;
  p.H = c.hidden;
  p.B = l.batch;
  p.N = l.rows;
  p.T = l.steps;
  p.ld = c.directions * c.hidden;
  p.col = c.reverse && c.directions == 2 ? c.hidden : 0;
  const int64_t H = p.H, B = p.B, N = p.N;
  p.gx = randn(rng, N * 4 * H, 1.0);
  if (c.bias) p.bias = randn(rng, 4 * H, 1.0);
  p.w = randn(rng, 4 * H * H, 1.0 / std::sqrt(double(H)));
  p.h0 = randn(rng, B * H, 1.0);
  p.c0 = randn(rng, B * H, 1.0);
  p.gy = randn(rng, N * p.ld, 1.0);
  p.dh_n = randn(rng, B * H, 1.0);
  p.dc_n = randn(rng, B * H, 1.0);
  if (k16) {  // W_hh and h0 as 16-bit values (h0 reaches the kernel in fp32, exactly)
    for (float& v : p.w) {
      p.w16.push_back(bits_of(kOp, v));
      v = static_cast<float>(emu::bits16_value(p.w16.back(), kOp == Operand::kBFloat16));
    }
    for (float& v : p.h0) v = static_cast<float>(operand_value(kOp, v));
  }
  const float nan = std::nanf("");
  SequenceShape shape{l.steps, l.batch, H, l.batch_sizes.data(), l.offsets.data(), c.reverse};

  // ---- forward
  const persistent::Plan fplan = plan_for(c, B, false);
  const persistent::Plan bplan = plan_for(c, B, true);
  info = "fwd " + describe(fplan) + " | bwd " + describe(bplan);
  if (!fplan.ok || !bplan.ok) return "the plan declines";
  const ForwardRef fref = forward_reference(p, l, c.reverse);
  std::vector<float> first_fwd;
  std::vector<float> gates_out, cells_out;
  for (emu::Order order : kOrders) {
    std::vector<float> gates = p.gx, cells(N * H, nan), output(N * p.ld, nan), h = p.h0,
                       cstate = p.c0;
    ForwardSequenceArgs<float> a;
    static_cast<SequenceShape&>(a) = shape;
    a.gates = gates.data();
    a.bias = p.bias.empty() ? nullptr : p.bias.data();
    a.w_hh = k16 ? nullptr : p.w.data();
    a.w_hh_16bit = k16 ? p.w16.data() : nullptr;
    a.h0 = h.data();
    // 16-bit: h0's bits and the two steps' 16-bit h (NaN until written)
    std::vector<uint16_t> h0_16bit, hidden_steps(k16 ? 2 * B * H : 0, 0xffff);
    for (float v : p.h0) h0_16bit.push_back(k16 ? bits_of(kOp, v) : uint16_t(0));
    a.h0_16bit = k16 ? h0_16bit.data() : nullptr;
    a.hidden_16bit_steps = k16 ? hidden_steps.data() : nullptr;
    a.hidden_state = h.data();
    a.cell_state = cstate.data();
    a.cells = cells.data();
    a.output = output.data() + p.col;
    a.output_stride = p.ld;
    if (!emulate_launch<ForwardParams>(a, fplan, order, 7, fill_forward_params,
                                       persistent_forward_kernel<kOp>)) return "segments";
    std::string e;
    if (!(e = compare("gates", gates, fref.gates, kTol)).empty()) return "forward: " + e;
    if (!(e = compare("cells", cells, fref.cells, kTol)).empty()) return "forward: " + e;
    if (!(e = compare("output", output, fref.output, kTol, p.ld, p.col, H)).empty()) {
      return "forward: " + e;
    }
    if (!(e = compare("h_n", h, fref.h_n, kTol)).empty()) return "forward: " + e;
    if (!(e = compare("c_n", cstate, fref.c_n, kTol)).empty()) return "forward: " + e;
    for (int64_t r = 0; r < N; ++r) {  // the other direction's columns stay untouched
      for (int64_t k = 0; k < p.ld; ++k) {
        if ((k < p.col || k >= p.col + H) && !std::isnan(output[r * p.ld + k])) {
          return "forward: wrote outside its columns";
        }
      }
    }
    std::vector<float> all = gates;
    for (auto* v : {&cells, &output, &h, &cstate}) all.insert(all.end(), v->begin(), v->end());
    if (gates_out.empty()) {
      gates_out = gates;
      cells_out = cells;
    }
    if (!same_bits_as_first(first_fwd, all)) {
      return "forward: results depend on the scheduling order (race)";
    }
  }

  // ---- backward, from the kernel's own (checked) forward results
  const BackwardRef bref = backward_reference(p, l, c.reverse, c.grad_output, gates_out, cells_out);
  std::vector<float> first_bwd;
  for (emu::Order order : kOrders) {
    std::vector<float> dgates(N * 4 * H, nan), dh = p.dh_n, dc = p.dc_n;
    // 16-bit: dG's bits, NaN (0xffff in both formats) until written, optionally one value
    // past an 8-byte boundary
    const int64_t shift = c.unaligned_dgates ? 1 : 0;
    std::vector<uint16_t> dgates16(k16 ? N * 4 * H + shift : 0, 0xffff);
    BackwardSequenceArgs<float> a;
    static_cast<SequenceShape&>(a) = shape;
    a.gates = gates_out.data();
    a.cells = cells_out.data();
    a.c0 = p.c0.data();
    a.grad_output = c.grad_output ? p.gy.data() + p.col : nullptr;
    a.grad_output_stride = p.ld;
    a.w_hh = k16 ? nullptr : p.w.data();
    a.w_hh_16bit = k16 ? p.w16.data() : nullptr;
    a.dhidden = dh.data();
    a.dcell = dc.data();
    a.dgates = k16 ? nullptr : dgates.data();
    a.dgates_16bit = k16 ? dgates16.data() + shift : nullptr;
    if (!emulate_launch<BackwardParams>(a, bplan, order, 11, fill_backward_params,
                                        persistent_backward_kernel<kOp>)) return "segments";
    if (k16) {
      for (int64_t e = 0; e < N * 4 * H; ++e) {
        dgates[e] = static_cast<float>(
            emu::bits16_value(dgates16[shift + e], kOp == Operand::kBFloat16));
      }
    }
    std::string e;
    if (!(e = compare("dgates", dgates, bref.dgates, kTol)).empty()) return "backward: " + e;
    if (!(e = compare("dh0", dh, bref.dh0, kTol)).empty()) return "backward: " + e;
    if (!(e = compare("dc0", dc, bref.dc0, kTol)).empty()) return "backward: " + e;
    std::vector<float> all = dgates;
    all.insert(all.end(), dh.begin(), dh.end());
    all.insert(all.end(), dc.begin(), dc.end());
    if (!same_bits_as_first(first_bwd, all)) {
      return "backward: results depend on the scheduling order (race)";
    }
  }
  return "";
}

std::string run_case(const Case& c, std::string& info) {
  switch (c.op) {
    case Operand::kBFloat16: return run_case_as<Operand::kBFloat16>(c, info);
    case Operand::kFloat16: return run_case_as<Operand::kFloat16>(c, info);
    case Operand::kTf32: return run_case_as<Operand::kTf32>(c, info);
    default: return run_case_as<Operand::kFloat32>(c, info);
  }
}

std::vector<Case> float32_cases() {
  std::vector<Case> v;
  // 3 blocks of 8 units; one chunk of everything.
  v.push_back({"seq", 24, {5, 5, 5}});
  // reverse direction of packed input, second direction's columns (rows start from h0/c0
  // mid-sequence), two K chunks and a partial last block in the backward
  Case packed{"packed-reverse", 24, {6, 4, 4, 1}, true, 2};
  v.push_back(packed);
  Case packed_fwd{"packed-forward", 24, {6, 4, 4, 1}, false, 2};
  v.push_back(packed_fwd);
  // H % 4 != 0: scalar staging, zero padding of K; the last block has 5 of 8 units
  Case odd{"odd-hidden", 13, {4, 4}, true, 2};
  odd.sm_count = 3;
  odd.unaligned_dgates = true;
  v.push_back(odd);
  Case b1{"batch-1", 24, {7}};
  v.push_back(b1);
  // 5..8 rows: the forward computes 2 of its 4 rows per lane
  Case b7{"batch-7", 20, {4, 4, 4, 4, 4, 4, 4}};
  v.push_back(b7);
  // 9..12 rows: 3 of 4 rows per lane are real (the full tile is computed)
  Case b11{"batch-11", 16, std::vector<int64_t>(11, 3)};
  v.push_back(b11);
  // batch sizes 13, 12, 9, 8, 5, 4, 1 over the steps: every edge of rows per lane
  Case edges{"row-edges", 16, {7, 6, 6, 6, 5, 4, 4, 4, 3, 2, 2, 2, 1}};
  v.push_back(edges);
  Case no_gy{"no-grad-output", 16, {3, 3, 2}};
  no_gy.grad_output = false;
  no_gy.bias = false;
  v.push_back(no_gy);
  // rows in two chunks (B = 20 > 16) and K in chunks (little shared memory)
  Case chunks{"chunks", 40, {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 1}};
  chunks.sm_count = 5;
  chunks.avail_forward = 4096;
  chunks.avail_backward = 2048;
  v.push_back(chunks);
  // forward K chunks: 8 blocks of 36 units (the last has 12), 9 column tiles, 1 slice
  Case wide{"wide-k-chunks", 264, {2, 2}};
  wide.sm_count = 8;
  wide.avail_forward = 2400;
  wide.avail_backward = 2400;
  v.push_back(wide);
  // more rows than threads: rows_chunk 256, three row chunks
  Case big{"big-batch", 8, std::vector<int64_t>(600, 2)};
  big.sm_count = 2;
  v.push_back(big);
  return v;
}

// Each case in float32, then with the tensor-core kernels: 16-bit in bfloat16 and float16, and
// TF32.
std::vector<Case> cases() {
  std::vector<Case> v;
  for (const Case& c : float32_cases()) {
    v.push_back(c);
    for (auto [op, suffix] : {std::pair{Operand::kBFloat16, "-bf16"},
                              std::pair{Operand::kFloat16, "-fp16"},
                              std::pair{Operand::kTf32, "-tf32"}}) {
      Case tensor_cores = c;
      tensor_cores.name += suffix;
      tensor_cores.op = op;
      v.push_back(tensor_cores);
    }
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) { return emu::run_cases(argc, argv, cases(), run_case); }
