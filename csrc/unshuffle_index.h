// Index arithmetic of the decoder-input unshuffle-scatter, shared by the CPU implementation
// (csrc/unshuffle.cpp) and the CUDA kernels (csrc/cuda/unshuffle_kernels.cu): the CPU tests
// exercise exactly the arithmetic the GPU runs.
//
// Shapes (all contiguous, row-major):
//   x            (N, 1+K, D)   row 0 is the cls row, rows 1..K the kept tokens in shuffled order
//   mask_token   (1, 1, D)
//   ids_restore  (N, L) int64  a permutation of 0..L-1 per sample; position l is kept iff
//                              ids_restore[n, l] < K, and then holds x[n, 1 + ids_restore[n, l]]
//   pos_embed    (1, 1+L, D)   optional, added to every output row
//   out          (N, 1+L, D)   row 0 = x row 0, row 1+l = kept token or mask_token, (+ pos_embed)
//
// Decoder-side masking (not in the official code; len_decode = M >= 0, K + M <= L): the output
// is in decoder order instead, out (N, 1+K+M, D): row 0 = cls, row 1+r = the patch l with
// ids_restore[n, l] = r for every r < K + M (x row 1+r if r < K, else mask_token), plus that
// patch's pos_embed row 1+l. Patches with ids_restore >= K + M are dropped (no row). Every kernel
// walks the source slots t (0 = cls, 1+l = patch l) exactly as in the official layout; only the
// output row a slot lands in changes (dest_row), so M = -1 (official) is today's code path.
//
// Backward (the official gather's scatter-add, with ids_restore a permutation):
//   grad_x[n, 0]               = grad_out[n, 0]
//   grad_x[n, 1+ids_restore[n,l]] = grad_out[n, 1+l]        for every kept l
//   grad_mask_token            = sum over n and removed l of grad_out[n, 1+l]
// The mask-token sum is deterministic: the rows of each sample are cut into chunks of
// kRowsPerChunk; each (n, chunk) sums its removed rows in order into a partial, and the
// partials are summed in a fixed order. No float atomics anywhere.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "hd.h"

namespace mae_fast {
namespace unshuffle {

struct Dims {
  int64_t N;  // samples
  int64_t L;  // patches (output has 1+L rows)
  int64_t K;  // kept patches, len_keep (x has 1+K rows)
  int64_t D;  // channels
  int64_t M = -1;  // decoder-side masking: masked patches decoded (out has 1+K+M rows); -1: official
};

// Patch rows of the output: L (official layout), or K + M (decoder-side masking).
MAE_FAST_HD int64_t out_rows(const Dims& d) { return d.M < 0 ? d.L : d.K + d.M; }

// Rows of the output are handled in chunks of this many patches in the backward.
constexpr int64_t kRowsPerChunk = 32;

// At least one chunk per sample, also when L = 0: chunk 0 is what copies the cls row of grad_x
// (and zeroes its partial), so with no chunk at all grad_x[n, 0] would never be written.
MAE_FAST_HD int64_t num_chunks(const Dims& d) {
  const int64_t chunks = (d.L + kRowsPerChunk - 1) / kRowsPerChunk;
  return chunks > 0 ? chunks : 1;
}

// Element offset of row t of sample n of out / grad_out.
MAE_FAST_HD int64_t out_offset(const Dims& d, int64_t n, int64_t t) { return (n * (1 + out_rows(d)) + t) * d.D; }

// Element offset of row s of sample n of x / grad_x.
MAE_FAST_HD int64_t x_offset(const Dims& d, int64_t n, int64_t s) { return (n * (1 + d.K) + s) * d.D; }

// Element offset of row t of pos_embed (broadcast over samples).
MAE_FAST_HD int64_t pos_offset(const Dims& d, int64_t t) { return t * d.D; }

// Element offset of the mask-token partial sum of chunk c of sample n: partial (N, chunks, D).
MAE_FAST_HD int64_t partial_offset(const Dims& d, int64_t n, int64_t c) {
  return (n * num_chunks(d) + c) * d.D;
}

// The row of x that output row t (0 = cls) of sample n copies, or -1 where it holds the mask
// token. An index outside [0, L) (which the host-side checks reject) reads as a mask token, so
// a bad index can never make a kernel touch memory outside x.
MAE_FAST_HD int64_t source_row(const Dims& d, const int64_t* ids_restore, int64_t n, int64_t t) {
  if (t == 0) return 0;
  const int64_t r = ids_restore[n * d.L + (t - 1)];
  return (r >= 0 && r < d.K) ? 1 + r : -1;
}

// The output row that source slot t (0 = cls, 1+l = patch l) of sample n lands in: t itself in the
// official layout; with decoder-side masking 1 + ids_restore[n, l] if that is < K + M, else -1
// (dropped: no output row, no gradient). An index outside [0, K + M) is dropped, so a bad index
// never makes a kernel write outside out (a repeated one leaves rows unwritten; the host-side
// permutation check rejects it).
MAE_FAST_HD int64_t dest_row(const Dims& d, const int64_t* ids_restore, int64_t n, int64_t t) {
  if (t == 0 || d.M < 0) return t;
  const int64_t r = ids_restore[n * d.L + (t - 1)];
  return (r >= 0 && r < d.K + d.M) ? 1 + r : -1;
}

// Slots [first, last) of chunk c, as source slots t (1-based: patch l is slot 1+l).
MAE_FAST_HD int64_t chunk_first_row(const Dims& d, int64_t c) { (void)d; return 1 + c * kRowsPerChunk; }
MAE_FAST_HD int64_t chunk_last_row(const Dims& d, int64_t c) {
  const int64_t last = 1 + (c + 1) * kRowsPerChunk;
  return last < 1 + d.L ? last : 1 + d.L;
}

// One output element: the source value plus the positional value, added in the op-math type and
// rounded once, which is what PyTorch's `x + pos_embed` does for every dtype (bit-exact).
template <typename scalar_t>
MAE_FAST_HD scalar_t add_pos(scalar_t value, scalar_t pos) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(value) + static_cast<acc_t>(pos));
}

}  // namespace unshuffle
}  // namespace mae_fast
