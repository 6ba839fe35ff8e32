// bfloat16 products of the CPU sequence kernels (bf16_product_cpu.h): AMX tiles and
// AVX512_BF16 dot products. Only the AVX-512 library has them (a CPU that loads the AVX2 or
// default library has neither, and those hold no AVX-512 instruction: test_cpu_dispatch);
// there bf16_product_kind() is kNone. The kernels carry AMX / AVX512_BF16 as function targets,
// and cpuid decides at run time which one runs.
#include "bf16_product_cpu.h"

#include "../env_switch.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#define LSTM_FUSED_TARGET_AMX __attribute__((target("avx512f,amx-tile,amx-bf16")))
#define LSTM_FUSED_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))

namespace lstm_fused {
namespace cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
// Linux gives a process AMX's tile data (8 KiB of state per thread) only on request.
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

// What this CPU and OS can run.
struct Support {
  bool amx = false, avx512_bf16 = false, amd = false;
};

const Support& support() {
  static const Support s = [] {
    Support found;
#if defined(CPU_CAPABILITY_AVX512)
    __builtin_cpu_init();
    found.avx512_bf16 =
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
    found.amx = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("amx-tile") &&
                __builtin_cpu_supports("amx-bf16") && amx_permitted();
    found.amd = __builtin_cpu_is("amd");
#endif
    return found;
  }();
  return s;
}

// The setting: "auto", "amx", "avx512" or "none".
EnvChoice& setting() {
  static EnvChoice choice("LSTM_FUSED_BF16_PRODUCT", {"auto", "amx", "avx512", "none"});
  return choice;
}

#if defined(CPU_CAPABILITY_AVX512)

// ---- AMX: C tiles 0-3 (2 x 2 blocks of 16 x 16 fp32), A tiles 4-5, B tiles 6-7 -----------

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// kRows x kCols tiles of 16 x 16 fp32 at out (row stride ldo): a (16 kRows rows) times the
// column blocks at `panel` (kCols of them, `block_stride` apart), over k_blocks of 32.
template <int kRows, int kCols>
LSTM_FUSED_TARGET_AMX void amx_block(const uint16_t* a, int64_t lda, const uint32_t* panel,
                                     int64_t block_stride, int64_t k_blocks, float* out,
                                     int64_t ldo) {
  const int64_t a_bytes = lda * 2, out_bytes = ldo * 4;
  _tile_zero(0);
  if constexpr (kCols > 1) _tile_zero(1);
  if constexpr (kRows > 1) _tile_zero(2);
  if constexpr (kRows > 1 && kCols > 1) _tile_zero(3);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    // A: 16 rows x 32 bf16; B: 16 pairs x 16 columns (VNNI), 1 KiB contiguous
    _tile_loadd(4, a + kb * 32, a_bytes);
    _tile_loadd(6, panel + kb * 256, 64);
    if constexpr (kCols > 1) _tile_loadd(7, panel + block_stride + kb * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kCols > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kRows > 1) {
      _tile_loadd(5, a + 16 * lda + kb * 32, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kCols > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, out_bytes);
  if constexpr (kCols > 1) _tile_stored(1, out + 16, out_bytes);
  if constexpr (kRows > 1) _tile_stored(2, out + 16 * ldo, out_bytes);
  if constexpr (kRows > 1 && kCols > 1) _tile_stored(3, out + 16 * ldo + 16, out_bytes);
}

LSTM_FUSED_TARGET_AMX void amx_multiply(int64_t rows, int64_t n_pad, int64_t k_pad,
                                        const uint32_t* packed, float* out, int64_t ldo,
                                        const uint16_t* a, int64_t lda) {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = 16;
    config.bytes_per_row[tile] = 64;
  }
  _tile_loadconfig(&config);
  const int64_t block_stride = k_pad / 2 * 16, k_blocks = k_pad / 32;
  const int64_t row_blocks = Bf16Weight::round_up(rows, 16) / 16, col_blocks = n_pad / 16;
  // Column blocks in chunks whose weights fit half of a core's L2 (1 MiB on Zen 4, 2 MiB on
  // Sapphire Rapids): a chunk's weights stay there while every row block passes, and a is
  // read once per chunk (at B256 H1024 the slice's W_hh is 4 MiB).
  constexpr int64_t kChunkBytes = int64_t(1) << 19;
  const int64_t chunk = std::max<int64_t>(2, kChunkBytes / (block_stride * 4) / 2 * 2);
  for (int64_t chunk_begin = 0; chunk_begin < col_blocks; chunk_begin += chunk) {
  const int64_t chunk_end = std::min(col_blocks, chunk_begin + chunk);
  for (int64_t rb = 0; rb < row_blocks; rb += 2) {
  for (int64_t cb = chunk_begin; cb < chunk_end; cb += 2) {
    const uint32_t* panel = packed + cb * block_stride;
    const bool two_cols = cb + 1 < chunk_end;
    {
      const uint16_t* a_rows = a + rb * 16 * lda;
      float* out_block = out + rb * 16 * ldo + cb * 16;
      if (rb + 1 < row_blocks) {
        if (two_cols) {
          amx_block<2, 2>(a_rows, lda, panel, block_stride, k_blocks, out_block, ldo);
        } else {
          amx_block<2, 1>(a_rows, lda, panel, block_stride, k_blocks, out_block, ldo);
        }
      } else if (two_cols) {
        amx_block<1, 2>(a_rows, lda, panel, block_stride, k_blocks, out_block, ldo);
      } else {
        amx_block<1, 1>(a_rows, lda, panel, block_stride, k_blocks, out_block, ldo);
      }
    }
  }
  }
  }
  _tile_release();  // the tile state is large: give it back (as oneDNN does)
}

// ---- AVX512_BF16: 4 rows x kCols zmm columns of accumulators -------------------------------

// The pair (a[i][2p], a[i][2p + 1]) of row i: from a row-major a (lda in values), or with
// kPairMajor from pairs laid out along the depth (a32[p * lda + i], lda in pairs: a^T's rows
// interleaved two by two, which a transposed operand gets without a transposing copy).
template <bool kPairMajor>
inline int32_t pair_of(const uint16_t* a, int64_t lda, int64_t i, int64_t p) {
  int32_t pair;
  std::memcpy(&pair, kPairMajor ? a + 2 * (p * lda + i) : a + i * lda + 2 * p, sizeof(pair));
  return pair;
}

template <int kCols, bool kPairMajor>
LSTM_FUSED_TARGET_AVX512_BF16 void dot_block(const uint16_t* a, int64_t lda,
                                             const uint32_t* panel, int64_t block_stride,
                                             int64_t pairs, float* out, int64_t ldo) {
  constexpr int kRows = 4;
  __m512 acc[kRows][kCols];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[kCols];
    for (int j = 0; j < kCols; ++j) {
      w[j] = (__m512bh)_mm512_load_si512(panel + j * block_stride + p * 16);
    }
    for (int i = 0; i < kRows; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair_of<kPairMajor>(a, lda, i, p));
      for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, w[j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kCols; ++j) _mm512_storeu_ps(out + i * ldo + j * 16, acc[i][j]);
}

template <bool kPairMajor>
LSTM_FUSED_TARGET_AVX512_BF16 void dot_multiply(int64_t rows, int64_t n_pad, int64_t k,
                                                int64_t k_pad, const uint32_t* packed,
                                                float* out, int64_t ldo, const uint16_t* a,
                                                int64_t lda) {
  const int64_t block_stride = k_pad / 2 * 16, col_blocks = n_pad / 16;
  const int64_t pairs = (k + 1) / 2;  // the padding beyond holds zeros in a and in W
  const int64_t row_end = Bf16Weight::round_up(rows, 4);
  for (int64_t cb = 0; cb < col_blocks; cb += 4) {
    const uint32_t* panel = packed + cb * block_stride;
    const int64_t cols = std::min<int64_t>(4, col_blocks - cb);
    for (int64_t r = 0; r < row_end; r += 4) {
      const uint16_t* a_rows = kPairMajor ? a + 2 * r : a + r * lda;
      float* out_block = out + r * ldo + cb * 16;
      switch (cols) {
        case 4:
          dot_block<4, kPairMajor>(a_rows, lda, panel, block_stride, pairs, out_block, ldo);
          break;
        case 3:
          dot_block<3, kPairMajor>(a_rows, lda, panel, block_stride, pairs, out_block, ldo);
          break;
        case 2:
          dot_block<2, kPairMajor>(a_rows, lda, panel, block_stride, pairs, out_block, ldo);
          break;
        default:
          dot_block<1, kPairMajor>(a_rows, lda, panel, block_stride, pairs, out_block, ldo);
          break;
      }
    }
  }
}

#endif  // CPU_CAPABILITY_AVX512

}  // namespace

