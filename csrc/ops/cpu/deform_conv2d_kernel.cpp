// CPU kernels of the fused deformable convolution.
//
// Never a columns buffer larger than a tile: images are read through an NHWC view (copied a bounded
// chunk at a time only when the input is not channels-last, so each bilinear corner is a contiguous
// run of channels). Forward: each work item samples one tile of one image's output positions into a
// channels-last columns tile, multiplies it by the weight (sequential GEMM) and applies bias, residual
// and ReLU while the tile is in cache (forward_impl). The corners and weights of a sample are computed
// once per (position, tap, deform group) and reused for all the group's channels.
//
// Backward recomputes a tile's columns, accumulates grad_weight per thread, multiplies grad by the
// weight into a second tile buffer and scatters it: into grad_input (each work item owns one image's
// accumulator, or a private copy of it when there are fewer images than threads, so no races), and
// into grad_offset / grad_mask through the bilinear derivatives. Deterministic for a thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ops/cpu/cpu_isa.h"
#include "ops/deform_conv2d_checks.h"
#include "ops/deform_conv2d_common.h"

namespace dynamask {
namespace deform_conv {
namespace {

// Tile of output positions: about 64K column elements (256 KB in float), at least 16 positions.
inline int64_t tile_positions(const Geometry& g) {
  const int64_t row = std::max<int64_t>(1, g.channels * g.taps());
  return std::min(std::max<int64_t>(16, (int64_t(1) << 16) / row), g.out_plane());
}

// Images whose channels-last copy is made at once: at most 8M elements (and at least one image).
inline int64_t images_per_chunk(const Geometry& g) {
  const int64_t image = std::max<int64_t>(1, g.channels * g.height * g.width);
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, (int64_t(1) << 23) / image));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace
}  // namespace deform_conv
}  // namespace dynamask

// torch's x86 wheels link MKL, whose GEMM called from inside an at::parallel_for worker opens a
// nested team of threads: on 2 busy cores that ran ~40x slower than one thread. Each worker asks
// MKL for a sequential GEMM through MKL's thread-local setting (the C entry point behind
// mkl_service.h's mkl_set_num_threads_local). The symbol is weak, so builds of torch on another BLAS
// (OpenBLAS runs sequentially inside a parallel region by itself) link and run without it.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
// The Fortran BLAS single-precision GEMM (LP64, as torch itself declares and calls it); weak, so a torch
// without it links and takes the at::mm_out path (tile_gemm).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace dynamask {
namespace deform_conv {
namespace {

class SequentialBlasGuard {
 public:
  SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlasGuard(const SequentialBlasGuard&) = delete;
  SequentialBlasGuard& operator=(const SequentialBlasGuard&) = delete;

 private:
  int previous_ = 0;  // 0 restores the global setting
};

// The channel runs [begin, end) of each deform group that stay inside one weight group, computed once
// per tile so the per-tap loops do no division: run r of deform group d is runs[first[d] + r].
struct ChannelRuns {
  struct Run {
    int64_t grp, begin, end;
  };
  std::vector<Run> runs;
  std::vector<int64_t> first;

