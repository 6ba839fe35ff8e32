// The 16-bit operand formats of the 16-bit GEMM mode (gemm_operands_16bit in ops.cpp): float32
// values rounded to bfloat16 or IEEE float16 bits, to nearest, ties to even, as torch's
// `.to(torch.bfloat16)` / `.to(torch.float16)` round (c10::BFloat16, c10::Half): NaN stays NaN
// (bfloat16: 0x7FC0, float16: sign | 0x7E00), overflow gives infinity, float16 has subnormals.
// Also TF32's rounding (tf32_round), for the tensor-core product of float32 layers.
// No torch headers: compiled by nvcc into the gate kernels (lstm_steps_kernels.cuh)
// and run on the CPU by its emulator, which checks it against the definition.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lstm_cell.h"  // LSTM_HD

namespace lstm_fused {

enum class Bits16 : int { kBFloat16 = 0, kFloat16 = 1 };

// The bits of a float and the float of bits.
template <typename To, typename From>
LSTM_HD To same_bits_as(From value) {
  static_assert(sizeof(To) == sizeof(From), "same size");
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<From, float>) {
    return __float_as_uint(value);
  } else {
    return __uint_as_float(value);
  }
#else
  To out;
  std::memcpy(&out, &value, sizeof out);
  return out;
#endif
}

LSTM_HD uint32_t float_bits(float value) { return same_bits_as<uint32_t>(value); }
LSTM_HD float float_of_bits(uint32_t bits) { return same_bits_as<float>(bits); }

// A float32 value rounded to TF32 (10 mantissa bits; the low 13 bits of the result are zero),
// to nearest with ties away from zero, as cvt.rna.tf32.f32 and cuBLAS's TF32 mode round the
// operands of the tensor cores (the persistent kernels' TF32 product). NaN stays NaN, and a
// value past the largest TF32 rounds to infinity.
LSTM_HD float tf32_round(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return value;  // NaN
  return float_of_bits((x + 0x1000u) & 0xffffe000u);
}

LSTM_HD uint16_t bfloat16_bits(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  // ties to even: add 0x7fff, plus one when the kept part is odd (an infinity stays one)
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

LSTM_HD uint16_t float16_bits(float value) {
  const uint32_t x = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00;  // NaN
  // 65520 (0x477ff000) and up round to infinity (65520 is the tie of 65504 and 65536)
  if (magnitude >= 0x477ff000u) return sign | 0x7c00;
  if (magnitude >= 0x38800000u) {  // 2^-14 and up: a normal float16
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - (112u << 23)) >> 13);  // exponent 127 -> 15
  }
  if (magnitude < 0x33000000u) return sign;  // below 2^-25: zero (2^-25 itself ties to zero)
  // A subnormal float16 m * 2^-24 (m < 1024; m = 1024 is the smallest normal, same bits):
  // m = the 24-bit significand shifted right by 126 - exponent (14..24), ties to even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exponent;
  uint32_t m = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (m & 1u))) ++m;
  return sign | static_cast<uint16_t>(m);
}

LSTM_HD uint16_t round_bits16(Bits16 format, float value) {
  return format == Bits16::kBFloat16 ? bfloat16_bits(value) : float16_bits(value);
}

}  // namespace lstm_fused
