#pragma once
// Paste arithmetic shared by the CPU and CUDA kernels (one copy, compiled for host and device).
//
// Convention (detectron2's, = F.grid_sample(align_corners=False) on the box's normalised grid):
// output pixel p has its centre at p + 0.5; a box [a1, a2) of length L covers a mask of S cells,
// so pixel p samples the mask at the continuous cell coordinate
//     c(p) = (p + 0.5 - a1) * S / L - 0.5,
// bilinearly, with zero padding: a tap off the mask contributes 0. The sample can be non-zero only
// for -1 < c(p) < S, i.e. within the box grown by half a mask cell; AxisSpan is that pixel range,
// clipped to the image. Everything is computed in float32.
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace dynamask {
namespace paste_masks {

// One axis of one box: the mapping pixel -> cell coordinate and the pixels that can be non-zero.
struct AxisSpan {
  float a1;       // box start, image pixels
  float scale;    // S / L, mask cells per image pixel
  int64_t lo, hi; // pixels [lo, hi) may sample a non-zero value; empty when hi <= lo
};

DYNAMASK_INLINE float clampf_(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// A box of non-positive (or NaN) length pastes nothing. The range is conservative by up to a pixel
// on each side; pixels in that margin sample exactly zero (both taps off the mask).
DYNAMASK_INLINE AxisSpan axis_span(float a1, float a2, int64_t mask_size, int64_t extent) {
  AxisSpan s;
  s.a1 = a1;
  s.scale = 0.f;
  s.lo = 0;
  s.hi = 0;
  const float len = a2 - a1;
  // Non-finite coordinates, and a finite box whose length overflows float32 (e.g. -3e38 to 3e38),
  // paste nothing: the CPU kernel refuses them first (check_boxes_cpu), the CUDA one leaves them empty.
  if (!(len > 0.f) || !(len <= 3.4028234e38f) || mask_size <= 0) return s;
  s.scale = static_cast<float>(mask_size) / len;
  const float half_cell = 0.5f * len / static_cast<float>(mask_size);
  const float ext = static_cast<float>(extent);
  s.lo = static_cast<int64_t>(clampf_(floorf(a1 - half_cell - 0.5f), 0.f, ext));
  s.hi = static_cast<int64_t>(clampf_(ceilf(a2 + half_cell - 0.5f) + 1.f, 0.f, ext));
  return s;
}

// The two bilinear taps of pixel p along one axis: cell indices clamped onto the mask (so reading
// them is always safe) and weights that are zero for a tap off the mask (zero padding).
struct AxisTaps {
  int32_t i0, i1;
  float w0, w1;
};

DYNAMASK_INLINE AxisTaps axis_taps(const AxisSpan& s, int64_t p, int64_t mask_size) {
  const float c = (static_cast<float>(p) + 0.5f - s.a1) * s.scale - 0.5f;
  const float f = floorf(c);
  const float l = c - f;
  // Only pixels of the span come here, so c lies within (-1 - scale, S + scale): it fits an int64,
  // and the indices are clamped onto the mask before they are narrowed.
  const int64_t i0 = static_cast<int64_t>(f), i1 = i0 + 1;
  AxisTaps t;
  t.w0 = (i0 >= 0 && i0 < mask_size) ? 1.f - l : 0.f;
  t.w1 = (i1 >= 0 && i1 < mask_size) ? l : 0.f;
  t.i0 = static_cast<int32_t>(i0 < 0 ? 0 : (i0 >= mask_size ? mask_size - 1 : i0));
  t.i1 = static_cast<int32_t>(i1 < 0 ? 0 : (i1 >= mask_size ? mask_size - 1 : i1));
  return t;
}

// The bilinear sample of a [S, S] mask at the taps (ty, tx).
template <typename T>
DYNAMASK_INLINE float bilinear(const T* mask, int64_t mask_size, const AxisTaps& ty, const AxisTaps& tx) {
  const T* r0 = mask + static_cast<int64_t>(ty.i0) * mask_size;
  const T* r1 = mask + static_cast<int64_t>(ty.i1) * mask_size;
  const float top = tx.w0 * static_cast<float>(r0[tx.i0]) + tx.w1 * static_cast<float>(r0[tx.i1]);
  const float bottom = tx.w0 * static_cast<float>(r1[tx.i0]) + tx.w1 * static_cast<float>(r1[tx.i1]);
  return ty.w0 * top + ty.w1 * bottom;
}

// The output element for a sampled value: the probability (float), or whether it reaches the
// threshold (bool).
template <typename Out>
struct Output;
template <>
struct Output<float> {
  static DYNAMASK_INLINE float of(float v, float /*threshold*/) { return v; }
};
template <>
struct Output<bool> {
  static DYNAMASK_INLINE bool of(float v, float threshold) { return v >= threshold; }
};

// The mask row that output n reads: index[n] when an index is given (-1 when it is not a row of the
// num_masks masks, which the CUDA kernel pastes as nothing; the CPU kernel refuses it first), else n.
DYNAMASK_INLINE int64_t mask_row(const int64_t* index, int64_t n, int64_t num_masks) {
  if (index == nullptr) return n;
  const int64_t m = index[n];
  return (m >= 0 && m < num_masks) ? m : -1;
}

// Up to this many resolution groups travel to the CUDA kernel by value (more take several launches).
constexpr int kMaxGroups = 16;

}  // namespace paste_masks
}  // namespace dynamask
