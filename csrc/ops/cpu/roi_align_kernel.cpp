// CPU kernels of the batched RoIAlign ops.
//
// Features are read channels-last (one [H, W, C] image at a time), so each bilinear tap is a
// contiguous, vectorisable axpy over a block of channels, and the tap positions and weights of a
// bin are computed once and reused for every channel of the block. Work is split over
// (RoI, channel block) in the forward and over channel blocks in the backward, which makes the
// backward's scatter-add race-free (two threads never touch the same channel) and deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/roi_align_checks.h"
#include "ops/roi_align_common.h"

namespace dynamask {
namespace roi_align {
namespace {

// One pyramid level, channels-last.
template <typename T>
struct LevelNHWC {
  const T* data;
  int64_t height, width, channels;
  double scale;
};

// Channel blocks: multiples of 8 (one AVX register of floats), at least 4 per thread when the
// channel count allows, so narrow levels (32 channels) still keep every thread busy.
inline int64_t channel_block(int64_t channels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = (channels + 4 * threads - 1) / (4 * threads);
  block = std::max<int64_t>(8, (block + 7) / 8 * 8);
  return std::min(block, std::max<int64_t>(channels, 1));
}

// The per-axis sample taps of one RoI: grid_h samples for each output row, grid_w for each column.
// Computed once per RoI, then combined into 2-D taps by a product (bilinear is separable).
template <typename Acc>
struct RoiTaps {
  RoiGeometry<Acc> g;
  std::vector<AxisTap<Acc>> ys, xs;  // [pooled_h * grid_h], [pooled_w * grid_w]

  template <typename T>
  void compute(const T* roi, double scale, int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
               int64_t sampling_ratio, bool aligned) {
    const Acc box[4] = {static_cast<Acc>(roi[1]), static_cast<Acc>(roi[2]), static_cast<Acc>(roi[3]),
                        static_cast<Acc>(roi[4])};
    g = roi_geometry<Acc>(box, static_cast<Acc>(scale), pooled_h, pooled_w, sampling_ratio, aligned);
    const int64_t gh = std::max<int64_t>(g.grid_h, 0), gw = std::max<int64_t>(g.grid_w, 0);
    ys.resize(pooled_h * gh);
    xs.resize(pooled_w * gw);
    for (int64_t ph = 0; ph < pooled_h; ++ph)
      for (int64_t iy = 0; iy < gh; ++iy) ys[ph * gh + iy] = axis_tap(sample_y(g, ph, iy), height);
    for (int64_t pw = 0; pw < pooled_w; ++pw)
      for (int64_t ix = 0; ix < gw; ++ix) xs[pw * gw + ix] = axis_tap(sample_x(g, pw, ix), width);
  }

