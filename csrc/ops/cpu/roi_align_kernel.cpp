// CPU kernels of the batched RoIAlign ops.
//
// Bilinear RoIAlign is separable. With torchvision's border rules a sample counts only when both its
// y and its x coordinate are on the map, and its weight is wy * wx, so one bin of one channel is
//   out[ph, pw] = sum_y Wy[ph, y] * sum_x Wx[pw, x] * f[y, x]
// where Wy (1 / sample count folded in) and Wx are sparse: each bin has a few taps per axis, computed
// once per RoI (RoiTaps). Each channel plane of the NCHW input (read in place, no layout copy) is then
// pooled in two passes, in whichever order does fewer multiply-adds for this RoI:
//   x first: rows[k, pw] = sum_x Wx[pw, x] f[y_k, x] for the rows y_k that the y taps read, then
//            out[ph, :] = sum_k Wy[ph, y_k] rows[k, :]        (axpys along pw)
//   y first: cols[ph, x] = sum_y Wy[ph, y] f[y, x] over the columns the x taps read (axpys along x),
//            then out[ph, pw] = sum_x Wx[pw, x] cols[ph, x]
// Both write out[c, ph, :] contiguously in the [R, C, ph, pw] layout. The backward runs the same
// passes transposed. Forward work items are (channel block, RoI chunk), each writing its own outputs;
// the backward splits channels over threads, so its scatter-adds are race-free and deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ops/roi_align_checks.h"
#include "ops/roi_align_common.h"
#include "ops/cpu/roi_align_channels_last.h"
#include "ops/cpu/roi_align_taps.h"

