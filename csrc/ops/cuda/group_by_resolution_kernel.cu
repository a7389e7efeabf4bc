// CUDA kernel of group_by_resolution: a stable counting sort in one launch of one block.
//
// R is small (the detections of a batch, at most a few thousand), so one block does it all without
// a host round trip: a shared-memory histogram, the bucket starts (counts_to_bucket_starts, shared
// with the CPU kernel), then the RoIs in chunks of blockDim, in order. Inside a chunk, __match_any_sync gives each thread
// the lanes of its warp with the same choice (its rank among them = the set lanes below it); the
// per-warp counts of each choice are scanned across warps, so earlier warps, then earlier chunks,
// come first: the order among equal choices is the input order. A choice outside
// [0, num_resolutions), which the CPU kernel refuses, asserts nothing here (a device-side assert would
// leave the CUDA context unusable): such RoIs go last in perm, in input order, and are not counted, so
// counts.sum() < R tells the caller. Internally bucket u = choice + 1 holds a valid choice and u = 0
// the invalid ones, so the descending order puts them after every valid one.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "ops/group_by_resolution_checks.h"
#include "ops/group_by_resolution_common.h"

namespace dynamask {
namespace group_by_resolution {
namespace {

// Shared memory holds (1 + warps) * (K + 1) ints: K = 256 with 32 warps is 33 KiB.
constexpr int64_t kMaxResolutionsCuda = 256;
constexpr int kMaxThreads = 1024;

__device__ inline int bucket_of(int64_t c, int num_res) { return valid_choice(c, num_res) ? static_cast<int>(c) + 1 : 0; }

__global__ void counting_sort_kernel(const int64_t* __restrict__ choice, int num_rois, int num_res,
                                     int64_t* __restrict__ perm, int64_t* __restrict__ counts) {
  extern __shared__ int smem[];
  const int nb = num_res + 1;         // buckets: 0 for invalid choices, c + 1 for choice c
  int* next = smem;                   // [nb]: histogram, then the next free output position per bucket
  int* warp_pos = smem + nb;          // [warps, nb]: per-warp counts, then per-warp start positions
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

  for (int k = tid; k < nb; k += blockDim.x) next[k] = 0;
  __syncthreads();
  for (int i = tid; i < num_rois; i += blockDim.x) atomicAdd(&next[bucket_of(choice[i], num_res)], 1);
  __syncthreads();
  if (tid == 0) {
    for (int k = 0; k < num_res; ++k) counts[k] = next[k + 1];
    counts_to_bucket_starts(next, nb);
  }
  __syncthreads();

  const unsigned below = (1u << lane) - 1u;
  for (int chunk = 0; chunk < num_rois; chunk += blockDim.x) {
    const int i = chunk + tid;
    const int c = i < num_rois ? bucket_of(choice[i], num_res) : -1;  // -1: past the end
    for (int j = tid; j < warps * nb; j += blockDim.x) warp_pos[j] = 0;
    __syncthreads();
    const unsigned same = __match_any_sync(0xffffffffu, c);
    const int rank = __popc(same & below);
    if (c >= 0 && rank == 0) warp_pos[warp * nb + c] = __popc(same);
    __syncthreads();
    for (int k = tid; k < nb; k += blockDim.x) {
      int pos = next[k];
      for (int w = 0; w < warps; ++w) {
        const int n = warp_pos[w * nb + k];
        warp_pos[w * nb + k] = pos;
        pos += n;
      }
      next[k] = pos;
    }
    __syncthreads();
    if (c >= 0) perm[warp_pos[warp * nb + c] + rank] = i;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> group_by_resolution_cuda(const at::Tensor& choice, int64_t num_resolutions) {
  check_inputs(choice, num_resolutions);
  TORCH_CHECK_VALUE(num_resolutions <= kMaxResolutionsCuda, "group_by_resolution: at most ", kMaxResolutionsCuda,
                    " resolutions are supported on CUDA, got num_resolutions=", num_resolutions);
  const int64_t R = choice.size(0);
  TORCH_CHECK_VALUE(R <= INT_MAX, "group_by_resolution: at most ", INT_MAX, " RoIs are supported, got ", R);
  const c10::cuda::CUDAGuard guard(choice.device());
  const auto c = choice.contiguous();
  auto perm = at::empty({R}, c.options());
  if (R == 0) return {perm, at::zeros({num_resolutions}, c.options())};
  auto counts = at::empty({num_resolutions}, c.options());
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (R + 31) / 32 * 32));
  const size_t shared = static_cast<size_t>(1 + threads / 32) * (num_resolutions + 1) * sizeof(int);
  counting_sort_kernel<<<1, threads, shared, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), static_cast<int>(R), static_cast<int>(num_resolutions), perm.data_ptr<int64_t>(),
      counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {perm, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CUDA, m) { m.impl("group_by_resolution", &group_by_resolution_cuda); }

}  // namespace group_by_resolution
}  // namespace dynamask
