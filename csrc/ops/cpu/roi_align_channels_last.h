#pragma once
// Channels-last forward of the CPU RoIAlign, for many RoIs pooled to small planes (the box head's
// 7x7, the mask head's 14x14) on wide levels.
//
// Why a second path: the planar kernel (roi_align_kernel.cpp) pools one [H, W] channel plane at a
// time, and for a 14x14 output its x pass is a scalar gather over a handful of taps per bin, done
// again for each of the 256 channels. Here each thread takes a block of channels, copies the block
// of one (level, image) to a reused [H, W, block] buffer, and pools every RoI of that level and image
// from it: each tap of a bin is then one contiguous run of channels, so a bin's (<= 16, after
// merging) taps are applied with the sums in registers (8 floats per AVX2 register), and each tap's
// position and weight serve the whole block. The buffer (a few MB) stays in cache while all the RoIs
// read it, so the pyramid is read from memory once per call, as in the planar kernel, and no
// channels-last copy of the whole pyramid is ever allocated.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cpu/cpu_isa.h"
#include "ops/cpu/roi_align_taps.h"

namespace dynamask {
namespace roi_align {

// out[c] = sum_t w[t] * img[pos[t] + c] for c in [0, K), the K sums held in registers across taps.
template <int K, typename T, typename Acc>
inline void taps_block(Acc* __restrict out, const T* __restrict img, const int64_t* __restrict pos,
                       const Acc* __restrict w, int64_t ntaps) {
  Acc a[K] = {};
  for (int64_t t = 0; t < ntaps; ++t) {
    const T* __restrict s = img + pos[t];
    const Acc wt = w[t];
    for (int j = 0; j < K; ++j) a[j] += wt * static_cast<Acc>(s[j]);
  }
  for (int j = 0; j < K; ++j) out[j] = a[j];
}

#if defined(__GNUC__) || defined(__clang__)
// float: the compiler turns taps_block's [K] accumulator into a stack array and runs the channel
// loop scalar, so the sums are spelled as NV registers of 8 floats (GCC vector extensions: one ymm
// each under AVX2, two xmm each otherwise).
typedef float Float8 __attribute__((vector_size(32)));

template <int NV>
inline void taps_block_float(float* __restrict out, const float* __restrict img, const int64_t* __restrict pos,
                             const float* __restrict w, int64_t ntaps) {
  Float8 a[NV];
  for (int v = 0; v < NV; ++v) a[v] = Float8{};
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* s = img + pos[t];
    const float wt = w[t];
    for (int v = 0; v < NV; ++v) {
      Float8 x;
      __builtin_memcpy(&x, s + 8 * v, sizeof(x));  // unaligned load
      a[v] += wt * x;
    }
  }
  __builtin_memcpy(out, a, sizeof(a));
}

template <>
inline void taps_block<32, float, float>(float* __restrict out, const float* __restrict img,
                                         const int64_t* __restrict pos, const float* __restrict w, int64_t ntaps) {
  taps_block_float<4>(out, img, pos, w, ntaps);
}

template <>
inline void taps_block<8, float, float>(float* __restrict out, const float* __restrict img,
                                        const int64_t* __restrict pos, const float* __restrict w, int64_t ntaps) {
  taps_block_float<1>(out, img, pos, w, ntaps);
}
#endif

// out[c] = sum_t w[t] * img[pos[t] + c] for c < n.
template <typename T, typename Acc>
inline void taps_channels(Acc* out, const T* img, const int64_t* pos, const Acc* w, int64_t ntaps, int64_t n) {
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) taps_block<32>(out + c, img + c, pos, w, ntaps);
  for (; c + 8 <= n; c += 8) taps_block<8>(out + c, img + c, pos, w, ntaps);
  for (; c < n; ++c) taps_block<1>(out + c, img + c, pos, w, ntaps);
}