  explicit ChannelRuns(const Geometry& g) {
    const int64_t Cd = g.in_per_deform_group(), Cg = g.in_per_group();
    for (int64_t d = 0; d < g.deform_groups; ++d) {
      first.push_back(static_cast<int64_t>(runs.size()));
      const int64_t c_end = (d + 1) * Cd;
      for (int64_t c = d * Cd; c < c_end;) {
        const int64_t grp = c / Cg, run_end = std::min(c_end, (grp + 1) * Cg);
        runs.push_back({grp, c, run_end});
        c = run_end;
      }
    }
    first.push_back(static_cast<int64_t>(runs.size()));
  }
};

// Calls f(grp, c, end) for each channel run of deform group d.
template <typename F>
inline void for_each_channel_run(const ChannelRuns& cr, int64_t d, F&& f) {
  for (int64_t r = cr.first[d]; r < cr.first[d + 1]; ++r) f(cr.runs[r].grp, cr.runs[r].begin, cr.runs[r].end);
}

// col[pl, grp, k, c - grp*Cg] = mask * bilinear(input[c], sample(p0 + pl, k)) for one image.
// img: channels-last image [H, W, C]; off_b / mask_b: offset[b] / mask[b] (mask_b may be null).
template <typename T>
void sample_tile(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np, T* col) {
  const int64_t C = g.channels, K = g.taps(), Cg = g.in_per_group(), plane = g.out_plane();
  const ChannelRuns runs(g);
  int64_t oy = p0 / g.out_w, ox = p0 - oy * g.out_w;
  // (oy, ox) advance with pl, row by row (no division per position).
  for (int64_t pl = 0; pl < np; ++pl, ox = (ox + 1 == g.out_w) ? (++oy, 0) : ox + 1) {
    const int64_t p = p0 + pl;
    T* colrow = col + pl * C * K;
    for (int64_t d = 0; d < g.deform_groups; ++d) {
      const T* off_d = off_b + d * 2 * K * g.off_c;
      const T* mask_d = mask_b ? mask_b + d * K * plane : nullptr;
      for (int64_t i = 0, k = 0; i < g.kernel_h; ++i)
      for (int64_t j = 0; j < g.kernel_w; ++j, ++k) {
        T y, x;
        tap_position_ij(g, off_d, k, i, j, p, oy, ox, y, x);
        Taps<T> t;
        deform_taps(y, x, g.height, g.width, t);
        const T m = mask_d ? mask_d[k * plane + p] : T(1);
        const T w0 = t.w[0] * m, w1 = t.w[1] * m, w2 = t.w[2] * m, w3 = t.w[3] * m;
        const T* __restrict__ s0 = img + t.pos[0] * C;
        const T* __restrict__ s1 = img + t.pos[1] * C;
        const T* __restrict__ s2 = img + t.pos[2] * C;
        const T* __restrict__ s3 = img + t.pos[3] * C;
        const bool zero = w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0);
        for_each_channel_run(runs, d, [&](int64_t grp, int64_t c, int64_t end) {
          T* __restrict__ dst = colrow + (grp * K + k) * Cg - grp * Cg;
          if (zero) {
            std::fill(dst + c, dst + end, T(0));
          } else {
            for (int64_t cc = c; cc < end; ++cc) dst[cc] = w0 * s0[cc] + w1 * s1[cc] + w2 * s2[cc] + w3 * s3[cc];
          }
        });
      }
    }
  }
}

// The transpose of sample_tile for grad columns gcol (same layout): adds into gin (channels-last
// [H, W, C] accumulator of the image, may be null) and writes grad_offset / grad_mask of the tile.
template <typename T>
void scatter_tile(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                  const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  const int64_t C = g.channels, K = g.taps(), Cg = g.in_per_group(), plane = g.out_plane();
  constexpr int L = 8;  // lanes of the partial sums, so the channel dot products vectorise
  const ChannelRuns runs(g);
  int64_t oy = p0 / g.out_w, ox = p0 - oy * g.out_w;
  // (oy, ox) advance with pl, row by row (no division per position).
  for (int64_t pl = 0; pl < np; ++pl, ox = (ox + 1 == g.out_w) ? (++oy, 0) : ox + 1) {
    const int64_t p = p0 + pl;
    const T* gcolrow = gcol + pl * C * K;
    for (int64_t d = 0; d < g.deform_groups; ++d) {
      const T* off_d = off_b + d * 2 * K * g.off_c;
      const T* mask_d = mask_b ? mask_b + d * K * plane : nullptr;
      for (int64_t i = 0, k = 0; i < g.kernel_h; ++i)
      for (int64_t j = 0; j < g.kernel_w; ++j, ++k) {
        T y, x;
        tap_position_ij(g, off_d, k, i, j, p, oy, ox, y, x);
        Taps<T> t;
        const bool any = deform_taps(y, x, g.height, g.width, t);
        const T m = mask_d ? mask_d[k * plane + p] : T(1);
        if (!any) {
          if (goff_b) {
            goff_b[(d * 2 * K + 2 * k) * plane + p] = T(0);
            goff_b[(d * 2 * K + 2 * k + 1) * plane + p] = T(0);
          }
          if (gmask_b) gmask_b[(d * K + k) * plane + p] = T(0);
          continue;
        }
        const T w0 = t.w[0] * m, w1 = t.w[1] * m, w2 = t.w[2] * m, w3 = t.w[3] * m;
        const bool scatter = gin != nullptr && !(w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0));
        const T* __restrict__ v0 = img + t.pos[0] * C;
        const T* __restrict__ v1 = img + t.pos[1] * C;
        const T* __restrict__ v2 = img + t.pos[2] * C;
        const T* __restrict__ v3 = img + t.pos[3] * C;
        T a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
        for_each_channel_run(runs, d, [&](int64_t grp, int64_t c, int64_t end) {
          const T* __restrict__ gc = gcolrow + (grp * K + k) * Cg - grp * Cg;
          if (goff_b) {
            int64_t cc = c;
            for (; cc + L <= end; cc += L) {
              for (int l = 0; l < L; ++l) {
                const T gv = gc[cc + l];
                a0[l] += gv * v0[cc + l];
                a1[l] += gv * v1[cc + l];
                a2[l] += gv * v2[cc + l];
                a3[l] += gv * v3[cc + l];
              }
            }
            for (; cc < end; ++cc) {
              const T gv = gc[cc];
              a0[0] += gv * v0[cc];
              a1[0] += gv * v1[cc];
              a2[0] += gv * v2[cc];
              a3[0] += gv * v3[cc];
            }
          }
          if (scatter) {
            // Corners that coincide (clamped at the border) alias; they carry weight 0 then, but the
            // four updates must still be sequential, so no __restrict__ here.
            T* d0 = gin + t.pos[0] * C;
            T* d1 = gin + t.pos[1] * C;
            T* d2 = gin + t.pos[2] * C;
            T* d3 = gin + t.pos[3] * C;
            for (int64_t cc = c; cc < end; ++cc) {
              const T gv = gc[cc];
              d0[cc] += w0 * gv;
              d1[cc] += w1 * gv;
              d2[cc] += w2 * gv;
              d3[cc] += w3 * gv;
            }
          }
        });
        if (goff_b) {
          T s[4] = {T(0), T(0), T(0), T(0)};
          for (int l = 0; l < L; ++l) {
            s[0] += a0[l];
            s[1] += a1[l];
            s[2] += a2[l];
            s[3] += a3[l];
          }
          goff_b[(d * 2 * K + 2 * k) * plane + p] = m * grad_y(t, s);
          goff_b[(d * 2 * K + 2 * k + 1) * plane + p] = m * grad_x(t, s);
          if (gmask_b) gmask_b[(d * K + k) * plane + p] = sampled_value(t, s);
        }
      }
    }
  }
}

// The same two loops for the layers the FAM uses (one weight group, one deform group) with the channel
// count known at compile time: the channel loops then unroll and vectorise, the partial sums stay in
// registers, and no channel runs are looked up. With 8-32 channels the generic loops spent most of a
// tap's time on that bookkeeping (see benchmarks/results/deform_conv_cpu.md, "Design measurements").
// dst[c] = w0 s0[c] + w1 s1[c] + w2 s2[c] + w3 s3[c]. The restrict-qualified parameters (kept through
// inlining, unlike restrict locals) are what lets the compiler vectorise the channel loop.
template <typename T, int CC>
inline void bilinear_row(T* __restrict__ dst, const T* __restrict__ s0, const T* __restrict__ s1,
                         const T* __restrict__ s2, const T* __restrict__ s3, T w0, T w1, T w2, T w3) {
  for (int c = 0; c < CC; ++c) dst[c] = w0 * s0[c] + w1 * s1[c] + w2 * s2[c] + w3 * s3[c];
}

