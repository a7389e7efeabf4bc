#pragma once
// Argument checks of group_by_resolution shared by the CPU and CUDA kernels (shape and dtype only).
// The values are checked by the CPU kernel, which refuses a choice outside [0, K). The CUDA kernel
// asserts nothing on the device (an assert would leave the CUDA context unusable): such a choice goes
// last in perm and is not counted. dynamask.ops.full_checks() checks the values on any device.
#include <ATen/ATen.h>

namespace dynamask {
namespace group_by_resolution {

inline void check_inputs(const at::Tensor& choice, int64_t num_resolutions) {
  TORCH_CHECK_VALUE(choice.dim() == 1, "group_by_resolution: choice must be a 1-D [R] tensor, got shape ",
                    choice.sizes());
  TORCH_CHECK_VALUE(choice.scalar_type() == at::kLong, "group_by_resolution: choice must be int64, got ",
                    choice.scalar_type());
  TORCH_CHECK_VALUE(num_resolutions > 0, "group_by_resolution: num_resolutions must be positive, got ",
                    num_resolutions);
}

}  // namespace group_by_resolution
}  // namespace dynamask
