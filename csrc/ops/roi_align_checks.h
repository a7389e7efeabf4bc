#pragma once
// Argument checks shared by the CPU and CUDA RoIAlign kernels. Shape, dtype and device checks (and
// the host-side level lists of the stage ops) run on both. Checks that read tensor data (batch
// indices, finiteness, per-RoI level indices) run on the CPU only: the CUDA kernels assert nothing on
// the device, so that the forward path never syncs; a RoI that fails them pools to zeros there (its
// gradient is zero), and dynamask.ops.full_checks() runs the CPU's checks on CUDA inputs first.
#include <ATen/ATen.h>

#include <cmath>

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
    TORCH_CHECK_VALUE(spatial_scales[l] > 0 && std::isfinite(spatial_scales[l]), op, ": spatial_scales[", l,
                      "] must be positive and finite, got ", spatial_scales[l]);
  }
}

inline void check_stages(at::TensorList features, const at::Tensor& rois, at::IntArrayRef stage_levels,
                  at::IntArrayRef stage_sizes, at::IntArrayRef stage_counts, const char* op) {
  const auto S = stage_levels.size();
  TORCH_CHECK_VALUE(stage_sizes.size() == S && stage_counts.size() == S, op,
                    ": stage_levels, stage_sizes and stage_counts must have the same length");
  TORCH_CHECK_VALUE(static_cast<int64_t>(S) <= kMaxLevels, op, ": at most ", kMaxLevels, " stages, got ", S);
  for (size_t j = 0; j < S; ++j) {
    TORCH_CHECK_VALUE(stage_levels[j] >= 0 && stage_levels[j] < static_cast<int64_t>(features.size()), op,
                      ": stage ", j, " names level ", stage_levels[j], " but there are ", features.size(), " levels");
    TORCH_CHECK_VALUE(stage_sizes[j] > 0, op, ": stage ", j, " has output size ", stage_sizes[j],
                      "; it must be positive");
    TORCH_CHECK_VALUE(stage_counts[j] >= 0 && stage_counts[j] <= rois.size(0), op, ": stage ", j, " has count ",
                      stage_counts[j], " but there are ", rois.size(0), " rois");
  }
}

// The backward of roi_align_stages: one gradient per stage, each naming a level in [0, num_levels) and
// holding at most one crop per RoI. The op is public (torch.ops.dynamask), so a level out of range
// must be refused here rather than index past the level table.
inline void check_stages_backward(at::TensorList grads, const at::Tensor& rois, at::IntArrayRef stage_levels,
                                  int64_t num_levels, const char* op) {
  TORCH_CHECK_VALUE(grads.size() == stage_levels.size(), op, ": one grad per stage expected, got ", grads.size(),
                    " grads for ", stage_levels.size(), " stages");
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) <= kMaxLevels, op, ": at most ", kMaxLevels, " stages, got ",
                    grads.size());
  for (size_t j = 0; j < stage_levels.size(); ++j) {
    TORCH_CHECK_VALUE(stage_levels[j] >= 0 && stage_levels[j] < num_levels, op, ": stage ", j, " names level ",
                      stage_levels[j], " but there are ", num_levels, " levels");
    const auto& g = grads[j];
    if (g.numel() == 0) continue;
    TORCH_CHECK_VALUE(g.dim() == 4 && g.size(0) <= rois.size(0) && g.size(2) == g.size(3), op, ": grads[", j,
                      "] must be [count, C, S, S] with count <= ", rois.size(0), ", got shape ", g.sizes());
    TORCH_CHECK_VALUE(g.device() == rois.device(), op, ": grads[", j, "] is on ", g.device(), " but rois is on ",
                      rois.device());
  }
}

// The level rule's canonical box side (roi_align_common.h: fpn_level): a positive finite number.
inline void check_canonical_scale(double canonical_scale, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(canonical_scale) && canonical_scale > 0, op,
                    ": canonical_scale must be a positive finite number (the box side mapped to level 4), got ",
                    canonical_scale);
}

// All argument checks of roi_align_multilevel that do not read the data.
inline void check_multilevel_args(at::TensorList features, const at::Tensor& rois,
                                  const c10::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                  int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, double canonical_scale,
                                  const char* op) {
  check_rois_and_levels(features, rois, spatial_scales, op);
  check_canonical_scale(canonical_scale, op);
  if (levels.has_value()) {
    TORCH_CHECK_VALUE(levels->scalar_type() == at::kLong && levels->dim() == 1 && levels->size(0) == rois.size(0),
                      op, ": levels must be an int64 tensor of shape [R] = [", rois.size(0), "], got ",
                      levels->scalar_type(), " of shape ", levels->sizes());
    TORCH_CHECK_VALUE(levels->device() == rois.device(), op, ": levels is on ", levels->device(),
                      " but rois is on ", rois.device());
  }
  TORCH_CHECK_VALUE(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (", pooled_h, ", ",
                    pooled_w, ")");
  TORCH_CHECK_VALUE(sampling_ratio >= 0, op, ": sampling_ratio must be >= 0, got ", sampling_ratio);
  const int64_t C = features[0].size(1);
  for (size_t l = 1; l < features.size(); ++l) {
    TORCH_CHECK_VALUE(features[l].size(1) == C, op, ": all levels must have the same channel count; features[0] has ",
                      C, " but features[", l, "] has ", features[l].size(1));
  }
}

// Full data checks (CPU): every box finite, every batch index an integer in [0, batch_size).
template <typename T>
void check_roi_values_cpu(const T* rois, int64_t num_rois, int64_t batch_size, const char* op) {
  for (int64_t r = 0; r < num_rois; ++r) {
    const T* roi = rois + r * 5;
    if (roi_is_valid(roi, batch_size)) continue;  // the CUDA kernels' rule; below, what is wrong
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
