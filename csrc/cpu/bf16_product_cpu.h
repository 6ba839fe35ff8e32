// The recurrent product of the CPU sequence kernels on bfloat16 operands with fp32
// accumulation: out = a W^T, W packed once per call of the sequence kernel, on AMX tiles where
// the CPU (and the OS) allow them, else on AVX512_BF16 dot products. Framework-free: raw
// pointers, no allocation per product, the calling thread only (the sequence kernel's threads
// each multiply their own slice). The MKL bf16 GEMM the per-step path uses re-packs W at every
// call and runs its own threads; at one step's size that is most of its time (bench/NOTES.md).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace lstm_fused {
namespace cpu {

// Which instructions compute the product.
enum class Bf16Product { kNone, kAvx512, kAmx };

// The kind the sequence kernels use now. The setting (set_bf16_product; at start-up
// LSTM_FUSED_BF16_PRODUCT) is "auto": kAmx with AMX-BF16 and the kernel's permission for tile
// data (arch_prctl), else kAvx512 on AMD CPUs with AVX512_BF16, else kNone (the sequence
// kernels then decline and the driver runs its per-step path with MKL's bf16 GEMM); or one
// of "amx", "avx512", "none" (the tests run each kind on one machine).
Bf16Product bf16_product_kind();
const char* bf16_product_name(Bf16Product kind);
// Sets the setting (checked against the CPU: "amx" / "avx512" where it has them); returns
// the previous one.
std::string set_bf16_product(const std::string& kind);

// Memory aligned for the product's 64-byte loads and stores.
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], AlignedFree>;
// `count` values of T, zeroed.
template <typename T>
AlignedBuffer<T> aligned_zeros(int64_t count);

// W (n x k, bfloat16 bits) packed for out (rows x n) = a (rows x k) W^T. Operands of
// multiply() are padded so that every tile is whole: rows to kRowBlock, a's columns to
// padded_depth() (those columns must hold zeros), out's columns to padded_cols(); the padding
// rows of a may hold anything (row m of a only reaches row m of out).
class Bf16Weight {
 public:
  static constexpr int64_t kRowBlock = 16;    // rows of an AMX tile
  static constexpr int64_t kColBlock = 16;    // fp32 columns of a tile / a zmm register
  static constexpr int64_t kDepthBlock = 32;  // bf16 values of a tile row (64 bytes)

  // W[n][d] = value(n, d) (bfloat16 bits) for n < n_rows, d < k.
  template <typename Value>
  Bf16Weight(int64_t n_rows, int64_t k, Bf16Product kind, const Value& value);
  // Row n of W is first[n][0, split) then second[n][0, k - split), each contiguous: a slice's
  // rows of [W_ih, W_hh] (second unused where split == k). A row at a time, its pairs as they
  // lie in memory: no index arithmetic per value (which cost 1.2 ms of a 21 ms call at H512).
  struct RowParts {
    std::vector<const uint16_t*> first, second;
    int64_t split;
  };
  Bf16Weight(const RowParts& rows, int64_t k, Bf16Product kind);

  // W[n][d] = w[d * depth_stride + n] for n < n_rows, d < k: W^T row-major (dG, (N x 4H), in
  // the weight gradients' products). 16 neighbouring values at a time, vectorised; with
  // `parallel` the column blocks shared out among the library's threads (bf16_mm's operands).
  struct FromTransposed {};
  Bf16Weight(FromTransposed, const uint16_t* w, int64_t n_rows, int64_t k, int64_t depth_stride,
             Bf16Product kind, bool parallel = false);

  static int64_t round_up(int64_t value, int64_t block) {
    return (value + block - 1) / block * block;
  }
  // a's row length for a depth of k (padded_depth() of a weight of depth k).
  static int64_t depth_padding(int64_t k) { return round_up(k, kDepthBlock); }
  int64_t padded_depth() const { return k_pad_; }
  int64_t padded_cols() const { return n_pad_; }

