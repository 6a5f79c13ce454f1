// Launcher of the random-masking CUDA kernel (csrc/cuda/masking_kernels.cu). Raw pointers, so the
// .cu needs no ATen tensor headers; csrc/masking.cpp checks the tensors and calls it on the
// current stream.
#pragma once

#ifdef MAE_FAST_WITH_CUDA
#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "masking_index.h"

namespace mae_fast {
namespace masking {

// The longest row the kernel takes on `device` for noise of `dtype`: one block per row holds the
// row's keys in shared memory (4 bytes an element, 8 for double), at most the device's
// shared memory per block (48 KiB on sm_80 / sm_90 without opt-in: L <= 12288, 6144 for double).
int64_t max_row_length(c10::ScalarType dtype, int device);

// ids_keep (N, len_keep), ids_restore (N, L), mask (N, L) of noise (N, L).
void launch_random_masking(c10::ScalarType dtype, const void* noise, int64_t* ids_keep, int64_t* ids_restore,
                           float* mask, const Dims& dims, cudaStream_t stream);

}  // namespace masking
}  // namespace mae_fast
#endif  // MAE_FAST_WITH_CUDA
