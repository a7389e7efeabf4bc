// CUDA kernel of paste_masks: one block per (image row, output); its threads sweep the row.
//
// Output n pastes mask row index[n] (or mask n without an index) into box n. Every output element is
// written exactly once (no separate zeroing pass): pixels outside the box span get the fill value,
// pixels inside it are sampled with the shared arithmetic of paste_masks_common.h, so the sampling
// work is proportional to the boxes' areas. The table of resolution groups (data pointer, first mask
// row, mask size) travels by value in the kernel arguments, so masks of every resolution are pasted
// by one launch without a host-to-device copy; more than kMaxGroups groups take one launch per
// kMaxGroups groups (each writes the outputs whose mask is in its groups), more than 65535 outputs
// several launches. Nothing waits on the host, and nothing asserts on the device (which would leave
// the CUDA context unusable): a box that the CPU kernel refuses (a non-finite coordinate, a width or
// height that overflows float32) or an index that is not a mask row pastes nothing here;
// dynamask.ops.full_checks() raises for them before the launch instead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/paste_masks_checks.h"
#include "ops/paste_masks_common.h"

namespace dynamask {
namespace paste_masks {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct GroupTable {
  const T* data[kMaxGroups];
  int64_t first[kMaxGroups + 1];  // masks [first[g], first[g + 1]) are group g's, as rows of boxes
  int64_t size[kMaxGroups];
  int num;
};

// Pastes the outputs [out_begin, out_begin + gridDim.y) whose mask row lies in this launch's groups;
// fill_invalid: this launch also writes the outputs whose index is not a mask row (as nothing).
template <typename T, typename Out>
__global__ void paste_kernel(GroupTable<T> groups, const int64_t* __restrict__ index, int64_t num_masks,
                             int64_t out_begin, bool fill_invalid, const float* __restrict__ boxes, int64_t height,
                             int64_t width, float threshold, Out* __restrict__ out) {
  const int64_t y = blockIdx.x;
  const int64_t n = out_begin + blockIdx.y;
  const int64_t m = mask_row(index, n, num_masks);
  Out* row = out + (n * height + y) * width;
  const Out fill = Output<Out>::of(0.f, threshold);
  if (m < groups.first[0] || m >= groups.first[groups.num]) {  // another launch's mask, or none
    if (m < 0 && fill_invalid) {
      for (int64_t x = threadIdx.x; x < width; x += blockDim.x) row[x] = fill;
    }
    return;
  }
  int g = 0;
  while (g + 1 < groups.num && m >= groups.first[g + 1]) ++g;
  const int64_t S = groups.size[g];
  const T* mask = groups.data[g] + (m - groups.first[g]) * S * S;
  const float* b = boxes + n * 4;
  const AxisSpan sx = axis_span(b[0], b[2], S, width), sy = axis_span(b[1], b[3], S, height);
  if (y < sy.lo || y >= sy.hi || sx.lo >= sx.hi) {
    for (int64_t x = threadIdx.x; x < width; x += blockDim.x) row[x] = fill;
    return;
  }
  const AxisTaps ty = axis_taps(sy, y, S);
  for (int64_t x = threadIdx.x; x < width; x += blockDim.x) {
    row[x] = (x >= sx.lo && x < sx.hi) ? Output<Out>::of(bilinear(mask, S, ty, axis_taps(sx, x, S)), threshold) : fill;
  }
}

// groups: the non-empty groups (num_masks rows in all); index: undefined, or [N] contiguous int64.
template <typename T, typename Out>
void launch(const std::vector<at::Tensor>& groups, int64_t num_masks, const at::Tensor& index,
            const at::Tensor& boxes, int64_t height, int64_t width, float threshold, at::Tensor& out) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = out.size(0);
  const int64_t* index_ptr = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  if (groups.empty()) {  // every output pastes nothing (only reachable with an index: n > 0 = num_masks)
    out.fill_(Output<Out>::of(0.f, threshold));
    return;
  }
  int64_t first = 0;
  for (size_t g0 = 0; g0 < groups.size(); g0 += kMaxGroups) {
    GroupTable<T> table;
    table.num = static_cast<int>(std::min<size_t>(kMaxGroups, groups.size() - g0));
    const int64_t begin = first;
    for (int g = 0; g < table.num; ++g) {
      const auto& m = groups[g0 + g];
      table.data[g] = m.data_ptr<T>();
      table.first[g] = first;
      table.size[g] = m.size(1);
      first += m.size(0);
    }
    table.first[table.num] = first;
    // Without an index, output j reads mask j: only this table's rows have work. With one, any output
    // may read them, so every launch sweeps every output.
    const int64_t out_begin = index_ptr ? 0 : begin, out_end = index_ptr ? n : first;
    for (int64_t o0 = out_begin; o0 < out_end; o0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(height), static_cast<unsigned>(std::min(kMaxGridY, out_end - o0)));
      paste_kernel<T, Out><<<grid, kThreads, 0, stream>>>(table, index_ptr, num_masks, o0, g0 == 0,
                                                           boxes.data_ptr<float>(), height, width, threshold,
                                                           out.data_ptr<Out>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

at::Tensor paste_masks_cuda(at::TensorList masks, const at::Tensor& boxes, int64_t height, int64_t width,
                            c10::optional<double> threshold, const c10::optional<at::Tensor>& index) {
  const char* op = "paste_masks";
  TORCH_CHECK_VALUE(!threshold.has_value() || std::isfinite(*threshold), op, ": threshold must be finite or None, got ",
                    *threshold);
  const int64_t num_masks = check_inputs(masks, boxes, height, width, index, op);
  TORCH_CHECK_VALUE(height <= INT32_MAX, op, ": image height ", height, " is too large");
  const c10::cuda::CUDAGuard guard(boxes.device());
  const bool binary = threshold.has_value();
  auto out = at::empty({boxes.size(0), height, width}, boxes.options().dtype(binary ? at::kBool : at::kFloat));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> groups;
  for (const auto& m : masks) {
    if (m.size(0) > 0) groups.push_back(m.contiguous());
  }
  const auto boxes_f = boxes.to(at::kFloat).contiguous();
  const auto index_c = index.has_value() ? index->contiguous() : at::Tensor();
  const float thr = binary ? static_cast<float>(*threshold) : 0.f;
  // with no masks at all (an index, every entry out of range) the dtype is irrelevant: nothing is read
  const auto dtype = masks.empty() ? at::kFloat : masks[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "paste_masks_cuda", [&] {
    if (binary) {
      launch<scalar_t, bool>(groups, num_masks, index_c, boxes_f, height, width, thr, out);
    } else {
      launch<scalar_t, float>(groups, num_masks, index_c, boxes_f, height, width, thr, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CUDA, m) { m.impl("paste_masks", &paste_masks_cuda); }

}  // namespace paste_masks
}  // namespace dynamask