namespace dynamask {
namespace roi_align {
namespace {

// dst[i] += a * src[i] for i < n.
template <typename Acc, typename S>
inline void axpy(Acc* __restrict dst, Acc a, const S* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += a * static_cast<Acc>(src[i]);
}

// out[i] = sum_{j < N} w[j] * rows[j][i] for i < n, in one pass.
template <int N, typename Acc, typename S, typename D>
inline void sum_rows(D* __restrict out, const S* const* rows, const Acc* w, int64_t n) {
  const S* r[N];
  Acc wj[N];
  for (int j = 0; j < N; ++j) r[j] = rows[j], wj[j] = w[j];
  for (int64_t i = 0; i < n; ++i) {
    Acc a = wj[0] * static_cast<Acc>(r[0][i]);
    for (int j = 1; j < N; ++j) a += wj[j] * static_cast<Acc>(r[j][i]);
    out[i] = static_cast<D>(a);
  }
}

// out[i] = sum_{j < taps} w[j] * row(j)[i] for i < n: one pass over out for up to four taps (two
// samples per bin), else summed in acc [n].
template <typename Acc, typename D, typename RowFn>
inline void weighted_rows(D* out, const Acc* w, int64_t taps, int64_t n, const RowFn& row, Acc* acc) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(row(0))>>;
  const S* r[4];
  for (int64_t j = 0; j < std::min<int64_t>(taps, 4); ++j) r[j] = row(j);
  switch (taps) {
    case 0: std::fill(out, out + n, D(0)); return;
    case 1: sum_rows<1>(out, r, w, n); return;
    case 2: sum_rows<2>(out, r, w, n); return;
    case 3: sum_rows<3>(out, r, w, n); return;
    case 4: sum_rows<4>(out, r, w, n); return;
    default: break;
  }
  sum_rows<4>(acc, r, w, n);
  for (int64_t j = 4; j < taps; ++j) axpy(acc, w[j], row(j), n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<D>(acc[i]);
}

// dst[g][p] = sum over the x taps of bin p of w * src[g][idx - base], for G rows at once: the rows share
// the taps and their independent sums hide the add latency of these short scalar loops.
template <int G, typename Acc, typename S, typename D>
inline void gather_rows(const S* const* src, D* const* dst, const AxisTaps<Acc>& x, int64_t pw, int64_t base) {
  const int64_t* idx = x.idx.data();
  const Acc* w = x.w.data();
  for (int64_t p = 0; p < pw; ++p) {
    Acc a[G] = {};
    for (int64_t j = x.begin[p]; j < x.begin[p + 1]; ++j) {
      const int64_t i = idx[j] - base;
      for (int g = 0; g < G; ++g) a[g] += w[j] * static_cast<Acc>(src[g][i]);
    }
    for (int g = 0; g < G; ++g) dst[g][p] = static_cast<D>(a[g]);
  }
}

// The transpose of gather_rows: dst[g][idx - base] += w * src[g][p].
template <int G, typename Acc, typename S>
inline void scatter_rows(const S* const* src, Acc* const* dst, const AxisTaps<Acc>& x, int64_t pw, int64_t base) {
  const int64_t* idx = x.idx.data();
  const Acc* w = x.w.data();
  for (int64_t p = 0; p < pw; ++p) {
    Acc v[G];
    for (int g = 0; g < G; ++g) v[g] = static_cast<Acc>(src[g][p]);
    for (int64_t j = x.begin[p]; j < x.begin[p + 1]; ++j)
      for (int g = 0; g < G; ++g) dst[g][idx[j] - base] += w[j] * v[g];
  }
}

// Runs gather_rows (scatter = false) or scatter_rows over rows [0, n) in groups of four; src(k) and
// dst(k) point at row k, whose first element is feature column `base`.
template <bool scatter, typename Acc, typename SrcFn, typename DstFn>
inline void x_pass(int64_t n, const AxisTaps<Acc>& x, int64_t pw, int64_t base, const SrcFn& src, const DstFn& dst) {
  auto run = [&](auto group, int64_t k) {
    constexpr int G = decltype(group)::value;
    std::array<decltype(src(0)), G> s;
    std::array<decltype(dst(0)), G> d;
    for (int g = 0; g < G; ++g) s[g] = src(k + g), d[g] = dst(k + g);
    if constexpr (scatter) {
      scatter_rows<G>(s.data(), d.data(), x, pw, base);
    } else {
      gather_rows<G>(s.data(), d.data(), x, pw, base);
    }
  };
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) run(std::integral_constant<int, 4>{}, k);
  for (; k < n; ++k) run(std::integral_constant<int, 1>{}, k);
}

// ---- forward: one channel plane of one RoI. plane: [H, W] of the RoI's image; out: [ph, pw].

// rows[k, pw] = sum_x Wx f[y_k, x]; out[ph, :] = sum_k Wy rows[k, :]. buf: [(rows + 1) * pw].
template <typename T, typename Acc>
void pool_plane_x_first(const RoiTaps<Acc>& t, const T* plane, int64_t width, Acc* buf, T* out) {
  const int64_t pw = t.pooled_w, nrows = static_cast<int64_t>(t.rows.size());
  x_pass<false>(
      nrows, t.x, pw, 0, [&](int64_t k) { return plane + t.rows[k] * width; },
      [&](int64_t k) { return buf + k * pw; });
  const auto& y = t.y;
  for (int64_t h = 0; h < t.pooled_h; ++h) {
    const int64_t j0 = y.begin[h];
    weighted_rows(
        out + h * pw, y.w.data() + j0, y.begin[h + 1] - j0, pw,
        [&](int64_t j) -> const Acc* { return buf + t.slot[j0 + j] * pw; }, buf + nrows * pw);
  }
}

// cols[ph, x] = sum_y Wy f[y, x]; out[ph, pw] = sum_x Wx cols[ph, x]. buf: [ph * columns].
template <typename T, typename Acc>
void pool_plane_y_first(const RoiTaps<Acc>& t, const T* plane, int64_t width, Acc* buf, T* out) {
  const int64_t pw = t.pooled_w, ncols = t.columns();
  const auto& y = t.y;
  for (int64_t h = 0; h < t.pooled_h; ++h) {
    const int64_t j0 = y.begin[h];
    Acc* cols = buf + h * ncols;
    weighted_rows(
        cols, y.w.data() + j0, y.begin[h + 1] - j0, ncols,
        [&](int64_t j) -> const T* { return plane + y.idx[j0 + j] * width + t.x.lo; }, cols);
  }
  x_pass<false>(
      t.pooled_h, t.x, pw, t.x.lo, [&](int64_t h) -> const Acc* { return buf + h * ncols; },
      [&](int64_t h) { return out + h * pw; });
}

// One plane by whichever pass order t chose; buf: scratch of t.scratch_size(x_first) elements.
template <typename T, typename Acc>
inline void pool_plane(const RoiTaps<Acc>& t, bool x_first, const T* plane, int64_t width, Acc* buf, T* out) {
  if (x_first) {
    pool_plane_x_first(t, plane, width, buf, out);
  } else {
    pool_plane_y_first(t, plane, width, buf, out);
  }
}

// ---- backward: the transposes. grad: [ph, pw] of one RoI and channel; gplane: [H, W] accumulator.

template <typename T, typename Acc>
void unpool_plane_x_first(const RoiTaps<Acc>& t, const T* grad, Acc* gplane, int64_t width, Acc* buf) {
  const int64_t pw = t.pooled_w, nrows = static_cast<int64_t>(t.rows.size());
  std::fill(buf, buf + nrows * pw, Acc(0));
  for (int64_t h = 0; h < t.pooled_h; ++h)
    for (int64_t j = t.y.begin[h]; j < t.y.begin[h + 1]; ++j) axpy(buf + t.slot[j] * pw, t.y.w[j], grad + h * pw, pw);
  x_pass<true>(
      nrows, t.x, pw, 0, [&](int64_t k) -> const Acc* { return buf + k * pw; },
      [&](int64_t k) { return gplane + t.rows[k] * width; });
}

template <typename T, typename Acc>
void unpool_plane_y_first(const RoiTaps<Acc>& t, const T* grad, Acc* gplane, int64_t width, Acc* buf) {
  const int64_t pw = t.pooled_w, ncols = t.columns();
  std::fill(buf, buf + t.pooled_h * ncols, Acc(0));
  x_pass<true>(
      t.pooled_h, t.x, pw, t.x.lo, [&](int64_t h) { return grad + h * pw; },
      [&](int64_t h) { return buf + h * ncols; });
  for (int64_t h = 0; h < t.pooled_h; ++h)
    for (int64_t j = t.y.begin[h]; j < t.y.begin[h + 1]; ++j)
      axpy(gplane + t.y.idx[j] * width + t.x.lo, t.y.w[j], buf + h * ncols, ncols);
}

// Scratch of at least n elements.
template <typename Acc>
Acc* scratch(std::vector<Acc>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Loops are channel-outer, RoI-inner: all RoIs of an image read one channel plane while it is in
// cache, instead of every RoI fetching short row runs from C planes far apart (a cache and TLB miss
// per row).

// Pools rois[0:num_rois] into out [num_rois, C, ph, pw]; the level of RoI r is roi_levels[r] (or
// fixed_level when roi_levels is null). Work items are (channel block, RoI chunk); every item writes
// its own outputs.
template <typename T>
void pool_rois(const std::vector<Level<T>>& levels, const int64_t* roi_levels, int64_t fixed_level, const T* rois,
               int64_t num_rois, int64_t channels, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
               bool aligned, T* out) {
  using Acc = at::opmath_type<T>;
  if (num_rois == 0 || channels == 0) return;
  const auto taps = all_roi_taps(levels, roi_levels, fixed_level, rois, num_rois, pooled_h, pooled_w,
                                 sampling_ratio, aligned);
  const int64_t items = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t cblocks = std::min(channels, items), rchunks = std::min(num_rois, (items + cblocks - 1) / cblocks);
  const int64_t cblock = (channels + cblocks - 1) / cblocks, rchunk = (num_rois + rchunks - 1) / rchunks;
  const int64_t plane = pooled_h * pooled_w;
  at::parallel_for(0, cblocks * rchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = (i / rchunks) * cblock, c1 = std::min(channels, c0 + cblock);
      const int64_t r0 = (i % rchunks) * rchunk, r1 = std::min(num_rois, r0 + rchunk);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto& t = taps[r];
          T* o = out + (r * channels + c) * plane;
          if (t.empty()) {
            std::fill(o, o + plane, T(0));
            continue;
          }
          const auto& lv = levels[roi_levels ? roi_levels[r] : fixed_level];
          const int64_t hw = lv.height * lv.width;
          const T* f = lv.data + (static_cast<int64_t>(rois[r * 5]) * channels + c) * hw;
          const bool x_first = t.x_first();
          pool_plane(t, x_first, f, lv.width, scratch(buf, t.scratch_size(x_first)), o);
        }
      }
    }
  });
}