Bf16Product bf16_product_kind() {
  const Support& cpu = support();
  const std::string chosen = setting().get();
  if (chosen == "none") return Bf16Product::kNone;
  if ((chosen == "auto" || chosen == "amx") && cpu.amx) return Bf16Product::kAmx;
  // vdpbf16ps pays on Zen 4 (twice its fp32 FMA rate), not on Intel's cores with AMX, where it
  // measured half the fp32 FMA rate (bench/NOTES.md): elsewhere only when asked for.
  if ((chosen == "avx512" || (chosen == "auto" && cpu.amd)) && cpu.avx512_bf16) {
    return Bf16Product::kAvx512;
  }
  return Bf16Product::kNone;
}

std::string set_bf16_product(const std::string& kind) {
  const Support& cpu = support();
  TORCH_CHECK(kind == "auto" || kind == "amx" || kind == "avx512" || kind == "none",
              "lstm_fused: the bfloat16 product must be one of 'auto', 'amx', 'avx512', "
              "'none'; got '", kind, "'");
  TORCH_CHECK(kind != "amx" || cpu.amx,
              "lstm_fused: this CPU (or its OS, or the SIMD level of the loaded library) does "
              "not run AMX-BF16 tiles");
  TORCH_CHECK(kind != "avx512" || cpu.avx512_bf16,
              "lstm_fused: this CPU (or the SIMD level of the loaded library) has no "
              "AVX512_BF16");
  return setting().exchange(kind);
}

