// CUDA kernels of the per-task gradient aggregation (see gradagg_cuda.h).
// No torch headers here: this file compiles with nvcc alone.
//
// gram: each thread walks the columns with a grid-stride loop, loads the T rows
//   of a column group as float4 (each element read once), and keeps the
//   T(T+1)/2 pair sums in fp32 registers; a thread sums at most 64 float4 per
//   row (256 products) before its sums go to fp64. Block reduction in fp64
//   (warp shuffles, then shared memory), one fp64 partial per block and pair,
//   then a second tiny kernel sums the block partials in a fixed order:
//   deterministic, no atomics.
//   T <= 8: one pass (registers hold all pairs). T > 8: tiles of 4 rows, one
//   launch per tile pair (each element is then read once per tile pair).
// combine: out = sum_t c_t g_t, float4 loads and stores, coefficients passed
//   by value in the kernel arguments; T > 8 in chunks of 8 rows accumulating
//   into out.

#include "gradagg_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace gradagg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 8;              // rows handled in one pass (Gram and combine)
constexpr int kTile = 4;                 // row tile of the Gram matrix when T > kMaxRows
constexpr int64_t kItemsPerThread = 64;  // float4 per thread and row before the fp64 reduction

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int multiprocessors(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // clear the error: the count only sizes the grid
    sms = 80;
  }
  return sms;
}

// Blocks of the Gram kernels: enough to fill the GPU, and enough that no
// thread sums more than kItemsPerThread float4 per row in fp32.
int64_t gram_grid(int64_t P, int device) {
  const int64_t items = std::max<int64_t>(1, ceil_div(P, 4));
  const int64_t by_work = ceil_div(items, kThreads * kItemsPerThread);
  const int64_t fill = std::min<int64_t>(int64_t(multiprocessors(device)) * 8, ceil_div(items, kThreads));
  return std::max<int64_t>(1, std::max(by_work, fill));
}

__device__ __forceinline__ float4 load4(const float* p) {
  return __ldg(reinterpret_cast<const float4*>(p));
}

__device__ __forceinline__ float dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// Sums acc[p] over the block in fp64; thread p < NP receives the block total of pair p.
template <int NP>
__device__ __forceinline__ double block_sum(const float (&acc)[NP], double* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    double x = static_cast<double>(acc[p]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) smem[warp * NP + p] = x;
  }
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x < NP) {
    for (int w = 0; w < kWarps; ++w) s += smem[w * NP + threadIdx.x];
  }
  return s;
}

// Pairs (i <= j) of rows t0 .. t0 + NT - 1.
template <int NT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gram_sym_kernel(const float* __restrict__ g, int64_t ld, int64_t P, int t0, int T,
                    double* __restrict__ partial) {
  constexpr int NP = NT * (NT + 1) / 2;
  __shared__ double smem[kWarps * NP];
  float acc[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) acc[p] = 0.f;

  const float* rows = g + int64_t(t0) * ld;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (VEC) {
    const int64_t n4 = P / 4;
    for (int64_t k = tid; k < n4; k += stride) {
      float4 v[NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) v[i] = load4(rows + i * ld + 4 * k);
      int p = 0;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int j = i; j < NT; ++j) acc[p++] += dot4(v[i], v[j]);
      }
    }
    done = 4 * n4;
  }
  // Scalar columns: all of them without VEC, else the last P % 4.
  for (int64_t k = done + tid; k < P; k += stride) {
    float v[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) v[i] = __ldg(rows + i * ld + k);
    int p = 0;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int j = i; j < NT; ++j) acc[p++] += v[i] * v[j];
    }
  }

  const double s = block_sum<NP>(acc, smem);
  if (threadIdx.x < NP) {
    int i = 0, q = threadIdx.x;  // pair index -> (i, j) in the upper triangle
    while (q >= NT - i) {
      q -= NT - i;
      ++i;
    }
    const int j = i + q;
    partial[int64_t(blockIdx.x) * T * T + int64_t(t0 + i) * T + (t0 + j)] = s;
  }
}