// buf [hw, n] = the channels [0, n) of src [C, hw] (one level of one image), in tiles of 512 pixels:
// each plane is read in 2 KB sequential runs (64-pixel tiles left the loads latency-bound).
template <typename T>
inline void to_channels_last(const T* src, int64_t hw, int64_t n, T* buf) {
  constexpr int64_t kTile = 512;
  for (int64_t p0 = 0; p0 < hw; p0 += kTile) {
    const int64_t p1 = std::min(hw, p0 + kTile);
    for (int64_t c = 0; c < n; ++c) {
      const T* s = src + c * hw;
      for (int64_t p = p0; p < p1; ++p) buf[p * n + c] = s[p];
    }
  }
}

// Scratch of one thread: the channels-last block, the taps of one bin and one output row [pw, n].
template <typename T, typename Acc>
struct ChannelsLastScratch {
  std::vector<T> block;
  std::vector<int64_t> pos;
  std::vector<Acc> w;
  std::vector<Acc> row;
};

// One RoI, channels [0, n): out [n, ph, pw] (rows plane apart) from img [H, W, n].
template <typename T, typename Acc>
void pool_roi_channels_last(const RoiTaps<Acc>& t, const T* img, int64_t width, int64_t n, T* out,
                            ChannelsLastScratch<T, Acc>& s) {
  const int64_t ph = t.pooled_h, pw = t.pooled_w, plane = ph * pw;
  const auto &y = t.y, &x = t.x;
  s.row.resize(pw * n);
  Acc* row = s.row.data();
  for (int64_t h = 0; h < ph; ++h) {
    for (int64_t p = 0; p < pw; ++p) {
      // The bin's 2-D taps: the product of its (merged) y and x taps.
      const int64_t k_end = (y.begin[h + 1] - y.begin[h]) * (x.begin[p + 1] - x.begin[p]);
      if (static_cast<int64_t>(s.pos.size()) < k_end) s.pos.resize(k_end), s.w.resize(k_end);
      int64_t k = 0;
      for (int64_t jy = y.begin[h]; jy < y.begin[h + 1]; ++jy)
        for (int64_t jx = x.begin[p]; jx < x.begin[p + 1]; ++jx, ++k) {
          s.pos[k] = (y.idx[jy] * width + x.idx[jx]) * n;
          s.w[k] = y.w[jy] * x.w[jx];
        }
      taps_channels(row + p * n, img, s.pos.data(), s.w.data(), k_end, n);
    }
    // [pw, n] -> out[c, h, :], contiguous along pw.
    for (int64_t c = 0; c < n; ++c) {
      T* dst = out + c * plane + h * pw;
      for (int64_t p = 0; p < pw; ++p) dst[p] = static_cast<T>(row[p * n + c]);
    }
  }
}

// One (channel block, level, image) group: copy the block to channels-last, then pool its RoIs
// order[first:last] into out [R, C, ph, pw] at channel c0.
template <typename T, typename Acc>
void pool_group_channels_last(const std::vector<RoiTaps<Acc>>& taps, const int64_t* order, int64_t first,
                              int64_t last, const Level<T>& lv, int64_t image, int64_t c0, int64_t n,
                              int64_t C, T* out, ChannelsLastScratch<T, Acc>& s) {
  const int64_t hw = lv.height * lv.width;
  s.block.resize(hw * n);
  to_channels_last(lv.data + (image * C + c0) * hw, hw, n, s.block.data());
  const int64_t plane = taps[order[first]].pooled_h * taps[order[first]].pooled_w;
  for (int64_t i = first; i < last; ++i) {
    const int64_t r = order[i];
    T* o = out + (r * C + c0) * plane;
    if (taps[r].empty()) {
      for (int64_t c = 0; c < n; ++c) std::fill(o + c * plane, o + (c + 1) * plane, T(0));
      continue;
    }
    pool_roi_channels_last(taps[r], s.block.data(), lv.width, n, o, s);
  }
}

