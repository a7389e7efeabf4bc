#pragma once
// Argument checks shared by the CPU and CUDA deformable-convolution kernels. They read shapes,
// dtypes and devices only, so the CUDA path never waits on the device.
#include <ATen/ATen.h>

#include "ops/deform_conv2d_common.h"

namespace dynamask {
namespace deform_conv {

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
                    input.device(), "; all tensors must be on one device");
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but input has dtype ", input.scalar_type(), "; they must match");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* what,
                        const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", what, "), got ",
                    t.sizes());
}

// Checks every argument and returns the call's geometry.
inline Geometry check_args(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                           const std::optional<at::Tensor>& residual, int64_t stride_h, int64_t stride_w,
                           int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [B, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be [C_out, C_in / groups, kh, kw], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(offset.dim() == 4, op, ": offset must be [B, 2 * deform_groups * kh * kw, H_out, W_out], ",
                    "got shape ", offset.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got ",
                    input.scalar_type());
  check_same(offset, "offset", input, op);
  check_same(weight, "weight", input, op);
  if (bias) check_same(*bias, "bias", input, op);
  if (mask) check_same(*mask, "mask", input, op);
  if (residual) check_same(*residual, "residual", input, op);
  TORCH_CHECK_VALUE(stride_h > 0 && stride_w > 0, op, ": stride must be positive, got (", stride_h, ", ",
                    stride_w, ")");
  TORCH_CHECK_VALUE(pad_h >= 0 && pad_w >= 0, op, ": padding must be non-negative, got (", pad_h, ", ", pad_w,
                    ")");
  TORCH_CHECK_VALUE(dil_h > 0 && dil_w > 0, op, ": dilation must be positive, got (", dil_h, ", ", dil_w, ")");

  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dil_h = dil_h;
  g.dil_w = dil_w;
  TORCH_CHECK_VALUE(g.kernel_h > 0 && g.kernel_w > 0, op, ": weight's kernel size must be positive, got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) > 0 && g.channels % weight.size(1) == 0, op, ": input has ", g.channels,
                    " channels, which is not a multiple of weight.size(1) = ", weight.size(1),
                    " (weight must be [C_out, C_in / groups, kh, kw])");
  g.groups = g.channels / weight.size(1);
  TORCH_CHECK_VALUE(g.groups > 0 && g.out_channels % g.groups == 0, op, ": weight has ", g.out_channels,
                    " output channels, which is not a multiple of groups = ", g.groups,
                    " (C_in / weight.size(1))");
  const int64_t K = g.kernel_h * g.kernel_w;
  TORCH_CHECK_VALUE(offset.size(1) > 0 && offset.size(1) % (2 * K) == 0, op,
                    ": offset must have 2 * kh * kw * deform_groups channels (a multiple of ", 2 * K, " for a ",
                    g.kernel_h, "x", g.kernel_w, " kernel), got ", offset.size(1));
  g.deform_groups = offset.size(1) / (2 * K);
  TORCH_CHECK_VALUE(g.channels % g.deform_groups == 0, op, ": input has ", g.channels,
                    " channels, which is not a multiple of deform_groups = ", g.deform_groups,
                    " (offset.size(1) / (2 * kh * kw))");
  g.out_h = (g.height + 2 * pad_h - (dil_h * (g.kernel_h - 1) + 1)) / stride_h + 1;
  g.out_w = (g.width + 2 * pad_w - (dil_w * (g.kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK_VALUE(g.out_h > 0 && g.out_w > 0, op, ": the output would be empty (", g.out_h, "x", g.out_w,
                    "): input ", g.height, "x", g.width, " is smaller than the dilated kernel with padding");
  check_shape(offset, "offset", {g.batch, 2 * K * g.deform_groups, g.out_h, g.out_w},
              "[B, 2 * deform_groups * kh * kw, H_out, W_out]", op);
  g.off_c = g.out_h * g.out_w;  // contiguous offsets; a kernel that reads them in another layout resets these
  g.off_p = 1;
  g.has_mask = mask.has_value();
  if (mask) {
    check_shape(*mask, "mask", {g.batch, K * g.deform_groups, g.out_h, g.out_w},
                "[B, deform_groups * kh * kw, H_out, W_out], deform_groups from offset", op);
  }
  if (bias) check_shape(*bias, "bias", {g.out_channels}, "[C_out]", op);
  if (residual) {
    check_shape(*residual, "residual", {g.batch, g.out_channels, g.out_h, g.out_w}, "[B, C_out, H_out, W_out]",
                op);
  }
  return g;
}

}  // namespace deform_conv
}  // namespace dynamask
