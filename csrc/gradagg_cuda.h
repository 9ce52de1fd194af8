// CUDA path of the per-task gradient aggregation: plain launch functions on raw
// pointers, free of torch headers (so the kernels compile with nvcc alone; the
// torch glue is gradagg_cuda_binding.cpp).
//
// g: device pointer to row 0 of a float32 buffer [T, P]; row t starts at g + t * ld
// (ld >= P, padded rows allowed). All work is queued on `stream`; nothing syncs.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace gradagg {

// Number of doubles of device workspace that gram_cuda needs on `device`.
int64_t gram_cuda_workspace(int64_t T, int64_t P, int device);

// out[T * T] (device, float64, row-major, symmetric) = Gram matrix of the rows.
// Per thread fp32 sums over at most 256 values, then fp64 block reduction and a
// deterministic fp64 reduction over blocks (no atomics).
cudaError_t gram_cuda(const float* g, int64_t T, int64_t P, int64_t ld, double* out,
                      double* workspace, int64_t workspace_elems, int device, cudaStream_t stream);

// out[p] = sum_t coeffs[t] * g[t * ld + p]; coeffs is a host array of T values
// (passed to the kernel by value, no host-device copy).
cudaError_t combine_cuda(const float* g, int64_t T, int64_t P, int64_t ld, const double* coeffs,
                         float* out, cudaStream_t stream);

}  // namespace gradagg
