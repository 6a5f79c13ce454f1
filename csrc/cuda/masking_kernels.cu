// CUDA kernel of MAE's random masking: one block per row; the row's sort keys go to shared memory,
// then every thread ranks some of the row's elements against the whole row (O(L) each, the
// reads of keys[j] are shared-memory broadcasts) and writes their ids_restore / mask / ids_keep.
// Index arithmetic: ../masking_index.h (shared with the CPU implementation).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../masking_cuda.h"

namespace mae_fast {
namespace masking {
namespace {

constexpr int kMaxThreads = 256;

template <typename T>
__global__ void random_masking_kernel(const T* __restrict__ noise, int64_t* __restrict__ ids_keep,
                                      int64_t* __restrict__ ids_restore, float* __restrict__ mask, Dims dims) {
  using key_t = Key<T>;
  extern __shared__ __align__(8) unsigned char smem_bytes[];  // L keys; aligned for any key type
  key_t* keys = reinterpret_cast<key_t*>(smem_bytes);
  const int64_t n = blockIdx.x;
  const T* row = noise + n * dims.L;
  for (int64_t l = threadIdx.x; l < dims.L; l += blockDim.x) keys[l] = key_of(row[l]);
  __syncthreads();
  for (int64_t l = threadIdx.x; l < dims.L; l += blockDim.x) {
    write_outputs(dims, n, l, stable_rank(keys, dims.L, l), ids_keep, ids_restore, mask);
  }
}

}  // namespace

int64_t max_row_length(c10::ScalarType dtype, int device) {
  int smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlock, device));
  int64_t key_bytes = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "random_masking_max_row_length",
                                  [&] { key_bytes = sizeof(Key<scalar_t>); });
  return smem / key_bytes;
}

void launch_random_masking(c10::ScalarType dtype, const void* noise, int64_t* ids_keep, int64_t* ids_restore,
                           float* mask, const Dims& dims, cudaStream_t stream) {
  if (dims.N == 0 || dims.L == 0) return;
  // one thread per element up to kMaxThreads, whole warps
  const int64_t warps = (dims.L + 31) / 32;
  const int threads = static_cast<int>(warps * 32 < kMaxThreads ? warps * 32 : kMaxThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "random_masking_cuda", [&] {
    const size_t smem = sizeof(Key<scalar_t>) * static_cast<size_t>(dims.L);
    random_masking_kernel<scalar_t><<<static_cast<unsigned>(dims.N), threads, smem, stream>>>(
        static_cast<const scalar_t*>(noise), ids_keep, ids_restore, mask, dims);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace masking
}  // namespace mae_fast