// dst[p * ld + c] = src[c * plane + p] for c < n, p < plane: n pooled planes (in cache) into n channels of
// channels-last output rows of stride ld (in memory). Pixel-major, so each output pixel is written as one
// contiguous run; roi_align_channels_last.h's to_channels_last reads planes sequentially instead (its source
// is in memory), and used here it made the op slower (318–325 against 218–284 ms at the head's stages, 100 RoIs).
template <typename T>
inline void planes_to_channels_last(const T* __restrict src, int64_t n, int64_t plane, T* __restrict dst,
                                    int64_t ld) {
  for (int64_t p = 0; p < plane; ++p)
    for (int64_t c = 0; c < n; ++c) dst[p * ld + c] = src[c * plane + p];
}

// pool_rois with a channels-last output: rois[0:num_rois] of levels[level] into out [num_rois, ph, pw, C]
// (the memory of a channels-last [num_rois, C, ph, pw]). Same planar passes and values; each thread takes
// whole RoIs (a channel split would have threads writing the same cache lines), pools a block of channels
// into a scratch [block, ph, pw] of <= 64K elements (in L2) and transposes it into place
// (planes_to_channels_last). Copying NCHW crops to channels-last afterwards cost the mask head a pass over
// memory per stage.
template <typename T>
void pool_rois_nhwc(const std::vector<Level<T>>& levels, int64_t level, const T* rois, int64_t num_rois,
                    int64_t channels, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                    T* out) {
  using Acc = at::opmath_type<T>;
  if (num_rois == 0 || channels == 0) return;
  const auto taps = all_roi_taps(levels, nullptr, level, rois, num_rois, pooled_h, pooled_w, sampling_ratio,
                                 aligned);
  const int64_t plane = pooled_h * pooled_w;
  constexpr int64_t kScratch = 64 * 1024;
  int64_t block = std::max<int64_t>(1, std::min(channels, kScratch / plane));
  if (block >= 8 && block < channels) block = block / 8 * 8;
  const auto& lv = levels[level];
  const int64_t hw = lv.height * lv.width;
  at::parallel_for(0, num_rois, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Acc> buf;
    std::vector<T> planes(block * plane);
    for (int64_t r = r0; r < r1; ++r) {
      const auto& t = taps[r];
      T* o = out + r * plane * channels;
      if (t.empty()) {
        std::fill(o, o + plane * channels, T(0));
        continue;
      }
      const T* img = lv.data + static_cast<int64_t>(rois[r * 5]) * channels * hw;
      const bool x_first = t.x_first();
      Acc* b = scratch(buf, t.scratch_size(x_first));
      for (int64_t c0 = 0; c0 < channels; c0 += block) {
        const int64_t n = std::min(block, channels - c0);
        for (int64_t c = 0; c < n; ++c)
          pool_plane(t, x_first, img + (c0 + c) * hw, lv.width, b, planes.data() + c * plane);
        planes_to_channels_last(planes.data(), n, plane, o + c0, channels);
      }
    }
  });
}