  // The 2-D taps of bin (ph, pw): offsets into a channels-last image of C channels, weights times `scale`.
  void bin_taps(int64_t ph, int64_t pw, int64_t width, int64_t C, Acc scale, std::vector<int64_t>& pos,
                std::vector<Acc>& w) const {
    const int64_t gh = std::max<int64_t>(g.grid_h, 0), gw = std::max<int64_t>(g.grid_w, 0);
    pos.clear();
    w.clear();
    for (int64_t iy = 0; iy < gh; ++iy) {
      const auto& ay = ys[ph * gh + iy];
      if (!ay.valid) continue;
      for (int64_t ix = 0; ix < gw; ++ix) {
        const auto& ax = xs[pw * gw + ix];
        if (!ax.valid) continue;
        BilinearTaps<Acc> t;
        combine_taps(ay, ax, width, t);
        for (int k = 0; k < 4; ++k) {
          pos.push_back(t.pos[k] * C);
          w.push_back(t.w[k] * scale);
        }
      }
    }
  }
};

// out[c] = sum_t w[t] * src[pos[t] + c] for c < n, channels in register-sized chunks so the
// accumulators stay in registers across all taps (the compiler unrolls the fixed-size inner loop).
template <typename T, typename Acc>
inline void accumulate_taps(Acc* __restrict out, const T* __restrict src, const int64_t* __restrict pos,
                            const Acc* __restrict w, int64_t ntaps, int64_t n) {
  constexpr int64_t kChunk = 16;
  int64_t c = 0;
  for (; c + kChunk <= n; c += kChunk) {
    Acc a[kChunk] = {};
    for (int64_t t = 0; t < ntaps; ++t) {
      const T* s = src + pos[t] + c;
      const Acc wt = w[t];
      for (int64_t j = 0; j < kChunk; ++j) a[j] += wt * static_cast<Acc>(s[j]);
    }
    for (int64_t j = 0; j < kChunk; ++j) out[c + j] = a[j];
  }
  for (; c < n; ++c) {
    Acc a = 0;
    for (int64_t t = 0; t < ntaps; ++t) a += w[t] * static_cast<Acc>(src[pos[t] + c]);
    out[c] = a;
  }
}

// dst[pos[t] + c] += w[t] * g[c] for all taps t and c < n (the transpose of accumulate_taps).
template <typename Acc>
inline void scatter_taps(Acc* __restrict dst, const Acc* __restrict g, const int64_t* __restrict pos,
                         const Acc* __restrict w, int64_t ntaps, int64_t n) {
  constexpr int64_t kChunk = 16;
  int64_t c = 0;
  for (; c + kChunk <= n; c += kChunk) {
    Acc gc[kChunk];
    for (int64_t j = 0; j < kChunk; ++j) gc[j] = g[c + j];
    for (int64_t t = 0; t < ntaps; ++t) {
      Acc* d = dst + pos[t] + c;
      const Acc wt = w[t];
      for (int64_t j = 0; j < kChunk; ++j) d[j] += wt * gc[j];
    }
  }
  for (; c < n; ++c)
    for (int64_t t = 0; t < ntaps; ++t) dst[pos[t] + c] += w[t] * g[c];
}

// out[c, ph, pw] for channels [c0, c1) of one RoI on one level. row: [pooled_w, c1 - c0] scratch.
template <typename T, typename Acc>
void pool_one_roi(const LevelNHWC<T>& lv, const T* roi /* 5 values */, int64_t pooled_h, int64_t pooled_w,
                  int64_t sampling_ratio, bool aligned, int64_t c0, int64_t c1, T* out_roi, RoiTaps<Acc>& taps,
                  std::vector<Acc>& row) {
  taps.compute(roi, lv.scale, lv.height, lv.width, pooled_h, pooled_w, sampling_ratio, aligned);
  const auto& g = taps.g;
  const int64_t C = lv.channels, nc = c1 - c0, plane = pooled_h * pooled_w;
  const T* img = lv.data + static_cast<int64_t>(roi[0]) * lv.height * lv.width * C + c0;
  row.assign(pooled_w * nc, Acc(0));
  std::vector<int64_t> tap_pos;
  std::vector<Acc> tap_w;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      // All taps of this bin first, then one pass over the channels with the accumulators in registers.
      taps.bin_taps(ph, pw, lv.width, C, g.inv_count, tap_pos, tap_w);
      accumulate_taps<T, Acc>(row.data() + pw * nc, img, tap_pos.data(), tap_w.data(),
                              static_cast<int64_t>(tap_pos.size()), nc);
    }
    // [pw, c] -> out[c, ph, pw]: contiguous writes along pw.
    for (int64_t c = 0; c < nc; ++c) {
      T* dst = out_roi + (c0 + c) * plane + ph * pooled_w;
      for (int64_t pw = 0; pw < pooled_w; ++pw) dst[pw] = static_cast<T>(row[pw * nc + c]);
    }
  }
}

// grad_img[y, x, c] += ... for channels [c0, c1) of one RoI (the transpose of pool_one_roi).
template <typename T, typename Acc>
void unpool_one_roi(Acc* grad_img /* [H, W, C] of the RoI's image */, int64_t height, int64_t width,
                    int64_t C, double scale, const T* roi, const T* grad_roi /* [C, ph, pw] */,
                    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned, int64_t c0,
                    int64_t c1, RoiTaps<Acc>& taps, std::vector<Acc>& row) {
  taps.compute(roi, scale, height, width, pooled_h, pooled_w, sampling_ratio, aligned);
  const auto& g = taps.g;
  const int64_t nc = c1 - c0, plane = pooled_h * pooled_w;
  Acc* gimg = grad_img + c0;
  row.resize(pooled_w * nc);
  std::vector<int64_t> tap_pos;
  std::vector<Acc> tap_w;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    // out[c, ph, :] -> row[pw, c], pre-scaled by 1 / count.
    for (int64_t c = 0; c < nc; ++c) {
      const T* src = grad_roi + (c0 + c) * plane + ph * pooled_w;
      for (int64_t pw = 0; pw < pooled_w; ++pw) row[pw * nc + c] = static_cast<Acc>(src[pw]) * g.inv_count;
    }
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      taps.bin_taps(ph, pw, width, C, Acc(1), tap_pos, tap_w);
      scatter_taps<Acc>(gimg, row.data() + pw * nc, tap_pos.data(), tap_w.data(),
                        static_cast<int64_t>(tap_pos.size()), nc);
    }
  }
}