// s[i] = sum_c gc[c] * vi[c] for the four corners, in 8 lanes so that the sums vectorise.
template <typename T, int CC>
inline void corner_dots(const T* __restrict__ gc, const T* __restrict__ v0, const T* __restrict__ v1,
                        const T* __restrict__ v2, const T* __restrict__ v3, T s[4]) {
  constexpr int L = CC < 8 ? CC : 8;
  T a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
  for (int c0 = 0; c0 < CC; c0 += L) {
    for (int l = 0; l < L; ++l) {
      const T gv = gc[c0 + l];
      a0[l] += gv * v0[c0 + l];
      a1[l] += gv * v1[c0 + l];
      a2[l] += gv * v2[c0 + l];
      a3[l] += gv * v3[c0 + l];
    }
  }
  s[0] = s[1] = s[2] = s[3] = T(0);
  for (int l = 0; l < L; ++l) {
    s[0] += a0[l];
    s[1] += a1[l];
    s[2] += a2[l];
    s[3] += a3[l];
  }
}

template <typename T, int CC>
void sample_tile_fixed_per_tap(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                       T* col) {
  const int64_t K = g.taps(), plane = g.out_plane();
  int64_t oy = p0 / g.out_w, ox = p0 - oy * g.out_w;
  for (int64_t pl = 0; pl < np; ++pl, ox = (ox + 1 == g.out_w) ? (++oy, 0) : ox + 1) {
    const int64_t p = p0 + pl;
    T* colrow = col + pl * CC * K;
    for (int64_t i = 0, k = 0; i < g.kernel_h; ++i)
    for (int64_t j = 0; j < g.kernel_w; ++j, ++k) {
      T y, x;
      tap_position_ij(g, off_b, k, i, j, p, oy, ox, y, x);
      Taps<T> t;
      deform_taps(y, x, g.height, g.width, t);
      const T m = mask_b ? mask_b[k * plane + p] : T(1);
      const T w0 = t.w[0] * m, w1 = t.w[1] * m, w2 = t.w[2] * m, w3 = t.w[3] * m;
      T* __restrict__ dst = colrow + k * CC;
      if (w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0)) {
        for (int c = 0; c < CC; ++c) dst[c] = T(0);
        continue;
      }
      bilinear_row<T, CC>(dst, img + t.pos[0] * CC, img + t.pos[1] * CC, img + t.pos[2] * CC, img + t.pos[3] * CC,
                          w0, w1, w2, w3);
    }
  }
}

// The sampler's bookkeeping, planned for a block of positions at once: where a tap's four corners are and
// their weights (deform_taps, and the mask) for each (tap, position) of the block, in loops over positions
// that the compiler vectorises (16 lanes under AVX-512), then the channel loops read the plan. Computed
// per tap and position, that bookkeeping took about as long as the channel arithmetic it feeds.
// The arithmetic is deform_taps' (the same comparisons, floor and products in the same order), so the
// columns are bit-identical to sample_tile_fixed_per_tap's; a weight is nonzero only for a corner on the
// map of a sample strictly inside (-1, H) x (-1, W), and every other corner reads the sample's nearest corner
// on the map (clamped) with weight 0.
constexpr int64_t kPlanBlock = 64;  // positions per plan: 9 taps x 64 positions x 8 numbers stays in L1
constexpr int64_t kPlanTaps = 9;    // kernels up to 3x3 are planned; larger ones sample per tap

template <typename T>
struct PlanBlock {
  int32_t q[4][kPlanTaps][kPlanBlock];
  T w[4][kPlanTaps][kPlanBlock];
};

// Whether the plan's 32-bit positions and coordinates hold this geometry.
inline bool plannable(const Geometry& g) {
  const int64_t lim = int64_t(1) << 30;
  return g.taps() <= kPlanTaps && g.height * g.width < lim && g.out_h * g.stride_h + g.pad_h + g.kernel_h * g.dil_h < lim &&
         g.out_w * g.stride_w + g.pad_w + g.kernel_w * g.dil_w < lim;
}