// grad_levels[l] += the transpose of pool_rois for grad [num_rois, C, ph, pw]. Threads own channel
// ranges and walk all RoIs, so no two threads add into the same plane.
template <typename T, typename Acc>
void unpool_rois(const std::vector<Acc*>& grad_levels, const std::vector<Level<T>>& shapes,
                 const int64_t* roi_levels, int64_t fixed_level, const T* rois, int64_t num_rois, int64_t channels,
                 const T* grad, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  if (num_rois == 0 || channels == 0) return;
  const auto taps = all_roi_taps(shapes, roi_levels, fixed_level, rois, num_rois, pooled_h, pooled_w,
                                 sampling_ratio, aligned);
  const int64_t plane = pooled_h * pooled_w;
  at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
    std::vector<Acc> buf;
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = 0; r < num_rois; ++r) {
        const auto& t = taps[r];
        if (t.empty()) continue;
        const int64_t l = roi_levels ? roi_levels[r] : fixed_level;
        const int64_t hw = shapes[l].height * shapes[l].width;
        Acc* gplane = grad_levels[l] + (static_cast<int64_t>(rois[r * 5]) * channels + c) * hw;
        const T* g = grad + (r * channels + c) * plane;
        const bool x_first = t.x_first();
        Acc* b = scratch(buf, t.scratch_size(x_first));
        if (x_first) {
          unpool_plane_x_first(t, g, gplane, shapes[l].width, b);
        } else {
          unpool_plane_y_first(t, g, gplane, shapes[l].width, b);
        }
      }
    }
  });
}

