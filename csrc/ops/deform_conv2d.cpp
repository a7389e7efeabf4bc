// Schemas of the fused deformable convolution. Kernels: cpu/deform_conv2d_kernel.cpp,
// cuda/deform_conv2d_kernel.cu; autograd, autocast and fake kernels:
// dynamask/ops/_deform_conv2d_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dynamask, m) {
  // torchvision.ops.deform_conv2d's semantics and offset layout, with a fused epilogue:
  // out = deform_conv(input, offset, weight, mask) + bias + residual, then ReLU when relu is true.
  // Deform groups are inferred from offset's channels (2 * kh * kw * deform_groups), weight groups
  // from weight's shape ([C_out, C_in / groups, kh, kw]).
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
      "Tensor? residual, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w, bool relu) -> Tensor");
  // Gradients of the convolution part given grad (already gated by the ReLU, if any). Returns
  // (grad_input, grad_offset, grad_mask, grad_weight); a gradient not asked for (need_input,
  // need_offset_mask, need_weight) comes back as an empty tensor, and so does grad_mask without mask.
  m.def(
      "deform_conv2d_backward(Tensor grad, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "bool need_input, bool need_offset_mask, bool need_weight) -> (Tensor, Tensor, Tensor, Tensor)");
}