// One tap over n positions: base coordinates (by, bx: the tap's grid position, as in sample_coord), the
// offsets dy, dx and the mask m (all contiguous, length n) -> corner positions q and weights w.
// Written so that GCC vectorises it (built with -fno-trapping-math, see setup.py): non-short-circuit
// conditions, selects, and floor as truncation corrected by one below zero (the same value as floor for
// every sample in range, which is the only one whose floor is used).
template <typename T>
inline void plan_row(int64_t n, const int32_t* __restrict__ by, const int32_t* __restrict__ bx,
                     const T* __restrict__ dy, const T* __restrict__ dx, const T* __restrict__ m, int32_t H, int32_t W,
                     int32_t* __restrict__ q0, int32_t* __restrict__ q1, int32_t* __restrict__ q2,
                     int32_t* __restrict__ q3, T* __restrict__ w0, T* __restrict__ w1, T* __restrict__ w2,
                     T* __restrict__ w3) {
  const T fh = static_cast<T>(H), fw = static_cast<T>(W);
  for (int64_t b = 0; b < n; ++b) {
    const T y = static_cast<T>(by[b]) + dy[b], x = static_cast<T>(bx[b]) + dx[b];
    const bool in = (y > T(-1)) & (y < fh) & (x > T(-1)) & (x < fw);
    const T yc = in ? y : T(0), xc = in ? x : T(0);  // no float-to-int conversion out of range
    const int32_t ty = static_cast<int32_t>(yc), tx = static_cast<int32_t>(xc);
    const int32_t yl = ty - (yc < static_cast<T>(ty) ? 1 : 0), xl = tx - (xc < static_cast<T>(tx) ? 1 : 0);
    const T ly = yc - static_cast<T>(yl), lx = xc - static_cast<T>(xl), hy = T(1) - ly, hx = T(1) - lx;
    const bool vyl = in & (yl >= 0), vyh = in & (yl + 1 <= H - 1), vxl = xl >= 0, vxh = xl + 1 <= W - 1;
    const bool v0 = vyl & vxl, v1 = vyl & vxh, v2 = vyh & vxl, v3 = vyh & vxh;
    const T mb = m[b];
    // corners off the map read the sample's nearest corner on it (deform_taps' rule), never position 0
    const int32_t ylc = yl < 0 ? 0 : yl, yhc = yl + 1 > H - 1 ? H - 1 : yl + 1;
    const int32_t xlc = xl < 0 ? 0 : xl, xhc = xl + 1 > W - 1 ? W - 1 : xl + 1;
    q0[b] = ylc * W + xlc;
    q1[b] = ylc * W + xhc;
    q2[b] = yhc * W + xlc;
    q3[b] = yhc * W + xhc;
    w0[b] = v0 ? (hy * hx) * mb : T(0);
    w1[b] = v1 ? (hy * lx) * mb : T(0);
    w2[b] = v2 ? (ly * hx) * mb : T(0);
    w3[b] = v3 ? (ly * lx) * mb : T(0);
  }
}

template <typename T, int CC>
void sample_tile_fixed(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                       T* col) {
  if (!plannable(g)) return sample_tile_fixed_per_tap<T, CC>(g, img, off_b, mask_b, p0, np, col);
  const int64_t K = g.taps(), plane = g.out_plane();
  const int32_t H = static_cast<int32_t>(g.height), W = static_cast<int32_t>(g.width);
  PlanBlock<T> plan;
  int32_t oy[kPlanBlock], ox[kPlanBlock], by[kPlanBlock], bx[kPlanBlock];
  T dy[kPlanBlock], dx[kPlanBlock], m[kPlanBlock];
  for (int64_t b0 = 0; b0 < np; b0 += kPlanBlock) {
    const int64_t n = std::min(kPlanBlock, np - b0), p = p0 + b0;
    int32_t y0 = static_cast<int32_t>(p / g.out_w), x0 = static_cast<int32_t>(p - y0 * g.out_w);
    for (int64_t b = 0; b < n; ++b, x0 = (x0 + 1 == g.out_w) ? (++y0, 0) : x0 + 1) {
      oy[b] = y0;
      ox[b] = x0;
    }
    if (!mask_b) std::fill(m, m + n, T(1));
    for (int64_t i = 0, k = 0; i < g.kernel_h; ++i)
    for (int64_t j = 0; j < g.kernel_w; ++j, ++k) {
      const int32_t ay = static_cast<int32_t>(i * g.dil_h - g.pad_h), ax = static_cast<int32_t>(j * g.dil_w - g.pad_w);
      const int32_t sh = static_cast<int32_t>(g.stride_h), sw = static_cast<int32_t>(g.stride_w);
      const T* offy = off_b + (2 * k) * g.off_c + p * g.off_p;
      const T* offx = off_b + (2 * k + 1) * g.off_c + p * g.off_p;
      for (int64_t b = 0; b < n; ++b) {  // gathered once: the offsets may be channels-last
        dy[b] = offy[b * g.off_p];
        dx[b] = offx[b * g.off_p];
        by[b] = oy[b] * sh + ay;
        bx[b] = ox[b] * sw + ax;
      }
      if (mask_b) std::copy(mask_b + k * plane + p, mask_b + k * plane + p + n, m);
      plan_row<T>(n, by, bx, dy, dx, m, H, W, plan.q[0][k], plan.q[1][k], plan.q[2][k], plan.q[3][k], plan.w[0][k],
                  plan.w[1][k], plan.w[2][k], plan.w[3][k]);
    }
    for (int64_t b = 0; b < n; ++b) {
      T* colrow = col + (b0 + b) * CC * K;
      for (int64_t k = 0; k < K; ++k) {
        const T w0 = plan.w[0][k][b], w1 = plan.w[1][k][b], w2 = plan.w[2][k][b], w3 = plan.w[3][k][b];
        T* __restrict__ dst = colrow + k * CC;
        if (w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0)) {
          for (int c = 0; c < CC; ++c) dst[c] = T(0);
          continue;
        }
        bilinear_row<T, CC>(dst, img + int64_t(plan.q[0][k][b]) * CC, img + int64_t(plan.q[1][k][b]) * CC,
                            img + int64_t(plan.q[2][k][b]) * CC, img + int64_t(plan.q[3][k][b]) * CC, w0, w1, w2, w3);
      }
    }
  }
}

// d[c] += w * gc[c]: one corner at a time, so corners that coincide (clamped at the border) still add
// sequentially while each loop vectorises.
template <typename T, int CC>
inline void add_scaled(T* __restrict__ d, T w, const T* __restrict__ gc) {
  for (int c = 0; c < CC; ++c) d[c] += w * gc[c];
}

