// CUDA kernels of the decoder-input unshuffle-scatter. Index arithmetic: ../unshuffle_index.h
// (shared with the CPU implementation). Each thread moves one Pack of VEC elements: 16 bytes when
// D and every pointer allow it (ld.global.v4 / st.global.v4), one element otherwise.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../unshuffle_cuda.h"

namespace mae_fast {
namespace unshuffle {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Packs whose size is a multiple of 16 bytes move as uint4 pieces through the load/store
// intrinsics / PTX, which always emit 128-bit accesses (ld.global.nc.v4 / st.global.v4): plain struct
// copies were split into 32-bit stores in the backward loop. Every pointer given here is read-only
// for the kernel's lifetime (load) or written by one thread only (store).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  Pack<T, VEC> v;
  if constexpr (sizeof(Pack<T, VEC>) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack<T, VEC>) / 16); ++i) {
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p) + i);
      memcpy(reinterpret_cast<char*>(&v) + 16 * i, &bits, 16);
    }
  } else {
    v = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack<T, VEC>) / 16); ++i) {
      uint4 bits;
      memcpy(&bits, reinterpret_cast<const char*>(&v) + 16 * i, 16);
      // a plain (weak) st.global.v4: __stwb's st.global.wb compiles to a STRONG.SM store
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<uint4*>(p) + i),
                   "r"(bits.x), "r"(bits.y), "r"(bits.z), "r"(bits.w));
    }
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
  }
}

// One thread per (source slot: cls or patch, VEC-wide slice of D); a slot dropped by decoder-side
// masking writes nothing.
template <typename T, int VEC>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ mask_token,
                               const int64_t* __restrict__ ids_restore, const T* __restrict__ pos_embed,
                               T* __restrict__ out, Dims dims, int64_t total) {
  const int64_t packs_per_row = dims.D / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs_per_row;
    const int64_t col = (i - row * packs_per_row) * VEC;
    const int64_t n = row / (1 + dims.L);
    const int64_t t = row - n * (1 + dims.L);
    const int64_t r = dest_row(dims, ids_restore, n, t);
    if (r < 0) continue;
    const int64_t s = source_row(dims, ids_restore, n, t);
    const T* src = (s >= 0 ? x + x_offset(dims, n, s) : mask_token) + col;
    Pack<T, VEC> v = load<T, VEC>(src);
    if (pos_embed != nullptr) {
      const Pack<T, VEC> p = load<T, VEC>(pos_embed + pos_offset(dims, t) + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = add_pos(v.v[k], p.v[k]);
    }
    store<T, VEC>(out + out_offset(dims, n, r) + col, v);
  }
}

// One thread per (sample, chunk of rows, VEC-wide slice of D): walks its rows in order, copies
// kept rows to grad_x and sums removed rows into its own partial (no atomics).
template <typename T, int VEC>
__global__ void backward_rows_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ids_restore,
                                     T* __restrict__ grad_x, at::opmath_type<T>* __restrict__ partial,
                                     Dims dims, int64_t total) {
  using acc_t = at::opmath_type<T>;
  const int64_t packs_per_row = dims.D / VEC;
  const int64_t chunks = num_chunks(dims);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t item = i / packs_per_row;
    const int64_t col = (i - item * packs_per_row) * VEC;
    const int64_t n = item / chunks;
    const int64_t c = item - n * chunks;
    if (c == 0) {  // the cls row passes through
      store<T, VEC>(grad_x + x_offset(dims, n, 0) + col, load<T, VEC>(grad_out + out_offset(dims, n, 0) + col));
    }
    Pack<acc_t, VEC> acc;
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc.v[k] = acc_t(0);
    for (int64_t t = chunk_first_row(dims, c); t < chunk_last_row(dims, c); ++t) {
      const int64_t r = dest_row(dims, ids_restore, n, t);
      if (r < 0) continue;  // dropped by decoder-side masking: no gradient
      const Pack<T, VEC> g = load<T, VEC>(grad_out + out_offset(dims, n, r) + col);
      const int64_t s = source_row(dims, ids_restore, n, t);
      if (s >= 0) {
        store<T, VEC>(grad_x + x_offset(dims, n, s) + col, g);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc.v[k] += static_cast<acc_t>(g.v[k]);
      }
    }
    store<acc_t, VEC>(partial + partial_offset(dims, n, c) + col, acc);
  }
}

