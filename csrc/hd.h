// MAE_FAST_HD marks the per-element index functions that the CPU implementations and the CUDA
// kernels share (csrc/*_index.h): host+device under nvcc, plain inline for the C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define MAE_FAST_HD __host__ __device__ __forceinline__
#else
#define MAE_FAST_HD inline
#endif