const char* bf16_product_name(Bf16Product kind) {
  switch (kind) {
    case Bf16Product::kAmx: return "amx";
    case Bf16Product::kAvx512: return "avx512";
    default: return "none";
  }
}

template <typename T>
AlignedBuffer<T> aligned_zeros(int64_t count) {
  const size_t bytes = Bf16Weight::round_up(std::max<int64_t>(count, 1) * sizeof(T), 64);
  void* memory = std::aligned_alloc(64, bytes);
  TORCH_CHECK(memory != nullptr, "lstm_fused: out of memory (", bytes, " bytes)");
  std::memset(memory, 0, bytes);
  return AlignedBuffer<T>(static_cast<T*>(memory));
}
template AlignedBuffer<uint16_t> aligned_zeros<uint16_t>(int64_t);
template AlignedBuffer<uint32_t> aligned_zeros<uint32_t>(int64_t);
template AlignedBuffer<float> aligned_zeros<float>(int64_t);

void Bf16Weight::check_kind(Bf16Product kind) {
  TORCH_INTERNAL_ASSERT(kind != Bf16Product::kNone, "Bf16Weight: no bf16 product to pack for");
}

Bf16Weight::Bf16Weight(int64_t n_rows, int64_t k, Bf16Product kind)
    : kind_(kind), n_(n_rows), k_(k), n_pad_(round_up(n_rows, kColBlock)),
      k_pad_(depth_padding(k)), packed_(aligned_zeros<uint32_t>(n_pad_ * k_pad_ / 2)) {
  check_kind(kind);
}

namespace {

// out[c] = the pair (low[c], low[c + stride]) for c < count, its high halves zero without
// `high` (past an odd depth): two neighbouring rows of a row-major matrix interleaved, the
// pairs along its columns (FromTransposed's blocks, bf16_mm's pair-major A).
inline void interleave_pairs(const uint16_t* low, int64_t stride, bool high, int64_t count,
                             uint32_t* out) {
  if (high) {
    const uint16_t* next = low + stride;
    for (int64_t c = 0; c < count; ++c) {
      out[c] = static_cast<uint32_t>(low[c]) | (static_cast<uint32_t>(next[c]) << 16);
    }
  } else {
    for (int64_t c = 0; c < count; ++c) out[c] = low[c];
  }
}

}  // namespace

Bf16Weight::Bf16Weight(FromTransposed, const uint16_t* w, int64_t n_rows, int64_t k,
                       int64_t depth_stride, Bf16Product kind, bool parallel)
    : Bf16Weight(n_rows, k, kind) {
  const auto fill = [&](uint32_t* out, int64_t first, int64_t columns, int64_t depth) {
    const uint16_t* low = w + depth * depth_stride + first;
    if (columns == kColBlock) {  // a whole block: a constant count, vectorised
      interleave_pairs(low, depth_stride, depth + 1 < k, kColBlock, out);
    } else {
      interleave_pairs(low, depth_stride, depth + 1 < k, columns, out);
    }
  };
  const int64_t blocks = n_pad_ / kColBlock;
  if (parallel) {
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      pack_blocks(fill, first, last);
    });
  } else {
    pack(fill);
  }
}