template <typename T, typename Acc>
DYNAMASK_AVX2 void pool_group_channels_last_avx2(const std::vector<RoiTaps<Acc>>& taps, const int64_t* order,
                                                 int64_t first, int64_t last, const Level<T>& lv, int64_t image,
                                                 int64_t c0, int64_t n, int64_t C, T* out,
                                                 ChannelsLastScratch<T, Acc>& s) {
  pool_group_channels_last(taps, order, first, last, lv, image, c0, n, C, out, s);
}

template <typename T, typename Acc>
DYNAMASK_AVX512 void pool_group_channels_last_avx512(const std::vector<RoiTaps<Acc>>& taps, const int64_t* order,
                                                     int64_t first, int64_t last, const Level<T>& lv, int64_t image,
                                                     int64_t c0, int64_t n, int64_t C, T* out,
                                                     ChannelsLastScratch<T, Acc>& s) {
  pool_group_channels_last(taps, order, first, last, lv, image, c0, n, C, out, s);
}

// Whether the channels-last path is cheaper: the planar kernel wins on narrow levels (the mask
// targets' single channel) and on large output planes, whose separable passes do less work.
inline bool prefer_channels_last(int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  return channels >= 16 && pooled_h * pooled_w <= 400;
}

// Pools rois[0:num_rois] into out [num_rois, C, ph, pw] from NCHW levels; the level of RoI r is
// roi_levels[r]. Work items are channel blocks (multiples of 8, at most 32, two per thread when C
// allows); a thread walks the (level, image) groups of its block.
template <typename T>
void pool_rois_channels_last(const std::vector<Level<T>>& levels, const int64_t* roi_levels, const T* rois,
                             int64_t num_rois, int64_t C, int64_t pooled_h, int64_t pooled_w,
                             int64_t sampling_ratio, bool aligned, T* out) {
  using Acc = at::opmath_type<T>;
  const auto taps = all_roi_taps(levels, roi_levels, 0, rois, num_rois, pooled_h, pooled_w, sampling_ratio, aligned);
  // RoIs grouped by (level, image).
  std::vector<int64_t> order(num_rois), key(num_rois);
  int64_t images = 0;
  for (int64_t r = 0; r < num_rois; ++r) images = std::max<int64_t>(images, static_cast<int64_t>(rois[r * 5]) + 1);
  for (int64_t r = 0; r < num_rois; ++r) {
    order[r] = r;
    key[r] = roi_levels[r] * images + static_cast<int64_t>(rois[r * 5]);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  std::vector<int64_t> groups{0};  // group g is order[groups[g] : groups[g + 1]]
  for (int64_t i = 1; i <= num_rois; ++i)
    if (i == num_rois || key[order[i]] != key[order[i - 1]]) groups.push_back(i);

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = (C + 2 * threads - 1) / (2 * threads);
  block = std::min<int64_t>(32, (block + 7) / 8 * 8);
  const int64_t nblocks = (C + block - 1) / block;
  const Isa isa = cpu_isa();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    ChannelsLastScratch<T, Acc> scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * block, n = std::min(C, c0 + block) - c0;
      for (size_t g = 0; g + 1 < groups.size(); ++g) {
        const int64_t first = groups[g], last = groups[g + 1], r = order[first];
        const auto& lv = levels[roi_levels[r]];
        const int64_t image = static_cast<int64_t>(rois[r * 5]);
        if (isa == Isa::kAvx512) {
          pool_group_channels_last_avx512(taps, order.data(), first, last, lv, image, c0, n, C, out, scratch);
        } else if (isa == Isa::kAvx2) {
          pool_group_channels_last_avx2(taps, order.data(), first, last, lv, image, c0, n, C, out, scratch);
        } else {
          pool_group_channels_last(taps, order.data(), first, last, lv, image, c0, n, C, out, scratch);
        }
      }
    }
  });
}

}  // namespace roi_align
}  // namespace dynamask