template <typename T, int CC>
void scatter_tile_fixed(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                        const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  const int64_t K = g.taps(), plane = g.out_plane();
  int64_t oy = p0 / g.out_w, ox = p0 - oy * g.out_w;
  for (int64_t pl = 0; pl < np; ++pl, ox = (ox + 1 == g.out_w) ? (++oy, 0) : ox + 1) {
    const int64_t p = p0 + pl;
    const T* gcolrow = gcol + pl * CC * K;
    for (int64_t i = 0, k = 0; i < g.kernel_h; ++i)
    for (int64_t j = 0; j < g.kernel_w; ++j, ++k) {
      T y, x;
      tap_position_ij(g, off_b, k, i, j, p, oy, ox, y, x);
      Taps<T> t;
      const bool any = deform_taps(y, x, g.height, g.width, t);
      const T m = mask_b ? mask_b[k * plane + p] : T(1);
      if (!any) {
        if (goff_b) {
          goff_b[(2 * k) * plane + p] = T(0);
          goff_b[(2 * k + 1) * plane + p] = T(0);
        }
        if (gmask_b) gmask_b[k * plane + p] = T(0);
        continue;
      }
      const T* __restrict__ gc = gcolrow + k * CC;
      if (goff_b) {
        T s[4];
        corner_dots<T, CC>(gc, img + t.pos[0] * CC, img + t.pos[1] * CC, img + t.pos[2] * CC, img + t.pos[3] * CC, s);
        goff_b[(2 * k) * plane + p] = m * grad_y(t, s);
        goff_b[(2 * k + 1) * plane + p] = m * grad_x(t, s);
        if (gmask_b) gmask_b[k * plane + p] = sampled_value(t, s);
      }
      if (gin != nullptr) {
        const T w0 = t.w[0] * m, w1 = t.w[1] * m, w2 = t.w[2] * m, w3 = t.w[3] * m;
        if (!(w0 == T(0) && w1 == T(0) && w2 == T(0) && w3 == T(0))) {
          add_scaled<T, CC>(gin + t.pos[0] * CC, w0, gc);
          add_scaled<T, CC>(gin + t.pos[1] * CC, w1, gc);
          add_scaled<T, CC>(gin + t.pos[2] * CC, w2, gc);
          add_scaled<T, CC>(gin + t.pos[3] * CC, w3, gc);
        }
      }
    }
  }
}

// Calls f(std::integral_constant<int, CC>) with CC = the channel count when the layer has one weight
// group and one deform group and C is one of the widths with a specialised loop, else CC = 0 (generic).
template <typename F>
inline void with_channel_specialisation(const Geometry& g, F&& f) {
  if (g.groups == 1 && g.deform_groups == 1) {
    switch (g.channels) {
      case 4: return f(std::integral_constant<int, 4>());
      case 8: return f(std::integral_constant<int, 8>());
      case 16: return f(std::integral_constant<int, 16>());
      case 32: return f(std::integral_constant<int, 32>());
      case 64: return f(std::integral_constant<int, 64>());
      case 128: return f(std::integral_constant<int, 128>());
      default: break;
    }
  }
  f(std::integral_constant<int, 0>());
}

// The tile loops, specialised or generic.
template <typename T, int CC>
inline void sample_any(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                       T* col) {
  if constexpr (CC > 0) {
    sample_tile_fixed<T, CC>(g, img, off_b, mask_b, p0, np, col);
  } else {
    sample_tile<T>(g, img, off_b, mask_b, p0, np, col);
  }
}

template <typename T, int CC>
inline void scatter_any(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
                        const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  if constexpr (CC > 0) {
    scatter_tile_fixed<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
  } else {
    scatter_tile<T>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
  }
}

// The same two functions generated for AVX2 (8 floats per register instead of 4) and AVX-512 (16),
// picked at run time by cpu_isa() (cpu_isa.h): the channel loops of the fixed-width paths are where
// the time goes.
template <typename T, int CC>
DYNAMASK_AVX2 void sample_any_avx2(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                   int64_t np, T* col) {
  sample_any<T, CC>(g, img, off_b, mask_b, p0, np, col);
}

template <typename T, int CC>
DYNAMASK_AVX512 void sample_any_avx512(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                       int64_t np, T* col) {
  sample_any<T, CC>(g, img, off_b, mask_b, p0, np, col);
}

template <typename T, int CC>
DYNAMASK_AVX2 void scatter_any_avx2(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                    int64_t np, const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  scatter_any<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
}

template <typename T, int CC>
DYNAMASK_AVX512 void scatter_any_avx512(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                        int64_t np, const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  scatter_any<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
}

template <typename T, int CC>
inline void sample_dispatch(Isa isa, const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                            int64_t np, T* col) {
  switch (isa) {
    case Isa::kAvx512: return sample_any_avx512<T, CC>(g, img, off_b, mask_b, p0, np, col);
    case Isa::kAvx2: return sample_any_avx2<T, CC>(g, img, off_b, mask_b, p0, np, col);
    default: return sample_any<T, CC>(g, img, off_b, mask_b, p0, np, col);
  }
}

template <typename T, int CC>
inline void scatter_dispatch(Isa isa, const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                             int64_t np, const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  switch (isa) {
    case Isa::kAvx512: return scatter_any_avx512<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
    case Isa::kAvx2: return scatter_any_avx2<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
    default: return scatter_any<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
  }
}

// Tensors wrapping raw buffers, for at::mm_out (no ownership, no copies).
template <typename T>
at::Tensor wrap(const T* ptr, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& opts) {
  return at::from_blob(const_cast<T*>(ptr), sizes, strides, opts);
}

