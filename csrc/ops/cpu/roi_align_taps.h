#pragma once
// Per-RoI sample taps of the CPU RoIAlign kernels (both the planar and the channels-last paths):
// where each output bin reads on its level, per axis, with the weights and the border rules of
// roi_align_common.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/roi_align_common.h"

namespace dynamask {
namespace roi_align {

// One pyramid level: NCHW contiguous, or NHWC for the channels-last forward (data is null for the
// backward's shape-only use).
template <typename T>
struct Level {
  const T* data;
  int64_t height, width, channels;
  double scale;
};

// The taps of one axis of one RoI: bin b reads positions idx[begin[b] .. begin[b + 1]) with weights w
// (two taps per valid sample; a tap on the position of the previous one is merged into it).
template <typename Acc>
struct AxisTaps {
  std::vector<int64_t> begin;  // [bins + 1]
  std::vector<int64_t> idx;    // [taps]
  std::vector<Acc> w;          // [taps]
  int64_t lo = 0, hi = -1;     // smallest and largest position read

  int64_t taps() const { return static_cast<int64_t>(idx.size()); }

  // sample(b, i): coordinate of sample i of bin b; size: the map's extent on this axis.
  template <typename SampleFn>
  void build(int64_t bins, int64_t grid, int64_t size, Acc scale, const SampleFn& sample) {
    begin.assign(1, 0);
    idx.clear();
    w.clear();
    for (int64_t b = 0; b < bins; ++b) {
      const size_t first = idx.size();
      for (int64_t i = 0; i < grid; ++i) {
        const AxisTap<Acc> t = axis_tap(sample(b, i), size);
        if (!t.valid) continue;
        add(first, t.lo, t.w_lo * scale);
        add(first, t.hi, t.w_hi * scale);
      }
      begin.push_back(static_cast<int64_t>(idx.size()));
    }
    lo = idx.empty() ? 0 : *std::min_element(idx.begin(), idx.end());
    hi = idx.empty() ? -1 : *std::max_element(idx.begin(), idx.end());
  }

 private:
  void add(size_t first, int64_t pos, Acc weight) {
    if (idx.size() > first && idx.back() == pos) {
      w.back() += weight;
    } else {
      idx.push_back(pos);
      w.push_back(weight);
    }
  }
};

// Both axes' taps of one RoI on one level, plus the distinct rows the y taps read (for x-first).
template <typename Acc>
struct RoiTaps {
  int64_t pooled_h = 0, pooled_w = 0;
  AxisTaps<Acc> y, x;
  std::vector<int64_t> rows;  // distinct feature rows read, ascending
  std::vector<int64_t> slot;  // [y taps]: index into rows of each y tap

  template <typename T>
  void compute(const T* roi /* batch, x1, y1, x2, y2 */, double scale, int64_t height, int64_t width, int64_t ph,
               int64_t pw, int64_t sampling_ratio, bool aligned) {
    const Acc box[4] = {static_cast<Acc>(roi[1]), static_cast<Acc>(roi[2]), static_cast<Acc>(roi[3]),
                        static_cast<Acc>(roi[4])};
    const RoiGeometry<Acc> g = roi_geometry<Acc>(box, static_cast<Acc>(scale), ph, pw, sampling_ratio, aligned);
    pooled_h = ph;
    pooled_w = pw;
    // A non-positive adaptive grid (inverted box) has no samples.
    const int64_t gh = std::max<int64_t>(g.grid_h, 0), gw = std::max<int64_t>(g.grid_w, 0);
    y.build(ph, gh, height, g.inv_count, [&](int64_t b, int64_t i) { return sample_y(g, b, i); });
    x.build(pw, gw, width, Acc(1), [&](int64_t b, int64_t i) { return sample_x(g, b, i); });
    std::vector<int64_t> mark(std::max<int64_t>(y.hi - y.lo + 1, 0), -1);  // row -> slot
    for (int64_t r : y.idx) mark[r - y.lo] = 0;
    rows.clear();
    for (int64_t r = y.lo; r <= y.hi; ++r) {
      if (mark[r - y.lo] < 0) continue;
      mark[r - y.lo] = static_cast<int64_t>(rows.size());
      rows.push_back(r);
    }
    slot.resize(y.idx.size());
    for (size_t j = 0; j < y.idx.size(); ++j) slot[j] = mark[y.idx[j] - y.lo];
  }

  bool empty() const { return y.idx.empty() || x.idx.empty(); }

  // Elements of scratch the plane functions need: rows and one accumulator row, or cols.
  int64_t scratch_size(bool x_first) const {
    return x_first ? (static_cast<int64_t>(rows.size()) + 1) * pooled_w : pooled_h * columns();
  }
  int64_t columns() const { return x.hi - x.lo + 1; }

  // Multiply-adds per channel of the two pass orders; the axpy passes count 1/4 (SIMD width).
  bool x_first() const {
    const int64_t nx = x.taps(), ny = y.taps(), nrows = static_cast<int64_t>(rows.size());
    return 4 * nrows * nx + ny * pooled_w <= ny * columns() + 4 * pooled_h * nx;
  }
};

// The taps of rois[0:num_rois] on their levels (roi_levels[r], or fixed_level when null), computed
// once per call and shared by all threads.
template <typename T, typename Acc = at::opmath_type<T>>
std::vector<RoiTaps<Acc>> all_roi_taps(const std::vector<Level<T>>& levels, const int64_t* roi_levels,
                                       int64_t fixed_level, const T* rois, int64_t num_rois, int64_t pooled_h,
                                       int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  std::vector<RoiTaps<Acc>> taps(num_rois);
  at::parallel_for(0, num_rois, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto& lv = levels[roi_levels ? roi_levels[r] : fixed_level];
      taps[r].compute(rois + r * 5, lv.scale, lv.height, lv.width, pooled_h, pooled_w, sampling_ratio, aligned);
    }
  });
  return taps;
}

}  // namespace roi_align
}  // namespace dynamask
