#pragma once
// Argument checks shared by the CPU and CUDA RoIAlign kernels. Shape, dtype and device checks run
// on both; checks that read the data (batch indices, finiteness, level indices) run on the CPU only,
// and are device-side asserts inside the CUDA kernels so the CUDA forward path never syncs.
#include <ATen/ATen.h>

#include "ops/roi_align_common.h"

namespace dynamask {
namespace roi_align {

inline void check_rois_and_levels(at::TensorList features, const at::Tensor& rois,
                                  at::ArrayRef<double> spatial_scales, const char* op) {
  TORCH_CHECK_VALUE(!features.empty(), op, ": features must be a non-empty list of [N, C, H, W] tensors");
  TORCH_CHECK_VALUE(static_cast<int64_t>(features.size()) <= kMaxLevels, op, ": at most ", kMaxLevels,
                    " feature levels are supported, got ", features.size());
  TORCH_CHECK_VALUE(spatial_scales.size() == features.size(), op, ": spatial_scales has ",
                    spatial_scales.size(), " entries but features has ", features.size(), " levels");
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op,
                    ": rois must be [R, 5] (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  const auto n = features[0].dim() == 4 ? features[0].size(0) : -1;
  for (size_t l = 0; l < features.size(); ++l) {
    const auto& f = features[l];
    TORCH_CHECK_VALUE(f.dim() == 4, op, ": features[", l, "] must be [N, C, H, W], got shape ", f.sizes());
    TORCH_CHECK_VALUE(f.device() == rois.device(), op, ": features[", l, "] is on ", f.device(),
                      " but rois is on ", rois.device(), "; all inputs must be on one device");
    TORCH_CHECK_VALUE(f.scalar_type() == rois.scalar_type(), op, ": features[", l, "] has dtype ",
                      f.scalar_type(), " but rois has dtype ", rois.scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(f.size(0) == n, op, ": features[", l, "] has batch size ", f.size(0),
                      " but features[0] has ", n);
    TORCH_CHECK_VALUE(spatial_scales[l] > 0, op, ": spatial_scales[", l, "] must be positive, got ",
                      spatial_scales[l]);
  }
}

// Full data checks (CPU): every box finite, every batch index an integer in [0, batch_size).
template <typename T>
void check_roi_values_cpu(const T* rois, int64_t num_rois, int64_t batch_size, const char* op) {
  for (int64_t r = 0; r < num_rois; ++r) {
    const T* roi = rois + r * 5;
    const double b = static_cast<double>(roi[0]);
    TORCH_CHECK_VALUE(b >= 0 && b < static_cast<double>(batch_size) && b == std::floor(b), op, ": rois[", r,
                      ", 0] (batch index) is ", b, " but must be an integer in [0, ", batch_size, ")");
    for (int k = 1; k < 5; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(roi[k])), op, ": rois[", r,
                        "] has a non-finite coordinate (", static_cast<double>(roi[k]), ")");
    }
  }
}

}  // namespace roi_align
}  // namespace dynamask
