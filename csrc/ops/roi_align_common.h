#pragma once
// RoIAlign arithmetic shared by the CPU and CUDA kernels (one copy, compiled for host and device):
// FPN level mapping, the per-RoI sample grid and torchvision's bilinear border rules.
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace dynamask {
namespace roi_align {

// Precision-preserving math: float stays float (as torch computes the level mapping in float32).
DYNAMASK_INLINE float sqrt_(float x) { return sqrtf(x); }
DYNAMASK_INLINE double sqrt_(double x) { return sqrt(x); }
DYNAMASK_INLINE float log2_(float x) { return log2f(x); }
DYNAMASK_INLINE double log2_(double x) { return log2(x); }
DYNAMASK_INLINE float floor_(float x) { return floorf(x); }
DYNAMASK_INLINE double floor_(double x) { return floor(x); }
DYNAMASK_INLINE float ceil_(float x) { return ceilf(x); }
DYNAMASK_INLINE double ceil_(double x) { return ceil(x); }

// FPN's level rule for a box of side s = sqrt(area): k = floor(4 + log2(s / canonical_scale) + 1e-6),
// clamped to [k_min, k_max], returned as an index from k_min. canonical_scale is the side that maps
// to level 4 (torchvision's LevelMapper: 224, for ~800-px images; smaller images want a smaller one).
// Computed in the RoIs' own precision, as torch computes it, so that boxes exactly on a level
// boundary land where torchvision puts them. A box whose area is not positive (degenerate, or
// inverted in one axis) maps to the finest level k_min.
template <typename T>
DYNAMASK_INLINE int64_t fpn_level(T x1, T y1, T x2, T y2, int64_t k_min, int64_t k_max, T canonical_scale) {
  const T area = (x2 - x1) * (y2 - y1);
  if (!(area > T(0))) return 0;
  const T s = sqrt_(area);
  const T k = floor_(T(4) + log2_(s / canonical_scale) + T(1e-6));
  if (!(k > T(k_min))) return 0;  // also catches NaN
  if (k >= T(k_max)) return k_max - k_min;
  return static_cast<int64_t>(k) - k_min;
}

// Where a RoI's bins and samples lie on one feature map (torchvision's roi_align conventions).
template <typename T>
struct RoiGeometry {
  T start_h, start_w;  // top-left corner, in feature-map pixels
  T bin_h, bin_w;      // size of one output bin
  int64_t grid_h, grid_w;  // samples per bin along each axis
  T inv_count;         // 1 / (grid_h * grid_w)
};

template <typename T>
DYNAMASK_INLINE RoiGeometry<T> roi_geometry(const T* roi /* x1, y1, x2, y2 */, T scale,
                                            int64_t pooled_h, int64_t pooled_w,
                                            int64_t sampling_ratio, bool aligned) {
  const T offset = aligned ? T(0.5) : T(0);
  RoiGeometry<T> g;
  g.start_w = roi[0] * scale - offset;
  g.start_h = roi[1] * scale - offset;
  T width = roi[2] * scale - offset - g.start_w;
  T height = roi[3] * scale - offset - g.start_h;
  if (!aligned) {  // legacy behaviour: force malformed RoIs to be 1x1
    width = width > T(1) ? width : T(1);
    height = height > T(1) ? height : T(1);
  }
  g.bin_h = height / static_cast<T>(pooled_h);
  g.bin_w = width / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil_(height / static_cast<T>(pooled_h)));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil_(width / static_cast<T>(pooled_w)));
  const int64_t count = g.grid_h * g.grid_w;
  g.inv_count = T(1) / static_cast<T>(count > 1 ? count : 1);
  return g;
}

template <typename T>
DYNAMASK_INLINE T sample_y(const RoiGeometry<T>& g, int64_t ph, int64_t iy) {
  return g.start_h + ph * g.bin_h + (static_cast<T>(iy) + T(0.5)) * g.bin_h / static_cast<T>(g.grid_h);
}