Bf16Weight::Bf16Weight(const RowParts& rows, int64_t k, Bf16Product kind)
    : Bf16Weight(static_cast<int64_t>(rows.first.size()), k, kind) {
  TORCH_INTERNAL_ASSERT(rows.split <= k &&
                        (rows.split == k || rows.second.size() == rows.first.size()));
  // Row n copied whole (its tail past k stays zero: the padding pair), then its pairs written
  // down column n % 16 of its block: a 64-byte stride within the block's k_pad * 32 bytes.
  std::vector<uint32_t> pairs(k_pad_ / 2, 0);
  uint16_t* values = reinterpret_cast<uint16_t*>(pairs.data());
  const int64_t block_stride = k_pad_ / 2 * kColBlock, used = (k + 1) / 2;
  for (int64_t n = 0; n < n_; ++n) {
    if (rows.split > 0) std::memcpy(values, rows.first[n], rows.split * sizeof(uint16_t));
    if (k > rows.split) {
      std::memcpy(values + rows.split, rows.second[n], (k - rows.split) * sizeof(uint16_t));
    }
    uint32_t* out = packed_.get() + n / kColBlock * block_stride + n % kColBlock;
    for (int64_t p = 0; p < used; ++p) out[p * kColBlock] = pairs[p];
  }
}

void Bf16Weight::multiply(int64_t rows, float* out, int64_t ldo, const uint16_t* a,
                          int64_t lda) const {
  if (rows == 0 || n_ == 0) return;
#if defined(CPU_CAPABILITY_AVX512)
  if (kind_ == Bf16Product::kAmx) {
    amx_multiply(rows, n_pad_, k_pad_, packed_.get(), out, ldo, a, lda);
  } else {
    dot_multiply<false>(rows, n_pad_, k_, k_pad_, packed_.get(), out, ldo, a, lda);
  }
#else
  TORCH_INTERNAL_ASSERT(false, "lstm_fused: no bf16 product below the AVX-512 library");
  (void)out, (void)ldo, (void)a, (void)lda;
#endif
}

void Bf16Weight::multiply_pairs(int64_t rows, float* out, int64_t ldo, const uint32_t* a_pairs,
                                int64_t ld) const {
  TORCH_INTERNAL_ASSERT(multiplies_pairs() && ld >= round_up(rows, 4));
  if (rows == 0 || n_ == 0) return;
#if defined(CPU_CAPABILITY_AVX512)
  dot_multiply<true>(rows, n_pad_, k_, k_pad_, packed_.get(), out, ldo,
                     reinterpret_cast<const uint16_t*>(a_pairs), ld);
#else
  (void)out, (void)ldo, (void)a_pairs;
#endif
}

namespace {

// Rows [row0, row0 + rows) of out (element strides o_row, o_col) = or += those of `src`
// (row stride lds).
void store_rows(const float* src, int64_t lds, int64_t row0, int64_t rows, int64_t n,
                float* out, int64_t o_row, int64_t o_col, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* from = src + i * lds;
    float* dst = out + (row0 + i) * o_row;
    if (o_col == 1 && accumulate) {
      for (int64_t j = 0; j < n; ++j) dst[j] += from[j];
    } else if (o_col == 1) {
      std::memcpy(dst, from, n * sizeof(float));
    } else if (accumulate) {
      for (int64_t j = 0; j < n; ++j) dst[j * o_col] += from[j];
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j * o_col] = from[j];
    }
  }
}

