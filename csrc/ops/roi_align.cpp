// Schemas of the batched RoIAlign ops. Kernels: cpu/roi_align_kernel.cpp, cuda/roi_align_kernel.cu;
// autograd, autocast and fake kernels: dynamask/ops/_roi_align_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dynamask, m) {
  // All RoIs of all pyramid levels in one call. levels: [R] int64 level index per RoI, or None for
  // FPN's LevelMapper with k_min = -log2(spatial_scales[0]) and a box of side canonical_scale at
  // level 4 (torchvision's 224 by default).
  m.def(
      "roi_align_multilevel(Tensor[] features, Tensor rois, Tensor? levels, float[] spatial_scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, float canonical_scale=224.) "
      "-> Tensor");
  m.def(
      "roi_align_multilevel_backward(Tensor grad, Tensor rois, Tensor? levels, float[] spatial_scales, "
      "int batch_size, int channels, int[] heights, int[] widths, int sampling_ratio, bool aligned, "
      "float canonical_scale=224.) -> Tensor[]");
  // Several (level, size, count) crops of a RoI prefix in one call; entry j crops
  // features[stage_levels[j]] for rois[:stage_counts[j]] at stage_sizes[j] x stage_sizes[j]. The crops are
  // NCHW, or channels-last (same shape and values) when channels_last is set.
  m.def(
      "roi_align_stages(Tensor[] features, Tensor rois, int[] stage_levels, int[] stage_sizes, "
      "int[] stage_counts, float[] spatial_scales, int sampling_ratio, bool aligned, bool channels_last=False) "
      "-> Tensor[]");
  m.def(
      "roi_align_stages_backward(Tensor[] grads, Tensor rois, int[] stage_levels, float[] spatial_scales, "
      "int batch_size, int[] channels, int[] heights, int[] widths, int sampling_ratio, bool aligned) "
      "-> Tensor[]");
}