// The forward's epilogue on one GEMM tile y [np, Cout] (row-major): dst[pl * dp + o * dc] =
// act(y[pl, o] + bias[o] + res[pl * dp + o * dc]), act = ReLU or identity (NaN -> 0 under ReLU, as
// `v > 0 ? v : 0`). dst may be y itself (channels-last: dp = Cout, dc = 1) or out's NCHW plane slice
// (dp = 1, dc = plane). The branches are template parameters so that the loops vectorise.
template <typename T, bool RES, bool RELU>
inline void epilogue_tile(const T* y, int64_t np, int64_t Cout, int64_t dp, int64_t dc, const T* __restrict__ bias,
                          const T* res, T* dst) {
  if (dc == 1) {
    for (int64_t pl = 0; pl < np; ++pl) {
      const T* src = y + pl * Cout;  // not restrict: d may be src itself (elementwise, so in place is fine)
      const T* __restrict__ r = RES ? res + pl * dp : nullptr;
      T* d = dst + pl * dp;
      for (int64_t o = 0; o < Cout; ++o) {
        T v = src[o] + bias[o];
        if constexpr (RES) v += r[o];
        d[o] = RELU ? (v > T(0) ? v : T(0)) : v;
      }
    }
    return;
  }
  for (int64_t o = 0; o < Cout; ++o) {
    const T bo = bias[o];
    const T* __restrict__ r = RES ? res + o * dc : nullptr;
    T* __restrict__ d = dst + o * dc;
    for (int64_t pl = 0; pl < np; ++pl) {
      T v = y[pl * Cout + o] + bo;
      if constexpr (RES) v += r[pl];
      d[pl] = RELU ? (v > T(0) ? v : T(0)) : v;
    }
  }
}

template <typename T>
inline void epilogue_any(const T* y, int64_t np, int64_t Cout, int64_t dp, int64_t dc, const T* bias, const T* res,
                         T* dst, bool relu) {
  if (res) {
    relu ? epilogue_tile<T, true, true>(y, np, Cout, dp, dc, bias, res, dst)
         : epilogue_tile<T, true, false>(y, np, Cout, dp, dc, bias, res, dst);
  } else {
    relu ? epilogue_tile<T, false, true>(y, np, Cout, dp, dc, bias, res, dst)
         : epilogue_tile<T, false, false>(y, np, Cout, dp, dc, bias, res, dst);
  }
}

template <typename T>
DYNAMASK_AVX2 void epilogue_avx2(const T* y, int64_t np, int64_t Cout, int64_t dp, int64_t dc, const T* bias,
                                 const T* res, T* dst, bool relu) {
  epilogue_any<T>(y, np, Cout, dp, dc, bias, res, dst, relu);
}

template <typename T>
DYNAMASK_AVX512 void epilogue_avx512(const T* y, int64_t np, int64_t Cout, int64_t dp, int64_t dc, const T* bias,
                                     const T* res, T* dst, bool relu) {
  epilogue_any<T>(y, np, Cout, dp, dc, bias, res, dst, relu);
}

template <typename T>
inline void epilogue_dispatch(Isa isa, const T* y, int64_t np, int64_t Cout, int64_t dp, int64_t dc, const T* bias,
                              const T* res, T* dst, bool relu) {
  switch (isa) {
    case Isa::kAvx512: return epilogue_avx512<T>(y, np, Cout, dp, dc, bias, res, dst, relu);
    case Isa::kAvx2: return epilogue_avx2<T>(y, np, Cout, dp, dc, bias, res, dst, relu);
    default: return epilogue_any<T>(y, np, Cout, dp, dc, bias, res, dst, relu);
  }
}

// Column-major C[m, n] (ld ldc) = A[m, k] (ld lda) @ B[k, n] (ld ldb), run by the calling thread alone
// (inside a SequentialBlasGuard). float calls the BLAS that torch links (sgemm_, exported by
// libtorch_cpu on x86 with MKL) directly: at::mm_out on from_blob tensors cost several microseconds
// per call, thousands of calls per layer. Without that symbol, and for double, at::mm_out.
template <typename T>
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                      int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
      const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
      const float one = 1.f, zero = 0.f;
      sgemm_("N", "N", &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Row-major view of the same product: C^T[n, m] = B^T[n, k] @ A^T[k, m].
  auto out = wrap<T>(c, {n, m}, {ldc, 1}, opts);
  at::mm_out(out, wrap<T>(b, {n, k}, {ldb, 1}, opts), wrap<T>(a, {k, m}, {lda, 1}, opts));
}