// bf16_mm with out at element strides (out[i * o_row + j * o_col]), B packed. A long depth
// (the weight gradients': k = N, every step's rows) is taken in spans whose packed B stays
// near 1 MiB, not packed whole: at T100 B32 H128 dG packed whole was 3.3 MB beside the
// (N, 4H) bf16 dG itself. With more than one span each row chunk's sums collect in `sums`
// (m x n fp32, the output's size, contiguous however out is strided) and go to out at the
// end: so only where that is smaller than B packed whole (2 m < k).
void bf16_mm_packing_b(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t a_row,
                       int64_t a_col, const uint16_t* b, int64_t b_row, int64_t b_col,
                       float* out, int64_t o_row, int64_t o_col, bool accumulate,
                       Bf16Product kind) {
  constexpr int64_t kSpanBytes = int64_t(1) << 20;
  const int64_t n_pad = Bf16Weight::round_up(n, Bf16Weight::kColBlock);
  const int64_t span =
      2 * m < k ? std::max(Bf16Weight::kDepthBlock, kSpanBytes / (n_pad * 2) /
                                                        Bf16Weight::kDepthBlock *
                                                        Bf16Weight::kDepthBlock)
                : k;
  const int64_t spans = (k + span - 1) / span;
  const AlignedBuffer<float> sums =
      spans > 1 ? aligned_zeros<float>(m * n_pad) : AlignedBuffer<float>();
  constexpr int64_t kChunk = 64;  // rows per task: a multiple of the AMX tile's 16
  static_assert(kChunk % Bf16Weight::kRowBlock == 0, "whole row blocks per chunk");
  // a pair-major chunk's pairs apart: one 64-byte line more than its rows (not a power of two)
  constexpr int64_t kPairStride = kChunk + 16;
  for (int64_t d0 = 0; d0 < k; d0 += span) {
    const int64_t depth = std::min(span, k - d0);
    const uint16_t* b_span = b + d0 * b_row;
    const Bf16Weight weight =
        b_col == 1
            ? Bf16Weight(Bf16Weight::FromTransposed{}, b_span, n, depth, b_row, kind,
                         /*parallel=*/true)
            : Bf16Weight(n, depth, kind, [&](int64_t col, int64_t d) {
                return b_span[d * b_row + col * b_col];
              });
    // A's columns contiguous (a_row 1, a transposed operand: dG^T): pairs of them
    // interleaved, 64 neighbouring values at a time, in place of a copy that transposes
    const bool pair_major = a_col != 1 && a_row == 1 && weight.multiplies_pairs();
    const int64_t k_pad = weight.padded_depth();
    // a's copy one 64-byte line longer than its depth per row: a power-of-two row stride
    // (a span of 1024) put its 64 rows in the same L1 sets, and the transposing copy below
    // ran 5x slower
    const int64_t lda = k_pad + Bf16Weight::kDepthBlock;
    const uint16_t* a_span = a + d0 * a_col;
    at::parallel_for(0, (m + kChunk - 1) / kChunk, 1, [&](int64_t first, int64_t last) {
      // the padding columns of a stay zero; its rows past `rows` in the last chunk only
      // reach the buffer's rows past `rows`, which are not read
      const AlignedBuffer<uint16_t> a_rows =
          aligned_zeros<uint16_t>(pair_major ? 0 : kChunk * lda);
      const AlignedBuffer<uint32_t> a_pairs =
          aligned_zeros<uint32_t>(pair_major ? (depth + 1) / 2 * kPairStride : 0);
      const AlignedBuffer<float> products = aligned_zeros<float>(kChunk * n_pad);
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t row0 = chunk * kChunk, rows = std::min(kChunk, m - row0);
        if (pair_major) {
          for (int64_t p = 0; 2 * p < depth; ++p) {
            interleave_pairs(a_span + row0 + 2 * p * a_col, a_col, 2 * p + 1 < depth, rows,
                             a_pairs.get() + p * kPairStride);
          }
          weight.multiply_pairs(rows, products.get(), n_pad, a_pairs.get(), kPairStride);
        } else if (a_col == 1) {
          for (int64_t i = 0; i < rows; ++i) {
            std::memcpy(a_rows.get() + i * lda, a_span + (row0 + i) * a_row,
                        depth * sizeof(uint16_t));
          }
        } else {
          // along the depth outside, the chunk's rows inside: with A's columns contiguous
          // (a_row 1) each read is 64 neighbouring values
          for (int64_t d = 0; d < depth; ++d) {
            const uint16_t* src = a_span + row0 * a_row + d * a_col;
            for (int64_t i = 0; i < rows; ++i) a_rows[i * lda + d] = src[i * a_row];
          }
        }
        if (!pair_major) weight.multiply(rows, products.get(), n_pad, a_rows.get(), lda);
        if (spans == 1) {
          store_rows(products.get(), n_pad, row0, rows, n, out, o_row, o_col, accumulate);
        } else {
          store_rows(products.get(), n_pad, row0, rows, n, sums.get(), n_pad, 1,
                     /*accumulate=*/d0 > 0);
        }
      }
    });
  }
  if (spans > 1) {
    at::parallel_for(0, (m + kChunk - 1) / kChunk, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t row0 = chunk * kChunk, rows = std::min(kChunk, m - row0);
        store_rows(sums.get() + row0 * n_pad, n_pad, row0, rows, n, out, o_row, o_col,
                   accumulate);
      }
    });
  }
}

#if defined(CPU_CAPABILITY_AVX512)

