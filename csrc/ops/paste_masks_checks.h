#pragma once
// Argument checks of the paste ops shared by the CPU and CUDA kernels. Shapes, dtypes and devices
// are checked on both; finiteness of the boxes is a full check on the CPU only. The CUDA kernels
// assert nothing on the device (an assert would leave the CUDA context unusable): a box with a
// non-finite coordinate pastes nothing there. dynamask.ops.full_checks() checks it on any device.
#include <ATen/ATen.h>

#include <cmath>

namespace dynamask {
namespace paste_masks {

// Returns M, the number of masks (the groups' rows), after checking that it matches the rows of
// boxes (no index), or that index is an int64 [N] on the boxes' device. The values of index are
// checked by check_index_cpu (CPU) or left to the kernel (CUDA: an out-of-range row pastes nothing).
inline int64_t check_inputs(at::TensorList masks, const at::Tensor& boxes, int64_t height, int64_t width,
                            const c10::optional<at::Tensor>& index, const char* op) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must be [N, 4] (x1, y1, x2, y2), got shape ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be a floating tensor, got ",
                    boxes.scalar_type());
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, op, ": image_size must be non-negative, got (", height, ", ", width,
                    ")");
  int64_t n = 0;
  for (size_t j = 0; j < masks.size(); ++j) {
    const auto& m = masks[j];
    TORCH_CHECK_VALUE(m.dim() == 3 && m.size(1) == m.size(2), op, ": masks[", j,
                      "] must be [n, S, S] (square masks of one resolution), got shape ", m.sizes());
    TORCH_CHECK_VALUE(m.size(0) == 0 || m.size(1) > 0, op, ": masks[", j, "] has masks of size 0");
    TORCH_CHECK_VALUE(at::isFloatingType(m.scalar_type()), op, ": masks[", j, "] must be floating, got ",
                      m.scalar_type());
    TORCH_CHECK_VALUE(m.scalar_type() == masks[0].scalar_type(), op, ": masks[", j, "] has dtype ", m.scalar_type(),
                      " but masks[0] has ", masks[0].scalar_type(), "; all groups must have one dtype");
    TORCH_CHECK_VALUE(m.device() == boxes.device(), op, ": masks[", j, "] is on ", m.device(), " but boxes is on ",
                      boxes.device(), "; all inputs must be on one device");
    n += m.size(0);
  }
  if (index.has_value()) {
    TORCH_CHECK_VALUE(index->scalar_type() == at::kLong && index->dim() == 1 && index->size(0) == boxes.size(0), op,
                      ": index must be an int64 tensor of shape [N] = [", boxes.size(0),
                      "] (one mask row per box), got ", index->scalar_type(), " of shape ", index->sizes());
    TORCH_CHECK_VALUE(index->device() == boxes.device(), op, ": index is on ", index->device(), " but boxes is on ",
                      boxes.device(), "; all inputs must be on one device");
  } else {
    TORCH_CHECK_VALUE(n == boxes.size(0), op, ": masks hold ", n, " masks but boxes has ", boxes.size(0),
                      " rows; without an index there must be one box per mask, in the same order");
  }
  return n;
}

// Every index[i] a row of the num_masks masks; before any work, so a bad index never pastes.
inline void check_index_cpu(const int64_t* index, int64_t n, int64_t num_masks, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(index[i] >= 0 && index[i] < num_masks, op, ": index[", i, "] is ", index[i],
                      " but must be a mask row in [0, ", num_masks, ")");
  }
}

inline void check_boxes_finite_cpu(const float* boxes, int64_t n, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    const float* b = boxes + i * 4;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(b[k]), op, ": boxes[", i, "] has a non-finite coordinate (", b[k],
                        ") in float32");
    }
    TORCH_CHECK_VALUE(std::isfinite(b[2] - b[0]) && std::isfinite(b[3] - b[1]), op, ": boxes[", i, "] = (", b[0],
                      ", ", b[1], ", ", b[2], ", ", b[3], ") is too large: its width or height overflows float32");
  }
}

}  // namespace paste_masks
}  // namespace dynamask