  // out (round_up(rows, kRowBlock) x padded_cols(), fp32, row stride ldo) = a (as many rows x
  // padded_depth(), bf16, row stride lda) W^T.
  void multiply(int64_t rows, float* out, int64_t ldo, const uint16_t* a, int64_t lda) const;
  // The same product with a as pairs along the depth: (a[i][2p], a[i][2p + 1]) at
  // a_pairs[p * ld + i], ld >= rows rounded up to 4, the pairs past the depth zero (a^T's rows
  // interleaved two by two: a transposed operand without a transposing copy). Dot products
  // only: an AMX tile reads rows of a.
  bool multiplies_pairs() const { return kind_ == Bf16Product::kAvx512; }
  void multiply_pairs(int64_t rows, float* out, int64_t ldo, const uint32_t* a_pairs,
                      int64_t ld) const;

 private:
  // Zeroed storage for W (n_rows x k); pack() fills it, fill(out, first, columns, depth)
  // writing the pairs of W[first .. first + columns)[depth, depth + 1] at out.
  Bf16Weight(int64_t n_rows, int64_t k, Bf16Product kind);
  // fill() for column blocks [first_block, last_block) (all of them: pack(fill)).
  template <typename Fill>
  void pack_blocks(const Fill& fill, int64_t first_block, int64_t last_block);
  template <typename Fill>
  void pack(const Fill& fill) {
    pack_blocks(fill, 0, n_pad_ / kColBlock);
  }
  static void check_kind(Bf16Product kind);  // not kNone
  Bf16Product kind_;
  int64_t n_, k_, n_pad_, k_pad_;
  // Column block b, pair p of the depth, column c: the pair (W[16b + c][2p], W[16b + c][2p+1])
  // at (b * k_pad / 2 + p) * 16 + c: an AMX B tile (VNNI layout) per 32 of the depth, and one
  // zmm per pair for the dot products.
  AlignedBuffer<uint32_t> packed_;
};

// out (m x n, fp32, row stride ldo) [+]= A B, A (m x k) and B (k x n) bfloat16 bits at any
// element strides (a[i * a_row + d * a_col], b[d * b_row + j * b_col]): a large GEMM on this
// product, with the library's threads. One operand is packed once (a Bf16Weight of B^T, or of
// A for out^T = B^T A^T: whichever moves fewer values one at a time, see bf16_mm); each thread
// copies 64 rows of the other at a time into a padded buffer and multiplies them into a
// buffer of its own, then writes or adds to out. For the 16-bit mode's large GEMMs where MKL's
// bf16 GEMM lacks the CPU's dot products (mixed_gemm.h).
void bf16_mm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t a_row, int64_t a_col,
             const uint16_t* b, int64_t b_row, int64_t b_col, float* out, int64_t ldo,
             bool accumulate, Bf16Product kind);

// One block of 16 rows of W at a time, along the depth: the reads stay within 16 rows of
// W_hh (or run along 16 neighbouring values of its columns), and the writes are sequential (a
// whole W_hh row per step of n thrashed the TLB: at H1024 packing took 8 ms per call).
template <typename Fill>
void Bf16Weight::pack_blocks(const Fill& fill, int64_t first_block, int64_t last_block) {
  const int64_t block_stride = k_pad_ / 2 * kColBlock;
  for (int64_t block = first_block; block < last_block && block * kColBlock < n_; ++block) {
    uint32_t* out = packed_.get() + block * block_stride;
    const int64_t first = block * kColBlock;
    const int64_t columns = n_ - first < kColBlock ? n_ - first : kColBlock;
    for (int64_t depth = 0; depth < k_; depth += 2, out += kColBlock) {
      fill(out, first, columns, depth);
    }
  }
}

template <typename Value>
Bf16Weight::Bf16Weight(int64_t n_rows, int64_t k, Bf16Product kind, const Value& value)
    : Bf16Weight(n_rows, k, kind) {
  pack([&](uint32_t* out, int64_t first, int64_t columns, int64_t depth) {
    for (int64_t c = 0; c < columns; ++c) {
      const uint32_t low = value(first + c, depth);
      const uint32_t high = depth + 1 < k ? value(first + c, depth + 1) : 0;
      out[c] = low | (high << 16);
    }
  });
}

}  // namespace cpu
}  // namespace lstm_fused
