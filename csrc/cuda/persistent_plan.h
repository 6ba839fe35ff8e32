// Host-side arithmetic of the persistent recurrent CUDA kernels (csrc/cuda/lstm_persistent_cuda.cu):
// how the hidden units are split over blocks, how a block's shared memory is laid out, and how
// a (possibly packed) sequence is walked step by step. Pure C++ (no CUDA includes), so it is
// compiled into every build and unit-tested on the CPU through the debug ops of
// csrc/persistent_ops.cpp (tests/test_persistent_plan.py). The step walker is also used by the
// kernels themselves (PERSISTENT_HD = __host__ __device__ under nvcc).
//
// The product of one step, per block: a small GEMM with M = batch rows, N = the block's columns,
// K = the reduction length:
//   forward   G[:, units of all 4 gates] += h[t-1] (B x H) @ W_hh[rows of those gates]^T
//             N = 4U (column c = g*U + u <-> W_hh row g*H + j0 + u), K = H
//   backward  dh_next[:, units] = dG[t] (B x 4H) @ W_hh[:, units]
//             N = U, K = 4H
// The block's W_hh slice (N x K) stays in shared memory for the whole sequence; the other
// operand (h[t-1] or dG[t], the same for every block) is staged per step through shared memory
// in chunks of `rows_chunk` rows x `k_chunk` columns. Each warp owns one (row tile, column
// tile) of the chunk and one of `k_slices` slices of K; the warps' partial sums meet in shared
// memory and are added in a fixed order (deterministic). Warp tiles (lanes x registers):
//   forward  16 rows x 16 columns (4 x 8 lanes, 4 x 2 values each)
//   backward 16 rows x  8 columns (8 x 4 lanes, 2 x 2 values each)
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../lstm_steps.h"

#if defined(__CUDACC__)
#define PERSISTENT_HD __host__ __device__ __forceinline__
#else
#define PERSISTENT_HD inline
#endif

