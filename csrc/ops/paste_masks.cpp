// Schemas of the mask paste ops. Kernels: cpu/paste_masks_kernel.cpp (both ops),
// cuda/paste_masks_kernel.cu (paste_masks); fake kernels: dynamask/ops/_paste_masks_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dynamask, m) {
  // masks: groups [n_j, S_j, S_j] of probabilities (one resolution each); their rows, counted across
  // the groups in list order, are the M masks. index: [N] int64, box n's mask is row index[n], in
  // [0, M); None: the masks follow the rows of boxes [N, 4] (x1, y1, x2, y2) in order (M = N), so the
  // kernel writes each mask into its box's output slot either way and the caller never reorders.
  // Returns [N, height, width]: bool (value >= threshold) when threshold is given, else float32.
  // Pixel centres, bilinear with zero padding on the box's normalised grid (F.grid_sample,
  // align_corners=False).
  m.def(
      "paste_masks(Tensor[] masks, Tensor boxes, int height, int width, float? threshold, "
      "Tensor? index=None) -> Tensor");
  // The same binary masks as COCO compressed run-length strings, without building the canvases:
  // chars holds the N strings back to back, string i is chars[offsets[i]:offsets[i + 1]].
  m.def(
      "paste_masks_rle(Tensor[] masks, Tensor boxes, int height, int width, float threshold, "
      "Tensor? index=None) -> (Tensor chars, Tensor offsets)");
}