// Level index of every RoI: given (checked) or by the FPN LevelMapper with canonical_scale at level 4.
template <typename T>
std::vector<int64_t> roi_levels_cpu(const at::Tensor& rois, const c10::optional<at::Tensor>& levels,
                                    at::ArrayRef<double> scales, double canonical_scale, const char* op) {
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
    out[r] = fpn_level<Acc>(b[1], b[2], b[3], b[4], k_min, k_min + L - 1, static_cast<Acc>(canonical_scale));
  }
  return out;
}

// Zeroed gradient accumulators [N, C_l, H_l, W_l] in the op-math type, one per level.
template <typename T, typename Acc = at::opmath_type<T>>
std::vector<at::Tensor> grad_accumulators(int64_t batch_size, at::IntArrayRef channels, at::IntArrayRef heights,
                                          at::IntArrayRef widths, const at::TensorOptions& options,
                                          std::vector<Acc*>& ptrs, std::vector<Level<T>>& shapes,
                                          at::ArrayRef<double> scales) {
  std::vector<at::Tensor> acc;
  for (size_t l = 0; l < scales.size(); ++l) {
    const int64_t c = channels.size() == 1 ? channels[0] : channels[l];
    acc.push_back(at::zeros({batch_size, c, heights[l], widths[l]}, options.dtype(c10::CppTypeToScalarType<Acc>::value)));
    ptrs.push_back(acc.back().data_ptr<Acc>());
    shapes.push_back({nullptr, heights[l], widths[l], c, scales[l]});
  }
  return acc;
}

// The accumulators in the features' dtype (no copy when that is the op-math type).
std::vector<at::Tensor> cast_grads(const std::vector<at::Tensor>& acc, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const auto& g : acc) out.push_back(g.to(dtype));
  return out;
}

at::Tensor roi_align_multilevel_cpu(at::TensorList features, const at::Tensor& rois,
                                    const c10::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                    double canonical_scale) {
  const char* op = "roi_align_multilevel";
  check_multilevel_args(features, rois, levels, spatial_scales, pooled_h, pooled_w, sampling_ratio, canonical_scale,
                        op);
  const int64_t C = features[0].size(1);
  const auto rois_c = rois.contiguous();
  const int64_t R = rois.size(0);
  auto out = at::empty({R, C, pooled_h, pooled_w}, features[0].options());  // every bin is written
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_multilevel_cpu", [&] {
    check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), R, features[0].size(0), op);
    const auto roi_levels = roi_levels_cpu<scalar_t>(rois_c, levels, spatial_scales, canonical_scale, op);
    std::vector<at::Tensor> nchw;
    std::vector<Level<scalar_t>> lv;
    for (size_t l = 0; l < features.size(); ++l) {
      nchw.push_back(features[l].contiguous());
      lv.push_back({nchw[l].data_ptr<scalar_t>(), nchw[l].size(2), nchw[l].size(3), C, spatial_scales[l]});
    }
    if (prefer_channels_last(C, pooled_h, pooled_w)) {
      pool_rois_channels_last<scalar_t>(lv, roi_levels.data(), rois_c.data_ptr<scalar_t>(), R, C, pooled_h,
                                        pooled_w, sampling_ratio, aligned, out.data_ptr<scalar_t>());
    } else {
      pool_rois<scalar_t>(lv, roi_levels.data(), 0, rois_c.data_ptr<scalar_t>(), R, C, pooled_h, pooled_w,
                          sampling_ratio, aligned, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::vector<at::Tensor> roi_align_multilevel_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const c10::optional<at::Tensor>& levels,
    at::ArrayRef<double> spatial_scales, int64_t batch_size, int64_t channels, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sampling_ratio, bool aligned, double canonical_scale) {
  const char* op = "roi_align_multilevel_backward";
  check_canonical_scale(canonical_scale, op);
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
    std::vector<Acc*> gp;
    std::vector<Level<scalar_t>> shapes;
    const auto acc = grad_accumulators<scalar_t>(batch_size, {channels}, heights, widths, grad.options(), gp, shapes,
                                                 spatial_scales);
    if (R > 0) {
      check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), R, batch_size, op);
      const auto roi_levels = roi_levels_cpu<scalar_t>(rois_c, levels, spatial_scales, canonical_scale, op);
      unpool_rois<scalar_t, Acc>(gp, shapes, roi_levels.data(), 0, rois_c.data_ptr<scalar_t>(), R, channels,
                                 grad_c.data_ptr<scalar_t>(), ph, pw, sampling_ratio, aligned);
    }
    result = cast_grads(acc, grad.scalar_type());
  });
  return result;
}