// grad_mask_token[d] = sum of the N * chunks partials of column d, in a fixed order: thread row
// ty sums partial rows ty, ty + kReduceRows, ... in order, then thread row 0 sums the kReduceRows
// results in order. Same bits on every run.
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 16;

template <typename T>
__global__ void reduce_partials_kernel(const at::opmath_type<T>* __restrict__ partial,
                                       T* __restrict__ grad_mask_token, int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t tile[kReduceRows][kReduceCols + 1];
  const int64_t d = blockIdx.x * int64_t(kReduceCols) + threadIdx.x;
  acc_t sum = acc_t(0);
  if (d < D) {
    for (int64_t r = threadIdx.y; r < rows; r += kReduceRows) sum += partial[r * D + d];
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int k = 0; k < kReduceRows; ++k) total += tile[k][threadIdx.x];
    grad_mask_token[d] = static_cast<T>(total);
  }
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

template <typename T, int VEC>
void forward_typed(const void* x, const void* mask_token, const int64_t* ids_restore, const void* pos_embed,
                   void* out, const Dims& dims, cudaStream_t stream) {
  const int64_t total = dims.N * (1 + dims.L) * (dims.D / VEC);  // source slots
  if (total == 0) return;
  forward_kernel<T, VEC><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(mask_token), ids_restore,
      static_cast<const T*>(pos_embed), static_cast<T*>(out), dims, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void backward_typed(const void* grad_out, const int64_t* ids_restore, void* grad_x, void* partial,
                    void* grad_mask_token, const Dims& dims, cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = dims.N * num_chunks(dims) * (dims.D / VEC);
  if (total > 0) {
    backward_rows_kernel<T, VEC><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), ids_restore, static_cast<T*>(grad_x), static_cast<acc_t*>(partial),
        dims, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dims.D > 0) {  // also when N * chunks == 0: writes zeros
    const dim3 block(kReduceCols, kReduceRows);
    const int64_t blocks = (dims.D + kReduceCols - 1) / kReduceCols;
    reduce_partials_kernel<T><<<blocks, block, 0, stream>>>(
        static_cast<const acc_t*>(partial), static_cast<T*>(grad_mask_token), dims.N * num_chunks(dims), dims.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_forward(c10::ScalarType dtype, const void* x, const void* mask_token, const int64_t* ids_restore,
                    const void* pos_embed, void* out, const Dims& dims, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unshuffle_scatter_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (dims.D % kVec == 0 && aligned16(x) && aligned16(mask_token) && aligned16(pos_embed) && aligned16(out)) {
      forward_typed<scalar_t, kVec>(x, mask_token, ids_restore, pos_embed, out, dims, stream);
    } else {
      forward_typed<scalar_t, 1>(x, mask_token, ids_restore, pos_embed, out, dims, stream);
    }
  });
}

void launch_backward(c10::ScalarType dtype, const void* grad_out, const int64_t* ids_restore, void* grad_x,
                     void* partial, void* grad_mask_token, const Dims& dims, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unshuffle_scatter_backward_cuda", [&] {
    // partial takes Packs of kVec op-math values (16 or 32 bytes) at offsets that are multiples of kVec
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (dims.D % kVec == 0 && aligned16(grad_out) && aligned16(grad_x) && aligned16(partial)) {
      backward_typed<scalar_t, kVec>(grad_out, ids_restore, grad_x, partial, grad_mask_token, dims, stream);
    } else {
      backward_typed<scalar_t, 1>(grad_out, ids_restore, grad_x, partial, grad_mask_token, dims, stream);
    }
  });
}

}  // namespace unshuffle
}  // namespace mae_fast
