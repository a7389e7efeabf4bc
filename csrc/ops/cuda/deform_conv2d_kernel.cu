// CUDA kernels of the fused deformable convolution.
//
// Images are taken a bounded chunk at a time (the columns buffer of a chunk holds at most
// kMaxColumns elements, whatever the batch), so a large or prime RoI count never allocates a
// whole-batch buffer nor falls back to one image per step. Per chunk: one sampling kernel writes the
// columns [images, C_in * kh * kw, positions] (a thread per (image, deform group, tap, position),
// whose corners and weights are reused over the group's channels), cuBLAS multiplies them by each
// weight group (at::matmul on slices), and one epilogue kernel adds bias and residual and applies
// the ReLU. Backward recomputes the columns, accumulates grad_weight, and scatters W^T @ grad into
// grad_input (atomics) and into grad_offset / grad_mask (a thread per sample, no atomics). The
// per-sample arithmetic is the same header the CPU kernel uses. Everything runs on the current
// stream under a device guard, and nothing waits on the host. Half and bfloat16 inputs are computed
// in float and rounded once at the end, as on the CPU (half columns would round the samples, the
// GEMM's output and the epilogue's sum, each once). grad_input's atomics make it non-deterministic:
// the backward calls alertNotDeterministic when it is asked for.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/deform_conv2d_checks.h"
#include "ops/deform_conv2d_common.h"

namespace dynamask {
namespace deform_conv {
namespace {

constexpr int64_t kThreads = 256;
constexpr int64_t kMaxColumns = int64_t(1) << 25;  // 128 MB of float columns per chunk

inline int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

inline int64_t images_per_chunk(const Geometry& g) {
  const int64_t per_image = std::max<int64_t>(1, g.channels * g.taps() * g.out_plane());
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kMaxColumns / per_image));
}

#define GRID_STRIDE_LOOP(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Taps of sample (b, d, k, p) with the offsets read in the accumulation type.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool sample_taps(const Geometry& g, const scalar_t* offset, int64_t b, int64_t d, int64_t k,
                                            int64_t p, Taps<acc_t>& t) {
  const int64_t K = g.taps(), plane = g.out_plane();
  const scalar_t* off = offset + ((b * g.deform_groups + d) * 2 * K) * plane;
  const int64_t oy = p / g.out_w, ox = p - oy * g.out_w, i = k / g.kernel_w, j = k - i * g.kernel_w;
  const acc_t y = sample_coord<acc_t>(oy, g.stride_h, g.pad_h, i, g.dil_h, static_cast<acc_t>(off[(2 * k) * plane + p]));
  const acc_t x = sample_coord<acc_t>(ox, g.stride_w, g.pad_w, j, g.dil_w, static_cast<acc_t>(off[(2 * k + 1) * plane + p]));
  return deform_taps(y, x, g.height, g.width, t);
}

// cols[bl, c * K + k, p] for the chunk's images b0 + bl.
template <typename scalar_t, typename acc_t>
__global__ void im2col_kernel(Geometry g, int64_t b0, int64_t nb, const scalar_t* __restrict__ input,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              scalar_t* __restrict__ cols) {
  const int64_t K = g.taps(), plane = g.out_plane(), HW = g.height * g.width, Cd = g.in_per_deform_group();
  const int64_t n = nb * g.deform_groups * K * plane;
  GRID_STRIDE_LOOP(idx, n) {
    const int64_t p = idx % plane;
    const int64_t k = (idx / plane) % K;
    const int64_t d = (idx / (plane * K)) % g.deform_groups;
    const int64_t bl = idx / (plane * K * g.deform_groups), b = b0 + bl;
    Taps<acc_t> t;
    sample_taps<scalar_t, acc_t>(g, offset, b, d, k, p, t);
    const acc_t m = mask ? static_cast<acc_t>(mask[((b * g.deform_groups + d) * K + k) * plane + p]) : acc_t(1);
    // Only corners with a nonzero weight are read. A sample with no corner on the map has position 0
    // and weight 0 everywhere: reading it anyway would read past an empty map (H*W = 0 has no data at
    // all) and turn an inf or NaN at input[c, 0, 0] into a NaN sample (0 * inf), where the CPU writes 0.
    acc_t w[4];
    bool any = false;
    for (int q = 0; q < 4; ++q) {
      w[q] = m * t.w[q];
      any = any || w[q] != acc_t(0);
    }
    const scalar_t* img = input + (b * g.channels + d * Cd) * HW;
    scalar_t* col = cols + ((bl * g.channels + d * Cd) * K + k) * plane + p;
    for (int64_t c = 0; c < Cd; ++c) {
      acc_t v = acc_t(0);
      if (any) {
        const scalar_t* pl = img + c * HW;
        for (int q = 0; q < 4; ++q) {
          if (w[q] != acc_t(0)) v += w[q] * static_cast<acc_t>(pl[t.pos[q]]);
        }
      }
      col[c * K * plane] = static_cast<scalar_t>(v);
    }
  }
}