// All pairs between rows a0 .. a0 + na - 1 and b0 .. b0 + nb - 1 (a0 + na <= b0).
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    gram_cross_kernel(const float* __restrict__ g, int64_t ld, int64_t P, int a0, int na, int b0,
                      int nb, int T, double* __restrict__ partial) {
  constexpr int NP = kTile * kTile;
  __shared__ double smem[kWarps * NP];
  float acc[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) acc[p] = 0.f;

  const float* ra = g + int64_t(a0) * ld;
  const float* rb = g + int64_t(b0) * ld;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (VEC) {
    const int64_t n4 = P / 4;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int64_t k = tid; k < n4; k += stride) {
      float4 va[kTile], vb[kTile];
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        va[i] = i < na ? load4(ra + i * ld + 4 * k) : zero;
        vb[i] = i < nb ? load4(rb + i * ld + 4 * k) : zero;
      }
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
#pragma unroll
        for (int j = 0; j < kTile; ++j) acc[i * kTile + j] += dot4(va[i], vb[j]);
      }
    }
    done = 4 * n4;
  }
  for (int64_t k = done + tid; k < P; k += stride) {
    float va[kTile], vb[kTile];
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      va[i] = i < na ? __ldg(ra + i * ld + k) : 0.f;
      vb[i] = i < nb ? __ldg(rb + i * ld + k) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
#pragma unroll
      for (int j = 0; j < kTile; ++j) acc[i * kTile + j] += va[i] * vb[j];
    }
  }

  const double s = block_sum<NP>(acc, smem);
  if (threadIdx.x < NP) {
    const int i = threadIdx.x / kTile, j = threadIdx.x % kTile;
    if (i < na && j < nb) partial[int64_t(blockIdx.x) * T * T + int64_t(a0 + i) * T + (b0 + j)] = s;
  }
}

// out[i, j] = out[j, i] = sum over blocks of partial[block, i, j] (i <= j), fixed order.
__global__ void __launch_bounds__(kThreads)
    gram_finalize_kernel(const double* __restrict__ partial, int64_t nblocks, int T,
                         double* __restrict__ out) {
  const int i = blockIdx.x / T, j = blockIdx.x % T;
  if (i > j) return;  // uniform per block: no thread reaches the barrier below
  __shared__ double smem[kWarps];
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += blockDim.x) s += partial[b * T * T + int64_t(i) * T + j];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += smem[w];
    out[int64_t(i) * T + j] = total;
    out[int64_t(j) * T + i] = total;
  }
}

struct Coeffs {
  float c[kMaxRows];
};

// out = (accumulate ? out : 0) + sum_{i < NT} c_i * row_i, rows starting at g.
template <int NT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float* __restrict__ g, int64_t ld, int64_t P, Coeffs c, bool accumulate,
                   float* __restrict__ out) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (VEC) {
    const int64_t n4 = P / 4;
    float4* out4 = reinterpret_cast<float4*>(out);
    for (int64_t k = tid; k < n4; k += stride) {
      float4 s = accumulate ? out4[k] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const float4 v = load4(g + i * ld + 4 * k);
        s.x += c.c[i] * v.x;
        s.y += c.c[i] * v.y;
        s.z += c.c[i] * v.z;
        s.w += c.c[i] * v.w;
      }
      out4[k] = s;
    }
    done = 4 * n4;
  }
  for (int64_t k = done + tid; k < P; k += stride) {
    float s = accumulate ? out[k] : 0.f;
#pragma unroll
    for (int i = 0; i < NT; ++i) s += c.c[i] * __ldg(g + i * ld + k);
    out[k] = s;
  }
}

template <bool VEC>
void launch_sym(int nt, const float* g, int64_t ld, int64_t P, int t0, int T, double* partial,
                int64_t grid, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(grid)), threads(kThreads);
  switch (nt) {
#define GRADAGG_SYM(N)                                                                \
  case N:                                                                             \
    gram_sym_kernel<N, VEC><<<blocks, threads, 0, stream>>>(g, ld, P, t0, T, partial); \
    break;
    GRADAGG_SYM(1)
    GRADAGG_SYM(2)
    GRADAGG_SYM(3)
    GRADAGG_SYM(4)
    GRADAGG_SYM(5)
    GRADAGG_SYM(6)
    GRADAGG_SYM(7)
    GRADAGG_SYM(8)
#undef GRADAGG_SYM
    default:
      break;
  }
}