// Pools rois[0:num_rois] into out [num_rois, C, ph, pw]; the level of RoI r is
// roi_levels[r] (or fixed_level when roi_levels is null).
template <typename T>
void pool_rois(const std::vector<LevelNHWC<T>>& levels, const int64_t* roi_levels, int64_t fixed_level,
               const T* rois, int64_t num_rois, int64_t channels, int64_t pooled_h, int64_t pooled_w,
               int64_t sampling_ratio, bool aligned, T* out) {
  using Acc = at::opmath_type<T>;
  if (num_rois == 0 || channels == 0) return;
  // Whole channel rows per RoI when there are enough RoIs to keep every thread busy (taps are then
  // computed once per RoI); otherwise split the channels too.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = num_rois >= 4 * threads ? channels : channel_block(channels);
  const int64_t nblocks = (channels + block - 1) / block;
  const int64_t roi_stride = channels * pooled_h * pooled_w;
  at::parallel_for(0, num_rois * nblocks, 1, [&](int64_t begin, int64_t end) {
    RoiTaps<Acc> taps;
    std::vector<Acc> row;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / nblocks, c0 = (i % nblocks) * block, c1 = std::min(channels, c0 + block);
      const auto& lv = levels[roi_levels ? roi_levels[r] : fixed_level];
      pool_one_roi<T, Acc>(lv, rois + r * 5, pooled_h, pooled_w, sampling_ratio, aligned, c0, c1,
                           out + r * roi_stride, taps, row);
    }
  });
}

template <typename T, typename Acc>
void unpool_rois(const std::vector<Acc*>& grad_levels, const std::vector<LevelNHWC<T>>& shapes,
                 const int64_t* roi_levels, int64_t fixed_level, const T* rois, int64_t num_rois,
                 int64_t channels, const T* grad, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                 bool aligned) {
  if (num_rois == 0 || channels == 0) return;
  const int64_t block = channel_block(channels);
  const int64_t nblocks = (channels + block - 1) / block;
  const int64_t roi_stride = channels * pooled_h * pooled_w;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    RoiTaps<Acc> taps;
    std::vector<Acc> row;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * block, c1 = std::min(channels, c0 + block);
      for (int64_t r = 0; r < num_rois; ++r) {
        const int64_t l = roi_levels ? roi_levels[r] : fixed_level;
        const auto& lv = shapes[l];
        const int64_t b = static_cast<int64_t>(rois[r * 5]);
        unpool_one_roi<T, Acc>(grad_levels[l] + b * lv.height * lv.width * channels, lv.height, lv.width,
                               channels, lv.scale, rois + r * 5, grad + r * roi_stride, pooled_h, pooled_w,
                               sampling_ratio, aligned, c0, c1, taps, row);
      }
    }
  });
}