// bf16 bits to fp32: the bits above 16 zeros.
inline float bf16_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// 16 bf16 values from `bits` as fp32 (the lanes outside `lanes` 0, not read).
inline __m512 bf16_vector(const uint16_t* bits, __mmask16 lanes) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, bits));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// At most this many rows (or columns) of out: bf16_mm_few_rows (the dot block computes 4).
constexpr int64_t kFewRows = 4;

// bf16_mm for a few rows of A (the bias gradient, ones (1 x N) dG), B's rows contiguous
// (b_col 1): fp32 sums of the exact products along the depth, B read as it is, its columns
// in ranges shared out among the threads. Packing B for so few rows cost 20 times the
// product (200 us of a 7.5 ms training call at T100 B32 H128), and the row chunks gave one
// thread all the work.
void bf16_mm_few_rows(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t a_row,
                      int64_t a_col, const uint16_t* b, int64_t b_row, float* out,
                      int64_t o_row, int64_t o_col, bool accumulate) {
  constexpr int64_t kWidth = 128;  // columns per task: 8 zmm of sums
  constexpr int64_t kVectors = kWidth / 16;
  at::parallel_for(0, (n + kWidth - 1) / kWidth, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t j0 = task * kWidth, width = std::min(kWidth, n - j0);
      __mmask16 lanes[kVectors];
      for (int64_t v = 0; v < kVectors; ++v) {
        const int64_t count = std::clamp<int64_t>(width - 16 * v, 0, 16);
        lanes[v] = static_cast<__mmask16>((1u << count) - 1);
      }
      for (int64_t i = 0; i < m; ++i) {
        __m512 sums[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) sums[v] = _mm512_setzero_ps();
        for (int64_t d = 0; d < k; ++d) {
          const __m512 weight = _mm512_set1_ps(bf16_value(a[i * a_row + d * a_col]));
          const uint16_t* row = b + d * b_row + j0;
          for (int64_t v = 0; v < kVectors; ++v) {
            sums[v] = _mm512_fmadd_ps(weight, bf16_vector(row + 16 * v, lanes[v]), sums[v]);
          }
        }
        float values[kWidth];
        for (int64_t v = 0; v < kVectors; ++v) _mm512_storeu_ps(values + 16 * v, sums[v]);
        store_rows(values, kWidth, i, 1, width, out + j0 * o_col, o_row, o_col, accumulate);
      }
    }
  });
}

#endif  // CPU_CAPABILITY_AVX512

}  // namespace

void bf16_mm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t a_row, int64_t a_col,
             const uint16_t* b, int64_t b_row, int64_t b_col, float* out, int64_t ldo,
             bool accumulate, Bf16Product kind) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::memset(out + i * ldo, 0, n * sizeof(float));
    }
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  if (m <= kFewRows && b_col == 1) {
    bf16_mm_few_rows(m, n, k, a, a_row, a_col, b, b_row, out, ldo, 1, accumulate);
    return;
  }
  if (n <= kFewRows && a_row == 1) {  // out^T = B^T A^T
    bf16_mm_few_rows(n, m, k, b, b_col, b_row, a, a_col, out, 1, ldo, accumulate);
    return;
  }
#endif
  // Which operand to pack: the one that moves fewer values one at a time. Packing B with its
  // rows contiguous (b_col 1) and copying rows of A (a_col 1; with the dot products also
  // a_row 1, pairs of its columns interleaved) run 16 or more values at a time, the other
  // cases one (taken as 8 times the cost). The weight gradients dG^T (4H x N) x (N x I) then
  // run as they are (x packed, pairs of dG's rows) with the dot products, and as
  // out^T = x^T dG (dG packed) on AMX; the input projection and dx as they are.
  const bool pairs = kind == Bf16Product::kAvx512;
  const auto cost = [pairs](int64_t a_values, int64_t a_row, int64_t a_col, int64_t b_values,
                            int64_t b_col) {
    const bool a_vectorised = a_col == 1 || (pairs && a_row == 1);
    return a_values * (a_vectorised ? 1 : 8) + b_values * (b_col == 1 ? 1 : 8);
  };
  if (cost(n * k, b_col, b_row, m * k, a_row) < cost(m * k, a_row, a_col, n * k, b_col)) {
    bf16_mm_packing_b(n, m, k, b, b_col, b_row, a, a_col, a_row, out, 1, ldo, accumulate, kind);
  } else {
    bf16_mm_packing_b(m, n, k, a, a_row, a_col, b, b_row, b_col, out, ldo, 1, accumulate, kind);
  }
}

}  // namespace cpu
}  // namespace lstm_fused