namespace lstm_fused {
namespace persistent {

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;

// One warp's tile: kLaneRows x kLaneCols lanes, each holding kRowsPerLane x kColsPerLane sums.
template <int LaneRows, int RowsPerLane, int ColsPerLane>
struct WarpTile {
  static constexpr int kLaneRows = LaneRows;
  static constexpr int kLaneCols = 32 / LaneRows;
  static constexpr int kRowsPerLane = RowsPerLane;
  static constexpr int kColsPerLane = ColsPerLane;
  static constexpr int kRows = kLaneRows * kRowsPerLane;
  static constexpr int kCols = kLaneCols * kColsPerLane;
};
using ForwardTile = WarpTile<4, 4, 2>;   // 16 x 16
using BackwardTile = WarpTile<8, 2, 2>;  // 16 x 8
static_assert(ForwardTile::kRows == BackwardTile::kRows, "one row-tile height for both passes");
constexpr int kTileRows = ForwardTile::kRows;

// A row chunk's K range is staged in pieces of at least this many columns (unless K is
// shorter) before the plan prefers fewer rows per chunk.
constexpr int64_t kMinKChunk = 256;

// How a block multiplies its slice, and so what the W_hh slice and the staged rows hold in
// shared memory:
//   kFma    float32, exact fp32 FMA (K in groups of 4: one 16-byte load);
//   kTf32   float32 rounded to TF32, the tensor cores' mma.sync m16n8k8 (fp32 accumulators;
//           float32 layers when torch.backends.cuda.matmul.allow_tf32 is set), K step 8;
//   k16Bit  bfloat16 / float16 (the 16-bit GEMM mode), mma.sync m16n8k16, K step 16, half the
//           bytes.
// The warp tiles are the same for all (forward 16 x 16 = two m16n8 products, backward 16 x 8 =
// one), so are the tiles, slices and partial sums of a plan; only K's granularity and the
// bytes per value differ.
enum class Product : int64_t { kFma = 0, kTf32 = 1, k16Bit = 2 };
constexpr int64_t kMmaK = 16;     // K of mma.sync m16n8k16 (16-bit operands)
constexpr int64_t kMmaKTf32 = 8;  // K of mma.sync m16n8k8 (TF32)
PERSISTENT_HD int64_t k_granule(Product product) {
  return product == Product::k16Bit ? kMmaK : product == Product::kTf32 ? kMmaKTf32 : 4;
}
PERSISTENT_HD int64_t operand_bytes_of(Product product) {
  return product == Product::k16Bit ? 2 : 4;
}

enum class Decline : int64_t {
  kNone = 0,
  kInvalidSize = 1,      // hidden, batch, SM count, shared memory or blocks per SM < 1
  kColumnTiles = 2,      // a block's columns need more column tiles than there are warps
  kSharedMemory = 3,     // the W_hh slice, the staging buffer and the state do not fit
  kBackwardBatch = 4,    // backward at batch >= kBackwardMaxBatch: the per-step path wins
};

// The backward stages all of dG[t] (B x 4H) in every block at every step: blocks x B x 4H x 4
// bytes of L2 traffic per step, about 2.3x the time of one efficient GEMM at B = 128
// (bench/NOTES.md). From this batch size on, the backward declines and the per-step path runs.
// A prediction: the first GPU run's benchmark (bench/gpu_check.sh) tunes it.
constexpr int64_t kBackwardMaxBatch = 128;

struct Plan {
  bool ok = false;
  Decline reason = Decline::kInvalidSize;
  int64_t units = 0;         // U: hidden units per block (the last block may have fewer)
  int64_t blocks = 0;        // ceil(H / U): one block per SM (cooperative launch)
  int64_t threads = kThreads;
  int64_t col_tiles = 0;     // ceil(N / tile columns)
  int64_t row_tiles = 0;     // row tiles per chunk
  int64_t rows_chunk = 0;    // row_tiles * 16 rows staged at a time
  int64_t k_slices = 0;      // warps sharing one tile, each summing a slice of K
  int64_t k_total = 0;       // K (H forward, 4H backward)
  int64_t k_chunk = 0;       // columns of K staged at a time (multiple of the product's K
                             // granule: 4, kMmaKTf32 or kMmaK)
  int64_t k_chunks = 0;      // ceil(roundup(K, granule) / k_chunk)
  int64_t w_rows = 0;        // N: rows of the W_hh slice in shared memory
  int64_t w_pitch = 0;       // values per row of the slice (>= roundup(K, granule); its
                             // bytes are an odd multiple of 16)
  int64_t stage_pitch = 0;   // values per staged row (>= k_chunk; the same rule)
  int64_t partial_cols = 0;  // col_tiles * tile columns: row length of the partial sums
  int64_t region_floats = 0; // staging buffer, reused for the partial sums: the larger of both
  int64_t state_floats = 0;  // 2 x B x U per-row state (c and h_n, or dh and dc), rounded to 4
  int64_t stage_offset = 0;  // float offsets of the regions (W slice at 0)
  int64_t state_offset = 0;
  int64_t smem_bytes = 0;    // dynamic shared memory per block
  Product product = Product::kFma;  // so the bytes per value of the W slice and the staged
                                    // rows: operand_bytes_of(product)
};

PERSISTENT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
PERSISTENT_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Row pitch (in values) of a shared-memory matrix: an odd number of 16-byte units, so that 8
// consecutive rows start in 8 different 16-byte bank groups (float32 rows are read with
// 16-byte loads; the 16-bit fragments of mma.sync with 4-byte loads, 8 rows x 4 words a warp).
inline int64_t smem_pitch(int64_t columns, int64_t operand_bytes = 4) {
  const int64_t per_word = 4 / operand_bytes;  // values per 4-byte word
  const int64_t words = ceil_div(std::max<int64_t>(columns, 1), per_word);
  return (round_up(words, 8) + 4) * per_word;
}

namespace detail {

inline Plan try_units(bool backward, int64_t hidden, int64_t batch, int64_t units,
                      int64_t smem_floats, Product product) {
  Plan p;
  p.product = product;
  const int64_t operand_bytes = operand_bytes_of(product);
  p.units = units;
  p.blocks = ceil_div(hidden, units);
  p.k_total = backward ? 4 * hidden : hidden;
  const int64_t tile_cols = backward ? BackwardTile::kCols : ForwardTile::kCols;
  p.w_rows = backward ? units : 4 * units;
  p.col_tiles = ceil_div(p.w_rows, tile_cols);
  p.partial_cols = p.col_tiles * tile_cols;
  if (p.col_tiles > kWarps) {
    p.reason = Decline::kColumnTiles;
    return p;
  }
  const int64_t granule = k_granule(product);
  const int64_t per_word = 4 / operand_bytes;
  const int64_t k_padded = round_up(p.k_total, granule);
  p.w_pitch = smem_pitch(k_padded, operand_bytes);
  const int64_t w_floats = p.w_rows * p.w_pitch / per_word;  // a multiple of 4 (the pitch)
  p.state_floats = round_up(2 * batch * units, 4);
  const int64_t avail = smem_floats - w_floats - p.state_floats;
  p.reason = Decline::kSharedMemory;
  if (avail <= 0) return p;
  const int64_t max_row_tiles = std::min(ceil_div(batch, kTileRows), kWarps / p.col_tiles);
  for (int64_t rt = max_row_tiles; rt >= 1; --rt) {
    const int64_t rows = rt * kTileRows;
    const int64_t slices = kWarps / (rt * p.col_tiles);
    const int64_t partial = slices * rows * p.partial_cols;
    if (partial > avail) continue;
    // Widest chunk whose pitch fits, in words: round_up(kc / per_word, 8) + 4 <= avail / rows
    // (a multiple of 8 words, so of the granule too).
    const int64_t fit = (avail / rows - 4) / 8 * 8 * per_word;
    if (fit < 8 * per_word) continue;
    int64_t kc = std::min(k_padded, fit);
    if (kc < std::min(k_padded, kMinKChunk) && rt > 1) continue;  // fewer rows, longer chunks
    const int64_t chunks = ceil_div(k_padded, kc);
    kc = round_up(ceil_div(k_padded, chunks), granule);  // even chunks; still <= fit
    p.row_tiles = rt;
    p.rows_chunk = rows;
    p.k_slices = slices;
    p.k_chunk = kc;
    p.k_chunks = chunks;
    p.stage_pitch = smem_pitch(kc, operand_bytes);
    p.region_floats = std::max(rows * p.stage_pitch / per_word, partial);
    p.stage_offset = w_floats;
    p.state_offset = w_floats + p.region_floats;
    p.smem_bytes = 4 * (w_floats + p.region_floats + p.state_floats);
    p.ok = true;
    p.reason = Decline::kNone;
    return p;
  }
  return p;
}

}  // namespace detail

// The launch plan of one pass (forward or backward) for hidden size H and batch B on a device
// with `sm_count` SMs, `smem_per_block` bytes of opt-in shared memory per block and room for
// `max_blocks_per_sm` blocks of kThreads threads per SM, for a block product of `product`.
// Units per block: the fewest that keep the grid within sm_count * max_blocks_per_sm blocks,
// rounded up to fill the warp tile's columns when that still fits (same work per block, fewer
// blocks). plan.ok is false, with a
// reason, when nothing fits; the caller then declines (the driver runs the per-step kernels).
// The geometry only: the kernels can run any plan that is ok (tests/emulation does, at every
// batch size); launch_plan adds the speed policy.
inline Plan plan(bool backward, int64_t hidden, int64_t batch, int64_t sm_count,
                 int64_t smem_per_block, int64_t max_blocks_per_sm,
                 Product product = Product::kFma) {
  Plan none;
  none.product = product;
  if (hidden < 1 || batch < 1 || sm_count < 1 || smem_per_block < 1 || max_blocks_per_sm < 1) {
    return none;
  }
  const int64_t max_blocks = sm_count * max_blocks_per_sm;
  const int64_t min_units = ceil_div(hidden, max_blocks);
  const int64_t align = backward ? BackwardTile::kCols : ForwardTile::kCols / 4;
  const int64_t smem_floats = smem_per_block / 4;
  const int64_t rounded = std::min(round_up(min_units, align), hidden);
  Plan best = detail::try_units(backward, hidden, batch, rounded, smem_floats, product);
  if (!best.ok && rounded != min_units) {
    best = detail::try_units(backward, hidden, batch, min_units, smem_floats, product);
  }
  return best;
}

// The plan the CUDA host launches: plan(), unless the speed policy declines first (the backward
// from kBackwardMaxBatch rows on, reason kBackwardBatch).
inline Plan launch_plan(bool backward, int64_t hidden, int64_t batch, int64_t sm_count,
                        int64_t smem_per_block, int64_t max_blocks_per_sm,
                        Product product = Product::kFma) {
  if (backward && batch >= kBackwardMaxBatch) {
    Plan capped;
    capped.reason = Decline::kBackwardBatch;
    capped.product = product;
    return capped;
  }
  return plan(backward, hidden, batch, sm_count, smem_per_block, max_blocks_per_sm, product);
}

// The plan as integers, in this order (the debug op lstm_fused::persistent_plan returns it).
inline std::vector<int64_t> plan_fields(const Plan& p) {
  return {p.ok ? 1 : 0,    static_cast<int64_t>(p.reason),
          p.units,         p.blocks,
          p.threads,       p.col_tiles,
          p.row_tiles,     p.rows_chunk,
          p.k_slices,      p.k_total,
          p.k_chunk,       p.k_chunks,
          p.w_rows,        p.w_pitch,
          p.stage_pitch,   p.partial_cols,
          p.region_floats, p.state_floats,
          p.stage_offset,  p.state_offset,
          p.smem_bytes,    static_cast<int64_t>(p.product),
          operand_bytes_of(p.product)};
}

// ---------------------------------------------------------------------------------------------
// Steps of a (possibly packed) sequence, as runs of equal batch size. The kernels cannot read
// the driver's host arrays, so the layout travels in the kernel's parameters: at most
// kMaxSegments runs (1 for unpacked input; one per distinct sequence length when packed).
// ---------------------------------------------------------------------------------------------
constexpr int kMaxSegments = 64;

struct StepSegments {
  int count = 0;
  int64_t steps = 0;
  int64_t begin[kMaxSegments + 1];  // first step of each run; begin[count] = steps
  int64_t rows[kMaxSegments];       // batch size of the run's steps
  int64_t offset[kMaxSegments];     // row offset (in the flattened sequence) of its first step
};

// Runs of `shape`'s batch sizes; false when there are more than kMaxSegments.
inline bool make_segments(const SequenceShape& shape, StepSegments& out) {
  out.count = 0;
  out.steps = shape.steps;
  for (int64_t t = 0; t < shape.steps; ++t) {
    if (t > 0 && shape.batch_sizes[t] == shape.batch_sizes[t - 1]) continue;
    if (out.count == kMaxSegments) return false;
    out.begin[out.count] = t;
    out.rows[out.count] = shape.batch_sizes[t];
    out.offset[out.count] = shape.offsets[t];
    ++out.count;
  }
  out.begin[out.count] = shape.steps;
  return true;
}

// One step as the kernels see it. `prev` is the step processed before t in the forward pass
// of the direction (t-1, or t+1 when reversed); rows [0, continuing) carry on from it, the
// rest start from h0/c0.
struct StepInfo {
  int64_t rows, offset, continuing, prev_offset;
};

// The run holding step t, searched from `hint` (the previous answer: steps are walked in order).
PERSISTENT_HD int find_segment(const StepSegments& s, int64_t t, int hint) {
  while (hint > 0 && t < s.begin[hint]) --hint;
  while (hint + 1 < s.count && t >= s.begin[hint + 1]) ++hint;
  return hint;
}

PERSISTENT_HD StepInfo step_info(const StepSegments& s, int64_t t, bool reverse, int& hint) {
  StepInfo info;
  hint = find_segment(s, t, hint);
  info.rows = s.rows[hint];
  info.offset = s.offset[hint] + (t - s.begin[hint]) * info.rows;
  const int64_t prev = reverse ? t + 1 : t - 1;
  info.continuing = 0;
  info.prev_offset = 0;
  if (prev >= 0 && prev < s.steps) {
    const int k = find_segment(s, prev, hint);
    const int64_t prev_rows = s.rows[k];
    info.prev_offset = s.offset[k] + (prev - s.begin[k]) * prev_rows;
    info.continuing = info.rows < prev_rows ? info.rows : prev_rows;
  }
  return info;
}

// Step t at position i of a pass's processing order: the forward visits t = 0..T-1 (reversed
// direction: T-1..0), the backward the opposite order.
PERSISTENT_HD int64_t step_at(int64_t i, int64_t steps, bool reverse, bool backward) {
  return (reverse != backward) ? steps - 1 - i : i;
}

// ---------------------------------------------------------------------------------------------
// The switch (csrc/persistent_ops.cpp): environment variable LSTM_FUSED_CUDA_PERSISTENT=1 (read
// once, on first use), or lstm_fused::set_cuda_persistent at run time. Off by default.
// ---------------------------------------------------------------------------------------------
bool enabled();
bool set_enabled(bool on);          // returns the previous state
void count_launch(bool backward);   // launch counters, for tests (lstm_fused::cuda_persistent_stats)
void count_decline(bool backward);  // declines while the switch is on (same op)
// The CUDA per-step path's raw-pointer cuBLAS calls (StepKernels::gemm / copy_rows): off by
// default until a GPU run has passed with them; LSTM_FUSED_CUDA_DIRECT_GEMM=1 or
// lstm_fused::set_cuda_direct_gemm(True).
bool direct_gemm_enabled();

}  // namespace persistent

namespace cuda {
// csrc/cuda/lstm_persistent_cuda.cu: the persistent kernels behind StepKernels<float>'s
// forward_sequence / backward_sequence. They return false (nothing launched) when the switch is
// off or the case does not fit (see Plan, kMaxSegments, cooperative launch, occupancy).
bool persistent_forward_sequence(const ForwardSequenceArgs<float>& args);
bool persistent_backward_sequence(const BackwardSequenceArgs<float>& args);
// Whether a pass of this size would launch on the current device (plan, policy, occupancy),
// for a float32 layer (FMA, or TF32 where allowed now) or a 16-bit one in the 16-bit GEMM
// mode: what tests ask before they expect a launch (lstm_fused::cuda_persistent_would_launch).
bool persistent_would_launch(bool backward, int64_t hidden, int64_t batch, bool operands_16bit);
}  // namespace cuda

}  // namespace lstm_fused