// Level index of every RoI: given (checked) or by the FPN LevelMapper.
template <typename T>
std::vector<int64_t> roi_levels_cpu(const at::Tensor& rois, const c10::optional<at::Tensor>& levels,
                                    at::ArrayRef<double> scales, const char* op) {
  const int64_t R = rois.size(0), L = static_cast<int64_t>(scales.size());
  std::vector<int64_t> out(R);
  if (levels.has_value()) {
    const auto lv = levels->contiguous();
    const int64_t* p = lv.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK_VALUE(p[r] >= 0 && p[r] < L, op, ": levels[", r, "] is ", p[r], " but must be in [0, ", L, ")");
      out[r] = p[r];
    }
    return out;
  }
  const int64_t k_min = static_cast<int64_t>(std::lround(-std::log2(scales[0])));
  const T* q = rois.data_ptr<T>();
  using Acc = at::opmath_type<T>;
  for (int64_t r = 0; r < R; ++r) {
    const T* b = q + r * 5;
    out[r] = fpn_level<Acc>(b[1], b[2], b[3], b[4], k_min, k_min + L - 1);
  }
  return out;
}

std::vector<at::Tensor> to_nhwc(at::TensorList features) {
  std::vector<at::Tensor> out;
  out.reserve(features.size());
  for (const auto& f : features) out.push_back(f.permute({0, 2, 3, 1}).contiguous());
  return out;
}

at::Tensor roi_align_multilevel_cpu(at::TensorList features, const at::Tensor& rois,
                                    const c10::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_multilevel";
  check_multilevel_args(features, rois, levels, spatial_scales, pooled_h, pooled_w, sampling_ratio, op);
  const int64_t C = features[0].size(1);
  const auto rois_c = rois.contiguous();
  const int64_t R = rois.size(0);
  auto out = at::empty({R, C, pooled_h, pooled_w}, features[0].options());  // every bin is written
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_multilevel_cpu", [&] {
    check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), R, features[0].size(0), op);
    const auto roi_levels = roi_levels_cpu<scalar_t>(rois_c, levels, spatial_scales, op);
    const auto nhwc = to_nhwc(features);
    std::vector<LevelNHWC<scalar_t>> lv;
    for (size_t l = 0; l < nhwc.size(); ++l) {
      lv.push_back({nhwc[l].data_ptr<scalar_t>(), nhwc[l].size(1), nhwc[l].size(2), C, spatial_scales[l]});
    }
    pool_rois<scalar_t>(lv, roi_levels.data(), 0, rois_c.data_ptr<scalar_t>(), R, C, pooled_h, pooled_w,
                        sampling_ratio, aligned, out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> roi_align_multilevel_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const c10::optional<at::Tensor>& levels,
    at::ArrayRef<double> spatial_scales, int64_t batch_size, int64_t channels, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_multilevel_backward";
  const int64_t L = static_cast<int64_t>(spatial_scales.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(heights.size()) == L && static_cast<int64_t>(widths.size()) == L, op,
                    ": heights/widths must have one entry per level");
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels, op,
                    ": grad must be [R, C, ph, pw]");
  const auto rois_c = rois.contiguous();
  const auto grad_c = grad.contiguous();
  const int64_t R = rois.size(0), ph = grad.size(2), pw = grad.size(3);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_multilevel_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<Acc>::value;
    std::vector<at::Tensor> gl;
    std::vector<Acc*> gp;
    std::vector<LevelNHWC<scalar_t>> shapes;
    for (int64_t l = 0; l < L; ++l) {
      gl.push_back(at::zeros({batch_size, heights[l], widths[l], channels}, grad.options().dtype(acc_type)));
      gp.push_back(gl.back().data_ptr<Acc>());
      shapes.push_back({nullptr, heights[l], widths[l], channels, spatial_scales[l]});
    }
    if (R > 0) {
      check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), R, batch_size, op);
      const auto roi_levels = roi_levels_cpu<scalar_t>(rois_c, levels, spatial_scales, op);
      unpool_rois<scalar_t, Acc>(gp, shapes, roi_levels.data(), 0, rois_c.data_ptr<scalar_t>(), R, channels,
                                 grad_c.data_ptr<scalar_t>(), ph, pw, sampling_ratio, aligned);
    }
    for (auto& g : gl) result.push_back(g.permute({0, 3, 1, 2}).to(grad.scalar_type()).contiguous());
  });
  return result;
}

