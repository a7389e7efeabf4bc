// CPU kernels of the paste ops.
//
// Output n pastes mask row index[n] (or mask n without an index) into box n, so the masks may come in
// any order, e.g. grouped by resolution, and the output is still in box order.
//
// paste_masks: work is split over (output, image row). A row outside the mask's box span is one fill;
// a row inside it is a fill left of the span, the samples inside it and a fill right of it, so the
// sampling work is proportional to the boxes' areas and the output is written exactly once (no
// separate zeroing pass). The column taps of a mask are computed once per thread and mask.
//
// paste_masks_rle: per mask, the column-major (Fortran order) runs of the binary mask, from the
// same samples, with the whole columns and column parts outside the box span emitted as single
// runs; then COCO's compressed string of the runs (pycocotools' rleToString).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "ops/paste_masks_checks.h"
#include "ops/paste_masks_common.h"

namespace dynamask {
namespace paste_masks {
namespace {

// Contiguous groups, float32 boxes and the index (undefined when none), after the checks every kernel
// runs; n outputs (the boxes' rows), m masks (the groups' rows).
struct Prepared {
  std::vector<at::Tensor> groups;
  at::Tensor boxes, index;
  int64_t n, m;
};

Prepared prepare(at::TensorList masks, const at::Tensor& boxes, const c10::optional<at::Tensor>& index, int64_t height,
                 int64_t width, const char* op) {
  Prepared p;
  p.m = check_inputs(masks, boxes, height, width, index, op);
  p.n = boxes.size(0);
  if (index.has_value()) {
    p.index = index->contiguous();
    check_index_cpu(p.index.data_ptr<int64_t>(), p.n, p.m, op);
  }
  for (const auto& m : masks) {
    if (m.size(0) > 0) p.groups.push_back(m.contiguous());
  }
  p.boxes = boxes.to(at::kFloat).contiguous();
  check_boxes_finite_cpu(p.boxes.data_ptr<float>(), p.n, op);
  return p;
}

// Everything a thread needs about output n: the data and size of the mask it reads, and the spans of
// its box.
template <typename T>
struct MaskView {
  const T* data;
  int64_t size;
  AxisSpan x, y;
};

template <typename T>
std::vector<MaskView<T>> mask_views(const Prepared& p, int64_t height, int64_t width) {
  std::vector<MaskView<T>> rows;  // the masks, counted across the groups in order (spans not yet set)
  rows.reserve(p.m);
  for (const auto& g : p.groups) {
    const int64_t S = g.size(1);
    const T* base = g.data_ptr<T>();
    for (int64_t k = 0; k < g.size(0); ++k) rows.push_back({base + k * S * S, S, {}, {}});
  }
  const float* boxes = p.boxes.data_ptr<float>();
  const int64_t* index = p.index.defined() ? p.index.data_ptr<int64_t>() : nullptr;
  std::vector<MaskView<T>> views;
  views.reserve(p.n);
  for (int64_t n = 0; n < p.n; ++n) {
    MaskView<T> v = rows[mask_row(index, n, p.m)];  // a valid row: prepare checked the index
    const float* b = boxes + n * 4;
    v.x = axis_span(b[0], b[2], v.size, width);
    v.y = axis_span(b[1], b[3], v.size, height);
    views.push_back(v);
  }
  return views;
}

template <typename T, typename Out>
void paste_rows(const std::vector<MaskView<T>>& views, int64_t height, int64_t width, float threshold, Out* out) {
  const int64_t n = static_cast<int64_t>(views.size());
  const Out fill = Output<Out>::of(0.f, threshold);
  // About 64 KiB of output per task keeps the scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, width * sizeof(Out)));
  at::parallel_for(0, n * height, grain, [&](int64_t begin, int64_t end) {
    std::vector<AxisTaps> xtaps;
    int64_t tapped = -1;  // the mask whose column taps are in xtaps
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / height, y = r % height;
      const MaskView<T>& v = views[i];
      Out* row = out + r * width;
      if (y < v.y.lo || y >= v.y.hi || v.x.lo >= v.x.hi) {
        std::fill(row, row + width, fill);
        continue;
      }
      if (tapped != i) {
        xtaps.resize(v.x.hi - v.x.lo);
        for (int64_t x = v.x.lo; x < v.x.hi; ++x) xtaps[x - v.x.lo] = axis_taps(v.x, x, v.size);
        tapped = i;
      }
      std::fill(row, row + v.x.lo, fill);
      const AxisTaps ty = axis_taps(v.y, y, v.size);
      Out* dst = row + v.x.lo;
      const int64_t span = v.x.hi - v.x.lo;
      for (int64_t x = 0; x < span; ++x) dst[x] = Output<Out>::of(bilinear(v.data, v.size, ty, xtaps[x]), threshold);
      std::fill(row + v.x.hi, row + width, fill);
    }
  });
}

at::Tensor paste_masks_cpu(at::TensorList masks, const at::Tensor& boxes, int64_t height, int64_t width,
                           c10::optional<double> threshold, const c10::optional<at::Tensor>& index) {
  const char* op = "paste_masks";
  TORCH_CHECK_VALUE(!threshold.has_value() || std::isfinite(*threshold), op, ": threshold must be finite or None, got ",
                    *threshold);
  const Prepared p = prepare(masks, boxes, index, height, width, op);
  const bool binary = threshold.has_value();
  auto out = at::empty({p.n, height, width}, boxes.options().dtype(binary ? at::kBool : at::kFloat));
  if (out.numel() == 0) return out;
  const float thr = binary ? static_cast<float>(*threshold) : 0.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks[0].scalar_type(), "paste_masks_cpu", [&] {
    const auto views = mask_views<scalar_t>(p, height, width);
    if (binary) {
      paste_rows<scalar_t, bool>(views, height, width, thr, out.data_ptr<bool>());
    } else {
      paste_rows<scalar_t, float>(views, height, width, thr, out.data_ptr<float>());
    }
  });
  return out;
}

// Run-length counts of a binary sequence that starts with a (possibly empty) run of zeros.
class Runs {
 public:
  void add(bool value, int64_t length) {
    if (length <= 0) return;
    if (value == value_) {
      run_ += length;
    } else {
      counts_.push_back(run_);
      value_ = value;
      run_ = length;
    }
  }
  std::vector<int64_t>& finish() {
    counts_.push_back(run_);
    return counts_;
  }