// out[b0 + bl] = relu?(out + bias + residual), in place on the chunk.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(int64_t n, int64_t channels, int64_t plane, scalar_t* __restrict__ out,
                                const scalar_t* __restrict__ bias, const scalar_t* __restrict__ residual, bool relu) {
  GRID_STRIDE_LOOP(idx, n) {
    acc_t v = static_cast<acc_t>(out[idx]);
    if (bias) v += static_cast<acc_t>(bias[(idx / plane) % channels]);
    if (residual) v += static_cast<acc_t>(residual[idx]);
    if (relu && !(v > acc_t(0))) v = acc_t(0);
    out[idx] = static_cast<scalar_t>(v);
  }
}

// grad_input (accumulation type) += the transpose of the sampling, one thread per column element.
template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(Geometry g, int64_t b0, int64_t nb, const scalar_t* __restrict__ gcols,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              acc_t* __restrict__ grad_input) {
  const int64_t K = g.taps(), plane = g.out_plane(), HW = g.height * g.width, Cd = g.in_per_deform_group();
  const int64_t n = nb * g.channels * K * plane;
  GRID_STRIDE_LOOP(idx, n) {
    const int64_t p = idx % plane;
    const int64_t k = (idx / plane) % K;
    const int64_t c = (idx / (plane * K)) % g.channels;
    const int64_t bl = idx / (plane * K * g.channels), b = b0 + bl, d = c / Cd;
    const acc_t gc = static_cast<acc_t>(gcols[idx]);
    if (gc == acc_t(0)) continue;
    Taps<acc_t> t;
    sample_taps<scalar_t, acc_t>(g, offset, b, d, k, p, t);
    const acc_t m = mask ? static_cast<acc_t>(mask[((b * g.deform_groups + d) * K + k) * plane + p]) : acc_t(1);
    acc_t* dst = grad_input + (b * g.channels + c) * HW;
    for (int q = 0; q < 4; ++q) {
      if (t.w[q] != acc_t(0)) gpuAtomicAdd(dst + t.pos[q], m * t.w[q] * gc);
    }
  }
}