std::vector<at::Tensor> roi_align_stages_cpu(at::TensorList features, const at::Tensor& rois,
                                             at::IntArrayRef stage_levels, at::IntArrayRef stage_sizes,
                                             at::IntArrayRef stage_counts, at::ArrayRef<double> spatial_scales,
                                             int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_stages";
  check_rois_and_levels(features, rois, spatial_scales, op);
  check_stages(features, rois, stage_levels, stage_sizes, stage_counts, op);
  TORCH_CHECK_VALUE(sampling_ratio >= 0, op, ": sampling_ratio must be >= 0, got ", sampling_ratio);
  const auto rois_c = rois.contiguous();
  std::vector<at::Tensor> outs;
  for (size_t j = 0; j < stage_levels.size(); ++j) {
    const auto& f = features[stage_levels[j]];
    outs.push_back(at::empty({stage_counts[j], f.size(1), stage_sizes[j], stage_sizes[j]}, f.options()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_cpu", [&] {
    int64_t max_count = 0;
    for (auto c : stage_counts) max_count = std::max(max_count, c);
    check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), max_count, features[0].size(0), op);
    for (size_t j = 0; j < stage_levels.size(); ++j) {
      if (stage_counts[j] == 0) continue;
      const int64_t l = stage_levels[j];
      const auto nhwc = features[l].permute({0, 2, 3, 1}).contiguous();
      const int64_t C = nhwc.size(3);
      std::vector<LevelNHWC<scalar_t>> lv{{nhwc.data_ptr<scalar_t>(), nhwc.size(1), nhwc.size(2), C, spatial_scales[l]}};
      pool_rois<scalar_t>(lv, nullptr, 0, rois_c.data_ptr<scalar_t>(), stage_counts[j], C, stage_sizes[j],
                          stage_sizes[j], sampling_ratio, aligned, outs[j].data_ptr<scalar_t>());
    }
  });
  return outs;
}

std::vector<at::Tensor> roi_align_stages_backward_cpu(
    at::TensorList grads, const at::Tensor& rois, at::IntArrayRef stage_levels, at::ArrayRef<double> spatial_scales,
    int64_t batch_size, at::IntArrayRef channels, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_stages_backward";
  const int64_t L = static_cast<int64_t>(spatial_scales.size());
  TORCH_CHECK_VALUE(grads.size() == stage_levels.size(), op, ": one grad per stage expected");
  TORCH_CHECK_VALUE(static_cast<int64_t>(channels.size()) == L && static_cast<int64_t>(heights.size()) == L &&
                        static_cast<int64_t>(widths.size()) == L,
                    op, ": channels/heights/widths must have one entry per level");
  const auto rois_c = rois.contiguous();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<Acc>::value;
    std::vector<at::Tensor> gl;
    std::vector<Acc*> gp;
    std::vector<LevelNHWC<scalar_t>> shapes;
    for (int64_t l = 0; l < L; ++l) {
      gl.push_back(at::zeros({batch_size, heights[l], widths[l], channels[l]}, rois.options().dtype(acc_type)));
      gp.push_back(gl.back().data_ptr<Acc>());
      shapes.push_back({nullptr, heights[l], widths[l], channels[l], spatial_scales[l]});
    }
    for (size_t j = 0; j < grads.size(); ++j) {
      const auto g = grads[j].contiguous();
      const int64_t n = g.size(0), l = stage_levels[j];
      if (n == 0) continue;
      TORCH_CHECK_VALUE(g.size(1) == channels[l], op, ": grads[", j, "] has ", g.size(1), " channels, expected ",
                        channels[l]);
      check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), n, batch_size, op);
      unpool_rois<scalar_t, Acc>(gp, shapes, nullptr, l, rois_c.data_ptr<scalar_t>(), n, channels[l],
                                 g.data_ptr<scalar_t>(), g.size(2), g.size(3), sampling_ratio, aligned);
    }
    for (auto& g : gl) result.push_back(g.permute({0, 3, 1, 2}).to(rois.scalar_type()).contiguous());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CPU, m) {
  m.impl("roi_align_multilevel", &roi_align_multilevel_cpu);
  m.impl("roi_align_multilevel_backward", &roi_align_multilevel_backward_cpu);
  m.impl("roi_align_stages", &roi_align_stages_cpu);
  m.impl("roi_align_stages_backward", &roi_align_stages_backward_cpu);
}

}  // namespace roi_align
}  // namespace dynamask