 private:
  std::vector<int64_t> counts_;
  bool value_ = false;
  int64_t run_ = 0;
};

// pycocotools' rleToString: each count (after the first two, as the difference to the count two
// before) in 5-bit groups, low bits first, 0x20 = more groups follow, offset by 48.
void append_coco_string(const std::vector<int64_t>& counts, std::string& s) {
  for (size_t i = 0; i < counts.size(); ++i) {
    int64_t x = counts[i];
    if (i > 2) x -= counts[i - 2];
    bool more = true;
    while (more) {
      char c = static_cast<char>(x & 0x1f);
      x >>= 5;  // arithmetic shift, as in the C original
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      s.push_back(static_cast<char>(c + 48));
    }
  }
}

template <typename T>
std::string mask_rle(const MaskView<T>& v, int64_t height, int64_t width, float threshold,
                     std::vector<AxisTaps>& ytaps) {
  Runs runs;
  if (v.x.lo >= v.x.hi || v.y.lo >= v.y.hi) {
    runs.add(false, height * width);
  } else {
    ytaps.resize(v.y.hi - v.y.lo);
    for (int64_t y = v.y.lo; y < v.y.hi; ++y) ytaps[y - v.y.lo] = axis_taps(v.y, y, v.size);
    runs.add(false, v.x.lo * height);
    for (int64_t x = v.x.lo; x < v.x.hi; ++x) {
      const AxisTaps tx = axis_taps(v.x, x, v.size);
      runs.add(false, v.y.lo);
      for (const auto& ty : ytaps) runs.add(bilinear(v.data, v.size, ty, tx) >= threshold, 1);
      runs.add(false, height - v.y.hi);
    }
    runs.add(false, (width - v.x.hi) * height);
  }
  std::string s;
  append_coco_string(runs.finish(), s);
  return s;
}

std::tuple<at::Tensor, at::Tensor> paste_masks_rle_cpu(at::TensorList masks, const at::Tensor& boxes, int64_t height,
                                                      int64_t width, double threshold,
                                                      const c10::optional<at::Tensor>& index) {
  const char* op = "paste_masks_rle";
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold > 0, op,
                    ": threshold must be a positive finite number (pixels outside the boxes are 0), got ", threshold);
  TORCH_CHECK_VALUE(height * width <= int64_t{0xffffffff}, op, ": COCO RLE counts are 32-bit; image of ", height,
                    " x ", width, " pixels is too large");
  const Prepared p = prepare(masks, boxes, index, height, width, op);
  std::vector<std::string> strings(p.n);
  if (p.n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks[0].scalar_type(), "paste_masks_rle_cpu", [&] {
      const auto views = mask_views<scalar_t>(p, height, width);
      at::parallel_for(0, p.n, 1, [&](int64_t begin, int64_t end) {
        std::vector<AxisTaps> ytaps;
        for (int64_t i = begin; i < end; ++i) {
          strings[i] = mask_rle(views[i], height, width, static_cast<float>(threshold), ytaps);
        }
      });
    });
  }
  auto offsets = at::empty({p.n + 1}, boxes.options().dtype(at::kLong));
  int64_t* o = offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t i = 0; i < p.n; ++i) o[i + 1] = o[i] + static_cast<int64_t>(strings[i].size());
  auto chars = at::empty({o[p.n]}, boxes.options().dtype(at::kByte));
  uint8_t* c = chars.data_ptr<uint8_t>();
  for (int64_t i = 0; i < p.n; ++i) std::memcpy(c + o[i], strings[i].data(), strings[i].size());
  return {chars, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CPU, m) {
  m.impl("paste_masks", &paste_masks_cpu);
  m.impl("paste_masks_rle", &paste_masks_rle_cpu);
}

}  // namespace paste_masks
}  // namespace dynamask