template <bool VEC>
void launch_combine(int nt, const float* g, int64_t ld, int64_t P, const Coeffs& c, bool accumulate,
                    float* out, int64_t grid, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(grid)), threads(kThreads);
  switch (nt) {
#define GRADAGG_COMBINE(N)                                                                  \
  case N:                                                                                   \
    combine_kernel<N, VEC><<<blocks, threads, 0, stream>>>(g, ld, P, c, accumulate, out); \
    break;
    GRADAGG_COMBINE(1)
    GRADAGG_COMBINE(2)
    GRADAGG_COMBINE(3)
    GRADAGG_COMBINE(4)
    GRADAGG_COMBINE(5)
    GRADAGG_COMBINE(6)
    GRADAGG_COMBINE(7)
    GRADAGG_COMBINE(8)
#undef GRADAGG_COMBINE
    default:
      break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int64_t gram_cuda_workspace(int64_t T, int64_t P, int device) {
  return T <= 0 ? 0 : gram_grid(P, device) * T * T;
}

cudaError_t gram_cuda(const float* g, int64_t T, int64_t P, int64_t ld, double* out,
                      double* workspace, int64_t workspace_elems, int device, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (T > 65535 || P < 0 || (T > 1 && ld < P)) return cudaErrorInvalidValue;
  const int64_t grid = gram_grid(P, device);
  if (workspace_elems < grid * T * T) return cudaErrorInvalidValue;
  // float4 loads need every row 16-byte aligned.
  const bool vec = aligned16(g) && (T == 1 || ld % 4 == 0);
  const int t = static_cast<int>(T);
  if (T <= kMaxRows) {
    if (vec) launch_sym<true>(t, g, ld, P, 0, t, workspace, grid, stream);
    else launch_sym<false>(t, g, ld, P, 0, t, workspace, grid, stream);
  } else {
    for (int a0 = 0; a0 < t; a0 += kTile) {
      const int na = std::min(kTile, t - a0);
      if (vec) launch_sym<true>(na, g, ld, P, a0, t, workspace, grid, stream);
      else launch_sym<false>(na, g, ld, P, a0, t, workspace, grid, stream);
      for (int b0 = a0 + kTile; b0 < t; b0 += kTile) {
        const int nb = std::min(kTile, t - b0);
        if (vec)
          gram_cross_kernel<true><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
              g, ld, P, a0, na, b0, nb, t, workspace);
        else
          gram_cross_kernel<false><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
              g, ld, P, a0, na, b0, nb, t, workspace);
      }
    }
  }
  gram_finalize_kernel<<<static_cast<unsigned>(T * T), kThreads, 0, stream>>>(workspace, grid, t, out);
  return cudaGetLastError();
}

cudaError_t combine_cuda(const float* g, int64_t T, int64_t P, int64_t ld, const double* coeffs,
                         float* out, cudaStream_t stream) {
  if (P <= 0) return cudaSuccess;
  if (T <= 0) return cudaMemsetAsync(out, 0, sizeof(float) * size_t(P), stream);
  if (T > 1 && ld < P) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int64_t grid =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(ceil_div(P, 4), kThreads),
                                             int64_t(multiprocessors(device)) * 16));
  const bool vec = aligned16(g) && aligned16(out) && (T == 1 || ld % 4 == 0);
  for (int64_t t0 = 0; t0 < T; t0 += kMaxRows) {
    const int nt = static_cast<int>(std::min<int64_t>(kMaxRows, T - t0));
    Coeffs c{};
    for (int i = 0; i < nt; ++i) c.c[i] = static_cast<float>(coeffs[t0 + i]);
    const float* rows = g + t0 * ld;
    if (vec) launch_combine<true>(nt, rows, ld, P, c, t0 > 0, out, grid, stream);
    else launch_combine<false>(nt, rows, ld, P, c, t0 > 0, out, grid, stream);
  }
  return cudaGetLastError();
}

}  // namespace gradagg