// Forward, one tile of output positions of one image at a time, in parallel over (image, tile): the
// tile is sampled into the worker's channels-last columns [positions, groups * kh*kw * C/groups] (about
// 256 KB, so it stays in the core's cache), multiplied by the weight with a sequential GEMM
// (y[p, o] = sum_j col[p, j] * wt[j, o]) and finished while still hot: bias, residual and ReLU. For a
// channels-last output the GEMM writes the tile's rows of `out` in place; for NCHW it writes a tile
// buffer that the epilogue transposes into `out`. No buffer ever holds a whole image's columns: an
// earlier version sampled whole images into one buffer and ran torch's 1x1 convolution on it, which
// sent every column through memory twice and ran oneDNN at 27-50 GMAC/s where MKL's GEMM on a tile
// reaches 44-74 on the head's shapes (benchmarks/results/deform_conv_cpu.md, "Design measurements").
// wt: [groups, kh*kw * C/groups, C_out/groups] contiguous; bias may be null.
template <typename T>
void forward_impl(const Geometry& g, const at::Tensor& input, const T* offset, int64_t off_b, const T* mask,
                  const T* wt, const T* bias, const T* residual, bool relu, at::Tensor& out) {
  const bool channels_last = out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous();
  const int64_t C = g.channels, K = g.taps(), Cout = g.out_channels, plane = g.out_plane(), HW = g.height * g.width;
  const int64_t Cg = g.in_per_group(), Coutg = g.out_per_group(), KC = K * Cg;
  const int64_t P = tile_positions(g), tiles = ceil_div(plane, P), chunk = images_per_chunk(g);
  const Isa isa = cpu_isa();
  T* out_p = out.data_ptr<T>();
  const std::vector<T> zeros(bias ? 0 : static_cast<size_t>(Cout), T(0));
  const T* bias_p = bias ? bias : zeros.data();  // the epilogue always adds one
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - b0);
    const at::Tensor nhwc = input.narrow(0, b0, nb).permute({0, 2, 3, 1}).contiguous();
    const T* nhwc_p = nhwc.data_ptr<T>();
    with_channel_specialisation(g, [&](auto cc) {
      constexpr int CC = decltype(cc)::value;
      at::parallel_for(0, nb * tiles, 1, [&](int64_t begin, int64_t end) {
        const SequentialBlasGuard sequential_blas;
        std::vector<T> col(static_cast<size_t>(P * C * K));
        std::vector<T> ytile(channels_last ? 0 : static_cast<size_t>(P * Cout));
        for (int64_t item = begin; item < end; ++item) {
          const int64_t bl = item / tiles, b = b0 + bl;
          const int64_t p0 = (item - bl * tiles) * P, np = std::min(P, plane - p0);
          sample_dispatch<T, CC>(isa, g, nhwc_p + bl * HW * C, offset + b * off_b,
                                 mask ? mask + b * g.deform_groups * K * plane : nullptr, p0, np, col.data());
          T* y = channels_last ? out_p + (b * plane + p0) * Cout : ytile.data();
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            // Row-major y[np, Coutg] (ld Cout) = col[np, KC] (ld C*K) @ wt[KC, Coutg]: BLAS is column-major,
            // so this is y^T = wt^T col^T with every operand untransposed.
            tile_gemm<T>(Coutg, np, KC, wt + grp * KC * Coutg, Coutg, col.data() + grp * KC, C * K, y + grp * Coutg,
                         Cout);
          }
          if (channels_last) {
            // y is out's rows [b, p0 : p0 + np, :]; the residual has out's layout.
            epilogue_dispatch<T>(isa, y, np, Cout, Cout, 1, bias_p, residual ? residual + (b * plane + p0) * Cout : nullptr,
                                 y, relu);
          } else {
            // NCHW: element (pl, o) of the tile goes to out[b, o, p0 + pl].
            epilogue_dispatch<T>(isa, y, np, Cout, 1, plane, bias_p,
                                 residual ? residual + b * Cout * plane + p0 : nullptr, out_p + b * Cout * plane + p0,
                                 relu);
          }
        }
      });
    });
  }
}