template <typename T>
DYNAMASK_INLINE T sample_x(const RoiGeometry<T>& g, int64_t pw, int64_t ix) {
  return g.start_w + pw * g.bin_w + (static_cast<T>(ix) + T(0.5)) * g.bin_w / static_cast<T>(g.grid_w);
}

// Bilinear interpolation is separable: each axis contributes (low, high, weight of low, weight of
// high). torchvision's rule per axis: a coordinate more than one pixel outside the map is empty
// (the whole sample then contributes nothing); otherwise it is clamped onto the map.
template <typename T>
struct AxisTap {
  int64_t lo, hi;
  T w_lo, w_hi;
  bool valid;
};

template <typename T>
DYNAMASK_INLINE AxisTap<T> axis_tap(T v, int64_t size) {
  AxisTap<T> a;
  // An empty map (size 0) has nothing to read: every sample is off it. torchvision reads index -1 there.
  a.valid = size > 0 && !(v < T(-1) || v > static_cast<T>(size));
  if (!a.valid) {
    a.lo = a.hi = 0;
    a.w_lo = a.w_hi = T(0);
    return a;
  }
  if (v <= T(0)) v = T(0);
  a.lo = static_cast<int64_t>(v);
  if (a.lo >= size - 1) {
    a.hi = a.lo = size - 1;
    v = static_cast<T>(a.lo);
  } else {
    a.hi = a.lo + 1;
  }
  const T l = v - static_cast<T>(a.lo);
  a.w_hi = l;
  a.w_lo = T(1) - l;
  return a;
}

// The four taps of one bilinear sample: flat offsets y*W+x into a plane, and their weights.
template <typename T>
struct BilinearTaps {
  int64_t pos[4];
  T w[4];
};

template <typename T>
DYNAMASK_INLINE void combine_taps(const AxisTap<T>& ay, const AxisTap<T>& ax, int64_t width, BilinearTaps<T>& t) {
  t.pos[0] = ay.lo * width + ax.lo;
  t.pos[1] = ay.lo * width + ax.hi;
  t.pos[2] = ay.hi * width + ax.lo;
  t.pos[3] = ay.hi * width + ax.hi;
  t.w[0] = ay.w_lo * ax.w_lo;
  t.w[1] = ay.w_lo * ax.w_hi;
  t.w[2] = ay.w_hi * ax.w_lo;
  t.w[3] = ay.w_hi * ax.w_hi;
}

// Returns false (and no taps) when the sample lies outside the map by more than one pixel.
template <typename T>
DYNAMASK_INLINE bool bilinear_taps(T y, T x, int64_t height, int64_t width, BilinearTaps<T>& t) {
  const AxisTap<T> ay = axis_tap(y, height);
  const AxisTap<T> ax = axis_tap(x, width);
  if (!(ay.valid && ax.valid)) return false;
  combine_taps(ay, ax, width, t);
  return true;
}

// Finite without <cmath>'s host-only std::isfinite: inf - inf and NaN - NaN are NaN.
DYNAMASK_INLINE bool finite_(double v) { return v - v == 0.0; }

// Whether a RoI can be pooled: its batch index an integer in [0, batch_size), its box finite. The CPU
// kernels raise for a RoI that is not; the CUDA kernels pool it to zeros (no device-side assert, which
// would leave the CUDA context unusable), and dynamask.ops.full_checks() raises before the launch.
template <typename T>
DYNAMASK_INLINE bool roi_is_valid(const T* roi /* batch, x1, y1, x2, y2 */, int64_t batch_size) {
  const double b = static_cast<double>(roi[0]);
  if (!(b >= 0.0 && b < static_cast<double>(batch_size) && b == floor_(b))) return false;
  for (int k = 1; k < 5; ++k) {
    if (!finite_(static_cast<double>(roi[k]))) return false;
  }
  return true;
}

// Up to this many pyramid levels / stages travel to the CUDA kernels by value.
constexpr int kMaxLevels = 8;

}  // namespace roi_align
}  // namespace dynamask