// grad_offset and grad_mask, one thread per (image, deform group, tap, position).
template <typename scalar_t, typename acc_t>
__global__ void coord_kernel(Geometry g, int64_t b0, int64_t nb, const scalar_t* __restrict__ gcols,
                             const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                             const scalar_t* __restrict__ mask, scalar_t* __restrict__ grad_offset,
                             scalar_t* __restrict__ grad_mask) {
  const int64_t K = g.taps(), plane = g.out_plane(), HW = g.height * g.width, Cd = g.in_per_deform_group();
  const int64_t n = nb * g.deform_groups * K * plane;
  GRID_STRIDE_LOOP(idx, n) {
    const int64_t p = idx % plane;
    const int64_t k = (idx / plane) % K;
    const int64_t d = (idx / (plane * K)) % g.deform_groups;
    const int64_t bl = idx / (plane * K * g.deform_groups), b = b0 + bl;
    Taps<acc_t> t;
    const bool any_valid = sample_taps<scalar_t, acc_t>(g, offset, b, d, k, p, t);
    acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (any_valid) {
      const scalar_t* img = input + (b * g.channels + d * Cd) * HW;
      const scalar_t* gc = gcols + ((bl * g.channels + d * Cd) * K + k) * plane + p;
      for (int64_t c = 0; c < Cd; ++c) {
        const acc_t gv = static_cast<acc_t>(gc[c * K * plane]);
        const scalar_t* pl = img + c * HW;
        for (int q = 0; q < 4; ++q) s[q] += gv * static_cast<acc_t>(pl[t.pos[q]]);
      }
    }
    const int64_t base = (b * g.deform_groups + d) * K;
    const acc_t m = mask ? static_cast<acc_t>(mask[(base + k) * plane + p]) : acc_t(1);
    grad_offset[((base + k) * 2) * plane + p] = static_cast<scalar_t>(m * grad_y(t, s));
    grad_offset[((base + k) * 2 + 1) * plane + p] = static_cast<scalar_t>(m * grad_x(t, s));
    if (grad_mask) grad_mask[(base + k) * plane + p] = static_cast<scalar_t>(sampled_value(t, s));
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& residual, int64_t stride_h, int64_t stride_w,
                              int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, bool relu) {
  const Geometry g = check_args(input, offset, weight, bias, mask, residual, stride_h, stride_w, pad_h, pad_w, dil_h,
                                dil_w, "deform_conv2d");
  if (is_reduced_float(input)) {
    return deform_conv2d_cuda(input.to(at::kFloat), offset.to(at::kFloat), weight.to(at::kFloat), to_float(bias),
                              to_float(mask), to_float(residual), stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, relu)
        .to(input.scalar_type());
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto input_c = input.contiguous(), offset_c = offset.contiguous();
  const auto weight_c = weight.contiguous().view({g.groups, g.out_per_group(), g.in_per_group() * g.taps()});
  const auto mask_c = mask ? mask->contiguous() : at::Tensor();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const auto residual_c = residual ? residual->contiguous() : at::Tensor();
  const int64_t chunk = images_per_chunk(g), K = g.taps(), plane = g.out_plane(), CgK = g.in_per_group() * K;
  at::Tensor cols = at::empty({chunk, g.channels * K, plane}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t nb = std::min(chunk, g.batch - b0);
      const int64_t n = nb * g.deform_groups * K * plane;
      im2col_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
          g, b0, nb, input_c.const_data_ptr<scalar_t>(), offset_c.const_data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(mask_c), cols.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor out_chunk = out.narrow(0, b0, nb).view({nb, g.out_channels, plane});
      const at::Tensor cols_chunk = cols.narrow(0, 0, nb);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        out_chunk.narrow(1, grp * g.out_per_group(), g.out_per_group())
            .copy_(at::matmul(weight_c[grp], cols_chunk.narrow(1, grp * CgK, CgK)));
      }
      if (bias || residual || relu) {
        const int64_t m = nb * g.out_channels * plane;
        epilogue_kernel<scalar_t, acc_t><<<blocks_for(m), kThreads, 0, stream>>>(
            m, g.out_channels, plane, out_chunk.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias_c),
            residual ? residual_c.const_data_ptr<scalar_t>() + b0 * g.out_channels * plane : nullptr, relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, bool need_input, bool need_offset_mask, bool need_weight) {
  const char* op = "deform_conv2d_backward";
  const Geometry g = check_args(input, offset, weight, std::nullopt, mask, std::nullopt, stride_h, stride_w, pad_h,
                                pad_w, dil_h, dil_w, op);
  check_same(grad, "grad", input, op);
  check_shape(grad, "grad", {g.batch, g.out_channels, g.out_h, g.out_w}, "the output's shape", op);
  if (is_reduced_float(input)) {
    auto r = deform_conv2d_backward_cuda(grad.to(at::kFloat), input.to(at::kFloat), offset.to(at::kFloat),
                                         weight.to(at::kFloat), to_float(mask), stride_h, stride_w, pad_h, pad_w,
                                         dil_h, dil_w, need_input, need_offset_mask, need_weight);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt), std::get<3>(r).to(dt)};
  }
  if (need_input) at::globalContext().alertNotDeterministic("deform_conv2d_backward_cuda (grad of input)");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const auto empty = at::empty({0}, input.options());
  at::Tensor grad_input_acc = need_input ? at::zeros(input.sizes(), input.options().dtype(acc_type)) : empty;
  at::Tensor grad_offset = need_offset_mask ? at::zeros(offset.sizes(), offset.options()) : empty;
  at::Tensor grad_mask = (need_offset_mask && mask) ? at::zeros(mask->sizes(), mask->options()) : empty;
  at::Tensor grad_weight_acc =
      need_weight ? at::zeros({g.groups, g.out_per_group(), g.in_per_group() * g.taps()}, input.options().dtype(acc_type))
                  : empty;
  if (g.batch > 0 && g.out_channels > 0 && (need_input || need_offset_mask || need_weight)) {
    const auto input_c = input.contiguous(), offset_c = offset.contiguous(), grad_c = grad.contiguous();
    const auto weight_c = weight.contiguous().view({g.groups, g.out_per_group(), g.in_per_group() * g.taps()});
    const auto mask_c = mask ? mask->contiguous() : at::Tensor();
    const int64_t chunk = images_per_chunk(g), K = g.taps(), plane = g.out_plane(), CgK = g.in_per_group() * K,
                  Coutg = g.out_per_group();
    at::Tensor cols = need_weight ? at::empty({chunk, g.channels * K, plane}, input.options()) : empty;
    at::Tensor gcols = (need_input || need_offset_mask) ? at::empty({chunk, g.channels * K, plane}, input.options()) : empty;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
        const int64_t nb = std::min(chunk, g.batch - b0);
        const at::Tensor grad_chunk = grad_c.narrow(0, b0, nb).view({nb, g.out_channels, plane});
        if (need_weight) {
          const int64_t n = nb * g.deform_groups * K * plane;
          im2col_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
              g, b0, nb, input_c.const_data_ptr<scalar_t>(), offset_c.const_data_ptr<scalar_t>(),
              ptr_or_null<scalar_t>(mask_c), cols.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const at::Tensor cols_chunk = cols.narrow(0, 0, nb);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            const at::Tensor gg = grad_chunk.narrow(1, grp * Coutg, Coutg);             // [nb, Coutg, plane]
            const at::Tensor cg = cols_chunk.narrow(1, grp * CgK, CgK).transpose(1, 2);  // [nb, plane, CgK]
            grad_weight_acc[grp].add_(at::matmul(gg, cg).sum(0).to(acc_type));
          }
        }
        if (need_input || need_offset_mask) {
          at::Tensor gcols_chunk = gcols.narrow(0, 0, nb);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            gcols_chunk.narrow(1, grp * CgK, CgK)
                .copy_(at::matmul(weight_c[grp].t(), grad_chunk.narrow(1, grp * Coutg, Coutg)));
          }
          if (need_input) {
            const int64_t n = nb * g.channels * K * plane;
            col2im_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
                g, b0, nb, gcols.const_data_ptr<scalar_t>(), offset_c.const_data_ptr<scalar_t>(),
                ptr_or_null<scalar_t>(mask_c), grad_input_acc.mutable_data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (need_offset_mask) {
            const int64_t n = nb * g.deform_groups * K * plane;
            coord_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
                g, b0, nb, gcols.const_data_ptr<scalar_t>(), input_c.const_data_ptr<scalar_t>(),
                offset_c.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(mask_c),
                grad_offset.mutable_data_ptr<scalar_t>(), mask ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      }
    });
  }
  at::Tensor grad_input = need_input ? grad_input_acc.to(input.scalar_type()) : empty;
  at::Tensor grad_weight =
      need_weight ? grad_weight_acc.view({g.out_channels, g.in_per_group(), g.kernel_h, g.kernel_w}).to(input.scalar_type())
                  : empty;
  return {grad_input, grad_offset, grad_mask, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace deform_conv
}  // namespace dynamask
