// CPU kernels of the fused deformable convolution.
//
// Never a whole-batch columns buffer: images are taken a bounded chunk at a time (read through an
// NHWC view, copied only when the input is not channels-last, so each bilinear corner is a contiguous
// run of channels). Forward: tiles of output positions of a group of images are sampled in parallel
// into one reused channels-last columns tensor [images, out_h, out_w, groups * kh*kw * C/groups],
// which is the input of a grouped 1x1 convolution (torch's, oneDNN on x86) with the bias; the
// residual and ReLU are applied while that result is copied into the output (NCHW, or channels-last
// for a channels-last input). The corners and weights of a sample are computed once per (position,
// tap, deform group) and reused for all the group's channels.
//
// Backward recomputes a tile's columns, accumulates grad_weight per thread, multiplies grad by the
// weight into a second tile buffer and scatters it: into grad_input (each work item owns one image's
// accumulator, or a private copy of it when there are fewer images than threads, so no races), and
// into grad_offset / grad_mask through the bilinear derivatives. Deterministic for a thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Images whose sampled columns feed one 1x1-convolution call in the forward: at most 4M column
// elements (16 MB in float) at once, and at least one image.
inline int64_t images_per_gemm(const Geometry& g) {
  const int64_t image = std::max<int64_t>(1, g.channels * g.taps() * g.out_plane());
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, (int64_t(1) << 22) / image));
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
      const T* off_d = off_b + d * 2 * K * plane;
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
      const T* off_d = off_b + d * 2 * K * plane;
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
void sample_tile_fixed(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0, int64_t np,
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

// The same two functions generated for AVX2 (8 floats per register instead of 4), picked at run
// time by cpu_has_avx2(): the channel loops of the fixed-width paths are where the time goes.
template <typename T, int CC>
DYNAMASK_AVX2 void sample_any_avx2(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                   int64_t np, T* col) {
  sample_any<T, CC>(g, img, off_b, mask_b, p0, np, col);
}

template <typename T, int CC>
DYNAMASK_AVX2 void scatter_any_avx2(const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                                    int64_t np, const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  scatter_any<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
}

template <typename T, int CC>
inline void sample_dispatch(bool avx2, const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                            int64_t np, T* col) {
  if (avx2) {
    sample_any_avx2<T, CC>(g, img, off_b, mask_b, p0, np, col);
  } else {
    sample_any<T, CC>(g, img, off_b, mask_b, p0, np, col);
  }
}

template <typename T, int CC>
inline void scatter_dispatch(bool avx2, const Geometry& g, const T* img, const T* off_b, const T* mask_b, int64_t p0,
                             int64_t np, const T* gcol, T* gin, T* goff_b, T* gmask_b) {
  if (avx2) {
    scatter_any_avx2<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
  } else {
    scatter_any<T, CC>(g, img, off_b, mask_b, p0, np, gcol, gin, goff_b, gmask_b);
  }
}

// Tensors wrapping raw buffers, for at::mm_out (no ownership, no copies).
template <typename T>
at::Tensor wrap(const T* ptr, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& opts) {
  return at::from_blob(const_cast<T*>(ptr), sizes, strides, opts);
}

// Forward: a bounded chunk of images is sampled (in parallel over tiles of positions) into a
// channels-last columns tensor [images, out_h, out_w, groups * kh*kw * C/groups], which IS the input
// of a grouped 1x1 convolution with the weight [C_out, kh*kw * C/groups, 1, 1] and the bias: torch's
// convolution (oneDNN on x86) ran that GEMM about twice as fast as a BLAS sgemm call per tile
// (benchmarks/results/deform_conv_cpu.md, "Design measurements"). The residual and ReLU are
// applied while copying the result into the output. out (and residual) are NCHW, or channels-last
// when the input is: a channels-last input needs no layout copy for the sampler, and the 1x1
// convolution's output is then copied into out without a transposition.
template <typename T>
void forward_impl(const Geometry& g, const at::Tensor& input, const T* offset, const T* mask, const at::Tensor& weight_p,
                  const at::Tensor& bias, const T* residual, bool relu, at::Tensor& out) {
  const bool channels_last = out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous();
  const int64_t C = g.channels, K = g.taps(), Cout = g.out_channels, plane = g.out_plane(), HW = g.height * g.width;
  const int64_t P = tile_positions(g), tiles = ceil_div(plane, P), chunk = images_per_chunk(g);
  const int64_t per_gemm = images_per_gemm(g);
  const bool avx2 = cpu_has_avx2();
  const at::Tensor w1x1 = weight_p.view({Cout, K * g.in_per_group(), 1, 1});
  T* out_p = out.data_ptr<T>();
  // One columns buffer for every chunk: fresh pages would cost a page fault per 4 KB each time.
  const at::Tensor cols_buffer = at::empty({per_gemm, g.out_h, g.out_w, C * K}, input.options());
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - b0);
    const at::Tensor nhwc = input.narrow(0, b0, nb).permute({0, 2, 3, 1}).contiguous();
    const T* nhwc_p = nhwc.data_ptr<T>();
    for (int64_t c0 = 0; c0 < nb; c0 += per_gemm) {
      const int64_t nc = std::min(per_gemm, nb - c0);
      const at::Tensor cols = cols_buffer.narrow(0, 0, nc);
      T* cols_p = cols.data_ptr<T>();
      with_channel_specialisation(g, [&](auto cc) {
        constexpr int CC = decltype(cc)::value;
        at::parallel_for(0, nc * tiles, 1, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item) {
            const int64_t il = item / tiles, bl = c0 + il, b = b0 + bl;
            const int64_t p0 = (item - il * tiles) * P, np = std::min(P, plane - p0);
            sample_dispatch<T, CC>(avx2, g, nhwc_p + bl * HW * C, offset + b * 2 * g.deform_groups * K * plane,
                              mask ? mask + b * g.deform_groups * K * plane : nullptr, p0, np,
                              cols_p + (il * plane + p0) * C * K);
          }
        });
      });
      const at::Tensor y = at::conv2d(cols.permute({0, 3, 1, 2}), w1x1,
                                      bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                                      at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, g.groups);
      const int64_t first = b0 + c0;
      if (channels_last) {
        // y is channels-last already, like out: the epilogue is one elementwise pass.
        const at::Tensor y_cl = y.contiguous(at::MemoryFormat::ChannelsLast);
        const T* y_p = y_cl.data_ptr<T>();
        const int64_t offset0 = first * plane * Cout, n = nc * plane * Cout;
        at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            T v = y_p[i];
            if (residual) v += residual[offset0 + i];
            out_p[offset0 + i] = (relu && !(v > T(0))) ? T(0) : v;
          }
        });
        continue;
      }
      const at::Tensor y_nchw = y.contiguous();
      const T* y_p = y_nchw.data_ptr<T>();
      at::parallel_for(0, nc * Cout, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {  // row = (image in the chunk, output channel)
          const T* src = y_p + row * plane;
          T* dst = out_p + (first * Cout + row) * plane;
          const T* res = residual ? residual + (first * Cout + row) * plane : nullptr;
          for (int64_t p = 0; p < plane; ++p) {
            T v = src[p];
            if (res) v += res[p];
            dst[p] = (relu && !(v > T(0))) ? T(0) : v;
          }
        }
      });
    }
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
  const bool avx2 = cpu_has_avx2();
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
            sample_dispatch<T, CC>(avx2, g, img, off_b, mask_b, p0, np, col.data());
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
            scatter_dispatch<T, CC>(avx2, g, img, off_b, mask_b, p0, np, gcol.data(), gin_p ? gin_p + item * HW * C : nullptr,
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
  const auto offset_c = offset.contiguous();  // the input is read through an NHWC view (copied only if not one)
  const auto weight_p = weight.permute({0, 2, 3, 1}).contiguous();  // [C_out, kh, kw, C_in / groups]
  const auto mask_c = mask ? mask->contiguous() : at::Tensor();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const auto residual_c = residual ? residual->contiguous(format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
    forward_impl<scalar_t>(g, input, offset_c.data_ptr<scalar_t>(),
                           mask ? mask_c.data_ptr<scalar_t>() : nullptr, weight_p, bias_c,
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