std::vector<at::Tensor> roi_align_stages_cpu(at::TensorList features, const at::Tensor& rois,
                                             at::IntArrayRef stage_levels, at::IntArrayRef stage_sizes,
                                             at::IntArrayRef stage_counts, at::ArrayRef<double> spatial_scales,
                                             int64_t sampling_ratio, bool aligned, bool channels_last) {
  const char* op = "roi_align_stages";
  check_rois_and_levels(features, rois, spatial_scales, op);
  check_stages(features, rois, stage_levels, stage_sizes, stage_counts, op);
  TORCH_CHECK_VALUE(sampling_ratio >= 0, op, ": sampling_ratio must be >= 0, got ", sampling_ratio);
  const auto rois_c = rois.contiguous();
  std::vector<at::Tensor> outs;
  for (size_t j = 0; j < stage_levels.size(); ++j) {
    const auto& f = features[stage_levels[j]];
    outs.push_back(at::empty({stage_counts[j], f.size(1), stage_sizes[j], stage_sizes[j]}, f.options(),
                             channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_cpu", [&] {
    int64_t max_count = 0;
    for (auto c : stage_counts) max_count = std::max(max_count, c);
    check_roi_values_cpu<scalar_t>(rois_c.data_ptr<scalar_t>(), max_count, features[0].size(0), op);
    for (size_t j = 0; j < stage_levels.size(); ++j) {
      if (stage_counts[j] == 0) continue;
      const int64_t l = stage_levels[j];
      const auto f = features[l].contiguous();
      const int64_t C = f.size(1);
      std::vector<Level<scalar_t>> lv{{f.data_ptr<scalar_t>(), f.size(2), f.size(3), C, spatial_scales[l]}};
      if (channels_last) {
        pool_rois_nhwc<scalar_t>(lv, 0, rois_c.data_ptr<scalar_t>(), stage_counts[j], C, stage_sizes[j],
                                 stage_sizes[j], sampling_ratio, aligned, outs[j].data_ptr<scalar_t>());
      } else {
        pool_rois<scalar_t>(lv, nullptr, 0, rois_c.data_ptr<scalar_t>(), stage_counts[j], C, stage_sizes[j],
                            stage_sizes[j], sampling_ratio, aligned, outs[j].data_ptr<scalar_t>());
      }
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
  check_stages_backward(grads, rois, stage_levels, L, op);
  TORCH_CHECK_VALUE(static_cast<int64_t>(channels.size()) == L && static_cast<int64_t>(heights.size()) == L &&
                        static_cast<int64_t>(widths.size()) == L,
                    op, ": channels/heights/widths must have one entry per level");
  const auto rois_c = rois.contiguous();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    std::vector<Acc*> gp;
    std::vector<Level<scalar_t>> shapes;
    const auto acc = grad_accumulators<scalar_t>(batch_size, channels, heights, widths, rois.options(), gp, shapes,
                                                 spatial_scales);
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
    result = cast_grads(acc, rois.scalar_type());
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
