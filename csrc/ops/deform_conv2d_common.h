#pragma once
// Deformable-convolution arithmetic shared by the CPU and CUDA kernels (one copy, compiled for host
// and device): where a kernel tap samples, torchvision's deform_conv bilinear border rules, and the
// derivatives of a sample with respect to its position.
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace dynamask {
namespace deform_conv {

DYNAMASK_INLINE float floor_(float x) { return floorf(x); }
DYNAMASK_INLINE double floor_(double x) { return floor(x); }

// Sample coordinate of kernel tap `k_idx` for output index `out_idx` along one axis.
template <typename T>
DYNAMASK_INLINE T sample_coord(int64_t out_idx, int64_t stride, int64_t pad, int64_t k_idx, int64_t dilation,
                               T offset) {
  return static_cast<T>(out_idx * stride - pad + k_idx * dilation) + offset;
}

// The four corners of one deformable sample at (y, x): (y_l, x_l), (y_l, x_h), (y_h, x_l), (y_h, x_h).
//  pos[i]:   flat offset y*W+x into a plane; a corner off the map gets the position of the sample's
//            nearest corner on it (clamped to the map), so that a read stays on the map and reads a pixel
//            the sample itself uses (never an unrelated pixel, whose inf or NaN would turn the sample's
//            0 * value into NaN); 0 when no corner lies on the map (then nothing is read at all)
//  valid[i]: 1 where the corner lies on the map, else 0
//  w[i]:     bilinear weight, 0 where invalid, and all 0 when the sample is at or beyond one pixel
//            outside the map (torchvision: h <= -1 || h >= H || w <= -1 || w >= W reads 0)
//  ly, lx:   fractional parts of y and x (for the position derivatives)
// torchvision's backward computes position derivatives from the valid corners without the outer range
// check (so y == -1 exactly has a derivative); we keep valid[] separate from w[] to match it.
template <typename T>
struct Taps {
  int64_t pos[4];
  T w[4];
  T valid[4];
  T ly, lx;
};

// Returns false when no corner lies on the map (then every weight and valid flag is 0). NaN
// coordinates land there too: a NaN offset samples zero and gets a zero gradient (torchvision
// propagates the NaN instead).
template <typename T>
DYNAMASK_INLINE bool deform_taps(T y, T x, int64_t height, int64_t width, Taps<T>& t) {
  // An empty map (height or width 0) has no corner to read: then nothing is read, not even position 0.
  if (!(height > 0 && width > 0 && y >= T(-1) && y < static_cast<T>(height) && x >= T(-1) &&
        x < static_cast<T>(width))) {
    for (int i = 0; i < 4; ++i) {
      t.pos[i] = 0;
      t.w[i] = T(0);
      t.valid[i] = T(0);
    }
    t.ly = T(0);
    t.lx = T(0);
    return false;
  }
  const T yf = floor_(y), xf = floor_(x);
  const int64_t y_l = static_cast<int64_t>(yf), x_l = static_cast<int64_t>(xf);
  const int64_t y_h = y_l + 1, x_h = x_l + 1;
  const bool vy_l = y_l >= 0, vy_h = y_h <= height - 1, vx_l = x_l >= 0, vx_h = x_h <= width - 1;
  const bool v[4] = {vy_l && vx_l, vy_l && vx_h, vy_h && vx_l, vy_h && vx_h};
  // y >= -1 and y < height give y_l <= height - 1 and y_h >= 0: only these two ends need clamping
  const int64_t yl_c = y_l < 0 ? 0 : y_l, yh_c = y_h > height - 1 ? height - 1 : y_h;
  const int64_t xl_c = x_l < 0 ? 0 : x_l, xh_c = x_h > width - 1 ? width - 1 : x_h;
  const int64_t p[4] = {yl_c * width + xl_c, yl_c * width + xh_c, yh_c * width + xl_c, yh_c * width + xh_c};
  const T ly = y - yf, lx = x - xf, hy = T(1) - ly, hx = T(1) - lx;
  const T bw[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const bool inside = y > T(-1) && x > T(-1);  // the upper bounds were checked above
  for (int i = 0; i < 4; ++i) {
    t.pos[i] = p[i];
    t.valid[i] = v[i] ? T(1) : T(0);
    t.w[i] = (v[i] && inside) ? bw[i] : T(0);
  }
  t.ly = ly;
  t.lx = lx;
  return true;
}

// Given s[i] = sum over the deform group's channels of grad_column[c] * input[c, corner i] (corners
// off the map read 0), the derivatives of sum_c grad_column[c] * bilinear(input[c], y, x):
//  d/dy, d/dx (torchvision's get_coordinate_weight), and the value itself (for the mask gradient).
template <typename T>
DYNAMASK_INLINE T grad_y(const Taps<T>& t, const T s[4]) {
  const T s0 = s[0] * t.valid[0], s1 = s[1] * t.valid[1], s2 = s[2] * t.valid[2], s3 = s[3] * t.valid[3];
  return (T(1) - t.lx) * (s2 - s0) + t.lx * (s3 - s1);
}

template <typename T>
DYNAMASK_INLINE T grad_x(const Taps<T>& t, const T s[4]) {
  const T s0 = s[0] * t.valid[0], s1 = s[1] * t.valid[1], s2 = s[2] * t.valid[2], s3 = s[3] * t.valid[3];
  return (T(1) - t.ly) * (s1 - s0) + t.ly * (s3 - s2);
}

template <typename T>
DYNAMASK_INLINE T sampled_value(const Taps<T>& t, const T s[4]) {
  return t.w[0] * s[0] + t.w[1] * s[1] + t.w[2] * s[2] + t.w[3] * s[3];
}

// Shape facts of one call, computed once by the checks and passed to the kernels by value.
struct Geometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, deform_groups;
  bool has_mask;
  // Strides of the offsets within one image: between channels and between output positions
  // (p = oy * out_w + ox). Contiguous NCHW offsets (what check_args assumes, and what the CUDA kernels
  // and the CPU backward pass) have (out_h * out_w, 1); the CPU forward also reads channels-last
  // offsets, and a channel slice of them, in place (deform_conv2d_cpu sets these).
  int64_t off_c, off_p;

  DYNAMASK_INLINE int64_t taps() const { return kernel_h * kernel_w; }
  DYNAMASK_INLINE int64_t out_plane() const { return out_h * out_w; }
  DYNAMASK_INLINE int64_t in_per_group() const { return channels / groups; }
  DYNAMASK_INLINE int64_t out_per_group() const { return out_channels / groups; }
  DYNAMASK_INLINE int64_t in_per_deform_group() const { return channels / deform_groups; }
};

// Sample position of tap k (row-major over the kernel) at output (oy, ox) of one deform group.
// offset_at: pointer to offset[b, d * 2K, 0, 0]; mask_at: mask[b, d * K, 0, 0] or nullptr.
// The same with the tap's kernel row i and column j (k = i * kernel_w + j) and the output position
// p = oy * out_w + ox already known: CPU loops keep them as counters instead of dividing per tap.
template <typename T>
DYNAMASK_INLINE void tap_position_ij(const Geometry& g, const T* offset_at, int64_t k, int64_t i, int64_t j,
                                     int64_t p, int64_t oy, int64_t ox, T& y, T& x) {
  y = sample_coord<T>(oy, g.stride_h, g.pad_h, i, g.dil_h, offset_at[(2 * k) * g.off_c + p * g.off_p]);
  x = sample_coord<T>(ox, g.stride_w, g.pad_w, j, g.dil_w, offset_at[(2 * k + 1) * g.off_c + p * g.off_p]);
}

template <typename T>
DYNAMASK_INLINE void tap_position(const Geometry& g, const T* offset_at, int64_t k, int64_t oy, int64_t ox,
                                  T& y, T& x) {
  const int64_t i = k / g.kernel_w, j = k - i * g.kernel_w;
  tap_position_ij(g, offset_at, k, i, j, oy * g.out_w + ox, oy, ox, y, x);
}

}  // namespace deform_conv
}  // namespace dynamask