template <typename T>
void backward_impl(const Geometry& g, const at::Tensor& input, const T* grad, const T* offset, const T* mask,
                   const T* weight_p, at::Tensor* grad_input, T* grad_offset, T* grad_mask, T* gw_acc) {
  const int64_t C = g.channels, K = g.taps(), Cg = g.in_per_group(), Cout = g.out_channels,
                Coutg = g.out_per_group(), plane = g.out_plane(), HW = g.height * g.width;
  const int64_t P = tile_positions(g), tiles = ceil_div(plane, P), chunk = images_per_chunk(g);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool need_cols_grad = grad_input != nullptr || grad_offset != nullptr;
  const Isa isa = cpu_isa();
  const auto opts = input.options();
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - b0);
    const at::Tensor nhwc = input.narrow(0, b0, nb).permute({0, 2, 3, 1}).contiguous();
    const T* nhwc_p = nhwc.data_ptr<T>();
    // Splits per image: enough work items for every thread, each with its own accumulator.
    const int64_t splits = nb >= threads ? 1 : std::min(tiles, ceil_div(threads, nb));
    at::Tensor gin;
    if (grad_input) gin = at::zeros({nb * splits, g.height, g.width, C}, opts);
    T* gin_p = grad_input ? gin.data_ptr<T>() : nullptr;
    with_channel_specialisation(g, [&](auto cc) {
    constexpr int CC = decltype(cc)::value;
    at::parallel_for(0, nb * splits, 1, [&](int64_t begin, int64_t end) {
      const SequentialBlasGuard sequential_blas;
      std::vector<T> col(static_cast<size_t>(P * C * K));
      std::vector<T> gcol(need_cols_grad ? static_cast<size_t>(P * C * K) : 0);
      T* gw = gw_acc ? gw_acc + at::get_thread_num() * Cout * K * Cg : nullptr;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bl = item / splits, s = item - bl * splits, b = b0 + bl;
        const T* img = nhwc_p + bl * HW * C;
        const T* off_b = offset + b * 2 * g.deform_groups * K * plane;
        const T* mask_b = mask ? mask + b * g.deform_groups * K * plane : nullptr;
        const T* grad_b = grad + b * Cout * plane;
        for (int64_t tile = s * tiles / splits; tile < (s + 1) * tiles / splits; ++tile) {
          const int64_t p0 = tile * P, np = std::min(P, plane - p0);
          if (gw) {
            sample_dispatch<T, CC>(isa, g, img, off_b, mask_b, p0, np, col.data());
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              auto gwg = wrap<T>(gw + grp * Coutg * K * Cg, {Coutg, K * Cg}, {K * Cg, 1}, opts);
              gwg.addmm_(wrap<T>(grad_b + grp * Coutg * plane + p0, {Coutg, np}, {plane, 1}, opts),
                         wrap<T>(col.data() + grp * K * Cg, {np, K * Cg}, {C * K, 1}, opts));
            }
          }
          if (need_cols_grad) {
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              auto gcg = wrap<T>(gcol.data() + grp * K * Cg, {np, K * Cg}, {C * K, 1}, opts);
              at::mm_out(gcg, wrap<T>(grad_b + grp * Coutg * plane + p0, {np, Coutg}, {1, plane}, opts),
                         wrap<T>(weight_p + grp * Coutg * K * Cg, {Coutg, K * Cg}, {K * Cg, 1}, opts));
            }
            scatter_dispatch<T, CC>(isa, g, img, off_b, mask_b, p0, np, gcol.data(), gin_p ? gin_p + item * HW * C : nullptr,
                              grad_offset ? grad_offset + b * 2 * g.deform_groups * K * plane : nullptr,
                              grad_mask ? grad_mask + b * g.deform_groups * K * plane : nullptr);
          }
        }
      }
    });
    });
    if (grad_input) {
      const at::Tensor summed = splits == 1 ? gin : gin.view({nb, splits, g.height, g.width, C}).sum(1);
      grad_input->narrow(0, b0, nb).copy_(summed.view({nb, g.height, g.width, C}).permute({0, 3, 1, 2}));
    }
  }
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& residual, int64_t stride_h, int64_t stride_w,
                             int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, bool relu) {
  const Geometry g = check_args(input, offset, weight, bias, mask, residual, stride_h, stride_w, pad_h, pad_w, dil_h,
                                dil_w, "deform_conv2d");
  if (is_reduced_float(input)) {  // half / bfloat16 on the CPU: computed in float
    return deform_conv2d_cpu(input.to(at::kFloat), offset.to(at::kFloat), weight.to(at::kFloat), to_float(bias),
                             to_float(mask), to_float(residual), stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, relu)
        .to(input.scalar_type());
  }
  // Channels-last in, channels-last out (the r-FPN stages run channels-last on the CPU).
  const auto format = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast && g.out_channels > 1
                          ? at::MemoryFormat::ChannelsLast
                          : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  if (out.numel() == 0) return out;
  // The offsets are read in place when each image's positions are evenly spaced (NCHW, channels-last,
  // or a channel slice of channels-last: the FAM's offset convs write 32 channels of which 18 are read).
  // Position p = oy * out_w + ox is then at p * off_p (a size-1 dimension's stride is never used).
  Geometry gs = g;
  const bool flat = g.out_h == 1 || g.out_w == 1 || offset.stride(2) == offset.stride(3) * g.out_w;
  const auto offset_c = flat ? offset : offset.contiguous();
  gs.off_c = offset_c.stride(1);
  gs.off_p = g.out_w > 1 ? offset_c.stride(3) : offset_c.stride(2);
  const int64_t off_b = offset_c.stride(0);
  // [groups, kh*kw * C_in/groups, C_out/groups]: the GEMM's right operand, rows in the columns' order.
  const auto wt = weight.permute({0, 2, 3, 1})
                      .reshape({g.groups, g.out_per_group(), g.taps() * g.in_per_group()})
                      .transpose(1, 2)
                      .contiguous();
  const auto mask_c = mask ? mask->contiguous() : at::Tensor();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const auto residual_c = residual ? residual->contiguous(format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
    forward_impl<scalar_t>(gs, input, offset_c.data_ptr<scalar_t>(), off_b, mask ? mask_c.data_ptr<scalar_t>() : nullptr,
                           wt.data_ptr<scalar_t>(), bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                           residual ? residual_c.data_ptr<scalar_t>() : nullptr, relu, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, bool need_input, bool need_offset_mask, bool need_weight) {
  const char* op = "deform_conv2d_backward";
  const Geometry g = check_args(input, offset, weight, std::nullopt, mask, std::nullopt, stride_h, stride_w, pad_h,
                                pad_w, dil_h, dil_w, op);
  check_same(grad, "grad", input, op);
  check_shape(grad, "grad", {g.batch, g.out_channels, g.out_h, g.out_w}, "the output's shape", op);
  if (is_reduced_float(input)) {
    auto r = deform_conv2d_backward_cpu(grad.to(at::kFloat), input.to(at::kFloat), offset.to(at::kFloat),
                                        weight.to(at::kFloat), to_float(mask), stride_h, stride_w, pad_h, pad_w,
                                        dil_h, dil_w, need_input, need_offset_mask, need_weight);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt), std::get<3>(r).to(dt)};
  }
  const auto empty = at::empty({0}, input.options());
  at::Tensor grad_input = need_input ? at::zeros_like(input, at::MemoryFormat::Contiguous) : empty;
  at::Tensor grad_offset = need_offset_mask ? at::zeros_like(offset, at::MemoryFormat::Contiguous) : empty;
  at::Tensor grad_mask = (need_offset_mask && mask) ? at::zeros_like(*mask, at::MemoryFormat::Contiguous) : empty;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor gw_acc = need_weight ? at::zeros({threads, g.out_channels, g.taps() * g.in_per_group()}, input.options())
                                  : empty;
  if (g.batch > 0 && g.out_channels > 0 && (need_input || need_offset_mask || need_weight)) {
    // The input is read through an NHWC view (no copy when it is channels-last).
    const auto offset_c = offset.contiguous(), grad_c = grad.contiguous();
    const auto weight_p = weight.permute({0, 2, 3, 1}).contiguous();
    const auto mask_c = mask ? mask->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      backward_impl<scalar_t>(g, input, grad_c.data_ptr<scalar_t>(), offset_c.data_ptr<scalar_t>(),
                              mask ? mask_c.data_ptr<scalar_t>() : nullptr, weight_p.data_ptr<scalar_t>(),
                              need_input ? &grad_input : nullptr,
                              need_offset_mask ? grad_offset.data_ptr<scalar_t>() : nullptr,
                              (need_offset_mask && mask) ? grad_mask.data_ptr<scalar_t>() : nullptr,
                              need_weight ? gw_acc.data_ptr<scalar_t>() : nullptr);
    });
  }
  at::Tensor grad_weight = empty;
  if (need_weight) {
    grad_weight = gw_acc.sum(0)
                      .view({g.out_channels, g.kernel_h, g.kernel_w, g.in_per_group()})
                      .permute({0, 3, 1, 2})
                      .contiguous();
  }
  return {grad_input, grad_offset, grad_mask, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace deform_conv
}  // namespace dynamask
