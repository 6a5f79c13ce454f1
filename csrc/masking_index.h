// Index arithmetic of MAE's random masking (torch.ops.mae_fast.random_masking), shared by the CPU
// implementation (csrc/masking.cpp) and the CUDA kernel (csrc/cuda/masking_kernels.cu): the CPU
// tests exercise exactly the arithmetic the GPU runs.
//
// The official code (mae_fast/reference.py::masking_indices) is
//   ids_shuffle = argsort(noise, 1); ids_restore = argsort(ids_shuffle, 1)
//   ids_keep = ids_shuffle[:, :len_keep]; mask[n, l] = 1 iff ids_restore[n, l] >= len_keep.
// ids_restore[n, l] is the position of patch l in its row's sorted order, i.e. its rank, so
// everything follows from one rank per element, computed directly (O(L) per element, no sort):
//   rank(l)            = #{j : key[j] < key[l]} + #{j < l : key[j] == key[l]}
//   ids_restore[n, l]  = rank(l)
//   ids_keep[n, rank]  = l            for rank < len_keep (ids_shuffle[rank] = l)
//   mask[n, l]         = rank(l) >= len_keep ? 1 : 0
// Ties are broken by index: this is torch.argsort(noise, stable=True). The order of the keys is
// torch's sort order: -inf < ... < -0.0 == +0.0 < ... < +inf < NaN, every NaN equal to every
// other NaN (torch sorts NaN as the largest value). The ranks of a row are a permutation of
// 0..L-1, so ids_keep gets each of its len_keep slots written exactly once.
//
// Shapes (contiguous, row-major): noise (N, L); ids_keep (N, len_keep) int64;
// ids_restore (N, L) int64; mask (N, L) float32.
#pragma once

#include <cstdint>
#include <cstring>

#include <ATen/OpMathType.h>

#include "hd.h"

namespace mae_fast {
namespace masking {

// The longest row (the rank arithmetic is 32-bit; an O(L^2) rank per row is meant for L ~ 1e2-1e3).
constexpr int64_t kMaxL = INT32_MAX;

struct Dims {
  int64_t N;         // rows (samples)
  int64_t L;         // patches per row
  int64_t len_keep;  // kept patches per row, 0 <= len_keep <= L
};

// A signed integer whose order is torch's sort order of the float it came from (see above): the
// IEEE bits as a signed integer, with the magnitude bits flipped for negative values (so that a
// larger magnitude is smaller); -0.0 is made +0.0 first (they compare equal) and every NaN becomes
// the largest key. Signed, so that the CPU's vector compares (pcmpgtd) take it directly.
MAE_FAST_HD int32_t sort_key(float v) {
  if (v != v) return INT32_MAX;  // NaN, any sign or payload (+inf is 0x7F800000, below it)
  if (v == 0.0f) v = 0.0f;       // -0.0 -> +0.0
  int32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits < 0 ? bits ^ INT32_MAX : bits;
}

MAE_FAST_HD int64_t sort_key(double v) {
  if (v != v) return INT64_MAX;
  if (v == 0.0) v = 0.0;
  int64_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits < 0 ? bits ^ INT64_MAX : bits;
}

// The key of one noise value: fp16 / bf16 widen exactly to float (their op-math type), float and
// double map directly. Key<T> is its type (int32_t, or int64_t for double).
template <typename scalar_t>
MAE_FAST_HD auto key_of(scalar_t v) {
  return sort_key(static_cast<at::opmath_type<scalar_t>>(v));
}

template <typename scalar_t>
using Key = decltype(key_of(scalar_t()));

// rank(l) within one row of keys (see above). Written as two branch-free counting loops, the
// first over j < l (ties count: they come first), the second over j > l (ties do not): the CPU
// vectorizes them, and on the GPU a warp's threads (different l) run about L + 32 steps in all.
// Rows are at most kMaxL long (checked on the host), so the count and the loop indices are 32-bit:
// the CPU then compares and counts in the same lanes (4 or 8 at a time).
template <typename key_t>
MAE_FAST_HD int64_t stable_rank(const key_t* keys, int64_t L, int64_t l) {
  const key_t k = keys[l];
  const int32_t L32 = static_cast<int32_t>(L), l32 = static_cast<int32_t>(l);
  int32_t rank = 0;
  for (int32_t j = 0; j < l32; ++j) rank += keys[j] <= k;
  for (int32_t j = l32 + 1; j < L32; ++j) rank += keys[j] < k;
  return rank;
}

// The outputs of element l of row n, given its rank.
MAE_FAST_HD void write_outputs(const Dims& d, int64_t n, int64_t l, int64_t rank, int64_t* ids_keep,
                               int64_t* ids_restore, float* mask) {
  ids_restore[n * d.L + l] = rank;
  mask[n * d.L + l] = rank >= d.len_keep ? 1.0f : 0.0f;
  if (rank < d.len_keep) ids_keep[n * d.len_keep + rank] = l;
}

}  // namespace masking
}  // namespace mae_fast
