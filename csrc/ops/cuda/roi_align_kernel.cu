// CUDA kernels of the batched RoIAlign ops: one launch covers all RoIs of all levels (forward
// and backward of roi_align_multilevel) or all stages (roi_align_stages). The level / stage tables
// travel by value in the kernel arguments; the backward scatters with atomics into float accumulators
// (half and bfloat16 too, as the CPU kernels do), and so calls alertNotDeterministic. Nothing here
// reads the data on the host, so nothing waits on it; and no device-side assert can leave the CUDA
// context unusable: a RoI the CPU kernels refuse (batch index not an integer in [0, N), a box not
// finite, a given level out of range) pools to zeros here and gets no gradient.
// dynamask.ops.full_checks() raises for such input before the launch instead.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/roi_align_checks.h"
#include "ops/roi_align_common.h"

namespace dynamask {
namespace roi_align {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20); }

// One level (multilevel) or one stage (stages): where its data is and how its work is indexed.
template <typename T>
struct Table {
  T* data[kMaxLevels];            // features (forward) or grad features (backward), NCHW
  T* out[kMaxLevels];             // per stage output / grad (stages only)
  int64_t channels[kMaxLevels];
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  double scale[kMaxLevels];
  int64_t begin[kMaxLevels + 1];  // stages: first flat work index of each stage
  int64_t level[kMaxLevels];      // stages: level of each stage
  int64_t size[kMaxLevels];       // stages: output size of each stage
  int num;
};

template <typename T>
__device__ inline RoiGeometry<at::opmath_type<T>> geometry_of(const T* roi, double scale, int64_t pooled_h,
                                                              int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  using Acc = at::opmath_type<T>;
  const Acc box[4] = {static_cast<Acc>(roi[1]), static_cast<Acc>(roi[2]), static_cast<Acc>(roi[3]),
                      static_cast<Acc>(roi[4])};
  return roi_geometry<Acc>(box, static_cast<Acc>(scale), pooled_h, pooled_w, sampling_ratio, aligned);
}

// Value of one output bin: the shared arithmetic, reading an NCHW plane.
template <typename T, typename Acc>
__device__ inline Acc pool_bin(const T* plane, int64_t height, int64_t width, const RoiGeometry<Acc>& g,
                               int64_t ph, int64_t pw) {
  Acc sum = 0;
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const Acc y = sample_y(g, ph, iy);
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      BilinearTaps<Acc> t;
      if (!bilinear_taps(y, sample_x(g, pw, ix), height, width, t)) continue;
      for (int k = 0; k < 4; ++k) sum += t.w[k] * static_cast<Acc>(plane[t.pos[k]]);
    }
  }
  return sum * g.inv_count;
}

template <typename Acc>
__device__ inline void unpool_bin(Acc* grad_plane, int64_t height, int64_t width, const RoiGeometry<Acc>& g,
                                  int64_t ph, int64_t pw, Acc grad) {
  const Acc gv = grad * g.inv_count;
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const Acc y = sample_y(g, ph, iy);
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      BilinearTaps<Acc> t;
      if (!bilinear_taps(y, sample_x(g, pw, ix), height, width, t)) continue;
      for (int k = 0; k < 4; ++k) gpuAtomicAdd(grad_plane + t.pos[k], t.w[k] * gv);
    }
  }
}

template <typename T>
__device__ inline int64_t level_of(const T* roi, const int64_t* levels, int64_t r, int64_t k_min, int num_levels,
                                  double canonical_scale) {
  using Acc = at::opmath_type<T>;
  if (levels != nullptr) {
    const int64_t l = levels[r];
    return (l >= 0 && l < num_levels) ? l : -1;  // -1: pooled to zeros
  }
  return fpn_level<Acc>(static_cast<Acc>(roi[1]), static_cast<Acc>(roi[2]), static_cast<Acc>(roi[3]),
                        static_cast<Acc>(roi[4]), k_min, k_min + num_levels - 1, static_cast<Acc>(canonical_scale));
}

// Whether RoI r can be pooled, and on which level (l < 0: it cannot).
template <typename T>
__device__ inline int64_t valid_level(const T* roi, const int64_t* levels, int64_t r, int64_t k_min, int num_levels,
                                      double canonical_scale, int64_t batch_size) {
  return roi_is_valid(roi, batch_size) ? level_of(roi, levels, r, k_min, num_levels, canonical_scale) : -1;
}

template <typename T>
__global__ void multilevel_forward_kernel(int64_t total, Table<T> tab, const T* rois, const int64_t* levels,
                                          int64_t k_min, double canonical_scale, int64_t batch_size, int64_t channels, int64_t pooled_h,
                                          int64_t pooled_w, int64_t sampling_ratio, bool aligned, T* out) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = i % pooled_w, ph = (i / pooled_w) % pooled_h, c = (i / pooled_w / pooled_h) % channels;
    const int64_t r = i / pooled_w / pooled_h / channels;
    const T* roi = rois + r * 5;
    const int64_t l = valid_level(roi, levels, r, k_min, tab.num, canonical_scale, batch_size);
    if (l < 0) {
      out[i] = T(0);
      continue;
    }
    const auto g = geometry_of(roi, tab.scale[l], pooled_h, pooled_w, sampling_ratio, aligned);
    const int64_t H = tab.height[l], W = tab.width[l], b = static_cast<int64_t>(roi[0]);
    const T* plane = tab.data[l] + (b * channels + c) * H * W;
    out[i] = static_cast<T>(pool_bin<T, Acc>(plane, H, W, g, ph, pw));
  }
}

template <typename T>
__global__ void multilevel_backward_kernel(int64_t total, Table<at::opmath_type<T>> tab, const T* rois,
                                           const int64_t* levels, int64_t k_min, double canonical_scale,
                                           int64_t batch_size, int64_t channels, int64_t pooled_h,
                                           int64_t pooled_w, int64_t sampling_ratio, bool aligned, const T* grad) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = i % pooled_w, ph = (i / pooled_w) % pooled_h, c = (i / pooled_w / pooled_h) % channels;
    const int64_t r = i / pooled_w / pooled_h / channels;
    const T* roi = rois + r * 5;
    const int64_t l = valid_level(roi, levels, r, k_min, tab.num, canonical_scale, batch_size);
    if (l < 0) continue;
    const auto g = geometry_of(roi, tab.scale[l], pooled_h, pooled_w, sampling_ratio, aligned);
    const int64_t H = tab.height[l], W = tab.width[l], b = static_cast<int64_t>(roi[0]);
    unpool_bin<Acc>(tab.data[l] + (b * channels + c) * H * W, H, W, g, ph, pw, static_cast<Acc>(grad[i]));
  }
}

// Flat work index -> (stage, roi, channel, ph, pw) through the stage table.
struct StageIndex {
  int j;
  int64_t local, r, c, ph, pw;
};

template <typename T>
__device__ inline StageIndex stage_index(const Table<T>& tab, int64_t i) {
  StageIndex s;
  s.j = 0;
  while (s.j + 1 < tab.num && i >= tab.begin[s.j + 1]) ++s.j;
  s.local = i - tab.begin[s.j];
  const int64_t S = tab.size[s.j], C = tab.channels[tab.level[s.j]];
  s.pw = s.local % S;
  s.ph = (s.local / S) % S;
  s.c = (s.local / S / S) % C;
  s.r = s.local / S / S / C;
  return s;
}

template <typename T>
__global__ void stages_forward_kernel(int64_t total, Table<T> tab, const T* rois, int64_t batch_size,
                                      int64_t sampling_ratio, bool aligned) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const auto s = stage_index(tab, i);
    const int64_t l = tab.level[s.j], S = tab.size[s.j], C = tab.channels[l];
    const T* roi = rois + s.r * 5;
    if (!roi_is_valid(roi, batch_size)) {
      tab.out[s.j][s.local] = T(0);
      continue;
    }
    const auto g = geometry_of(roi, tab.scale[l], S, S, sampling_ratio, aligned);
    const int64_t H = tab.height[l], W = tab.width[l], b = static_cast<int64_t>(roi[0]);
    const T* plane = tab.data[l] + (b * C + s.c) * H * W;
    tab.out[s.j][s.local] = static_cast<T>(pool_bin<T, Acc>(plane, H, W, g, s.ph, s.pw));
  }
}

template <typename T>
__global__ void stages_backward_kernel(int64_t total, Table<at::opmath_type<T>> tab, const T* rois, int64_t batch_size,
                                       int64_t sampling_ratio, bool aligned) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const auto s = stage_index(tab, i);
    const int64_t l = tab.level[s.j], S = tab.size[s.j], C = tab.channels[l];
    const T* roi = rois + s.r * 5;
    if (!roi_is_valid(roi, batch_size)) continue;
    const auto g = geometry_of(roi, tab.scale[l], S, S, sampling_ratio, aligned);
    const int64_t H = tab.height[l], W = tab.width[l], b = static_cast<int64_t>(roi[0]);
    unpool_bin<Acc>(tab.data[l] + (b * C + s.c) * H * W, H, W, g, s.ph, s.pw, tab.out[s.j][s.local]);
  }
}

// The float accumulators in the gradient's dtype (no copy when that is the op-math type).
std::vector<at::Tensor> cast_all(const std::vector<at::Tensor>& acc, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const auto& g : acc) out.push_back(g.to(dtype));
  return out;
}

void check_common_cuda(const at::Tensor& rois, const c10::optional<at::Tensor>& levels, const char* op) {
  TORCH_CHECK_VALUE(rois.is_cuda(), op, ": rois must be a CUDA tensor here");
  if (levels.has_value()) {
    TORCH_CHECK_VALUE(levels->scalar_type() == at::kLong && levels->dim() == 1 && levels->size(0) == rois.size(0),
                      op, ": levels must be an int64 tensor of shape [R] = [", rois.size(0), "], got ",
                      levels->scalar_type(), " of shape ", levels->sizes());
    TORCH_CHECK_VALUE(levels->device() == rois.device(), op, ": levels is on ", levels->device(),
                      " but rois is on ", rois.device());
  }
}

at::Tensor roi_align_multilevel_cuda(at::TensorList features, const at::Tensor& rois,
                                     const c10::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                     int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                     double canonical_scale) {
  const char* op = "roi_align_multilevel";
  check_multilevel_args(features, rois, levels, spatial_scales, pooled_h, pooled_w, sampling_ratio, canonical_scale,
                        op);
  TORCH_CHECK_VALUE(rois.is_cuda(), op, ": rois must be a CUDA tensor here");
  const int64_t C = features[0].size(1);
  c10::cuda::CUDAGuard guard(rois.device());
  const int64_t R = rois.size(0);
  auto out = at::empty({R, C, pooled_h, pooled_w}, features[0].options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  std::vector<at::Tensor> feats;
  for (const auto& f : features) feats.push_back(f.contiguous());
  const auto rois_c = rois.contiguous();
  at::Tensor levels_c = levels.has_value() ? levels->contiguous() : at::Tensor();
  const int64_t k_min = static_cast<int64_t>(std::lround(-std::log2(spatial_scales[0])));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_multilevel_cuda", [&] {
    Table<scalar_t> tab{};
    tab.num = static_cast<int>(feats.size());
    for (int l = 0; l < tab.num; ++l) {
      tab.data[l] = feats[l].data_ptr<scalar_t>();
      tab.height[l] = feats[l].size(2);
      tab.width[l] = feats[l].size(3);
      tab.scale[l] = spatial_scales[l];
      tab.channels[l] = C;
    }
    multilevel_forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, tab, rois_c.data_ptr<scalar_t>(), levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr, k_min,
        canonical_scale, feats[0].size(0), C, pooled_h, pooled_w, sampling_ratio, aligned, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> roi_align_multilevel_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const c10::optional<at::Tensor>& levels,
    at::ArrayRef<double> spatial_scales, int64_t batch_size, int64_t channels, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sampling_ratio, bool aligned, double canonical_scale) {
  const char* op = "roi_align_multilevel_backward";
  check_common_cuda(rois, levels, op);
  check_canonical_scale(canonical_scale, op);
  const int64_t L = static_cast<int64_t>(spatial_scales.size());
  TORCH_CHECK_VALUE(L <= kMaxLevels && static_cast<int64_t>(heights.size()) == L &&
                        static_cast<int64_t>(widths.size()) == L,
                    op, ": heights/widths must have one entry per level");
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels, op,
                    ": grad must be [R, C, ph, pw] = [", rois.size(0), ", ", channels, ", ph, pw], got shape ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == rois.device(), op, ": grad is on ", grad.device(), " but rois is on ",
                    rois.device());
  c10::cuda::CUDAGuard guard(rois.device());
  at::globalContext().alertNotDeterministic("roi_align_multilevel_backward_cuda");
  // Accumulated in the op-math type (float for half and bfloat16), cast once at the end, as on the CPU.
  const auto acc_options = grad.options().dtype(at::toOpMathType(grad.scalar_type()));
  std::vector<at::Tensor> grads;
  for (int64_t l = 0; l < L; ++l) grads.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, acc_options));
  const int64_t total = grad.numel();
  if (total == 0) return cast_all(grads, grad.scalar_type());
  const auto grad_c = grad.contiguous();
  const auto rois_c = rois.contiguous();
  at::Tensor levels_c = levels.has_value() ? levels->contiguous() : at::Tensor();
  const int64_t k_min = static_cast<int64_t>(std::lround(-std::log2(spatial_scales[0])));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_multilevel_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    Table<Acc> tab{};
    tab.num = static_cast<int>(L);
    for (int l = 0; l < tab.num; ++l) {
      tab.data[l] = grads[l].data_ptr<Acc>();
      tab.height[l] = heights[l];
      tab.width[l] = widths[l];
      tab.scale[l] = spatial_scales[l];
      tab.channels[l] = channels;
    }
    multilevel_backward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, tab, rois_c.data_ptr<scalar_t>(), levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr, k_min,
        canonical_scale, batch_size, channels, grad.size(2), grad.size(3), sampling_ratio, aligned, grad_c.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cast_all(grads, grad.scalar_type());
}

std::vector<at::Tensor> roi_align_stages_cuda(at::TensorList features, const at::Tensor& rois,
                                              at::IntArrayRef stage_levels, at::IntArrayRef stage_sizes,
                                              at::IntArrayRef stage_counts, at::ArrayRef<double> spatial_scales,
                                              int64_t sampling_ratio, bool aligned, bool channels_last) {
  const char* op = "roi_align_stages";
  check_rois_and_levels(features, rois, spatial_scales, op);
  check_common_cuda(rois, c10::nullopt, op);
  check_stages(features, rois, stage_levels, stage_sizes, stage_counts, op);
  const auto S = stage_levels.size();
  TORCH_CHECK_VALUE(sampling_ratio >= 0, op, ": sampling_ratio must be >= 0, got ", sampling_ratio);
  c10::cuda::CUDAGuard guard(rois.device());
  std::vector<at::Tensor> feats;
  for (const auto& f : features) feats.push_back(f.contiguous());
  std::vector<at::Tensor> outs;
  for (size_t j = 0; j < S; ++j) {
    const auto& f = feats[stage_levels[j]];
    outs.push_back(at::empty({stage_counts[j], f.size(1), stage_sizes[j], stage_sizes[j]}, f.options()));
  }
  const auto rois_c = rois.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_cuda", [&] {
    Table<scalar_t> tab{};
    tab.num = static_cast<int>(S);
    for (size_t l = 0; l < feats.size(); ++l) {
      tab.data[l] = feats[l].data_ptr<scalar_t>();
      tab.channels[l] = feats[l].size(1);
      tab.height[l] = feats[l].size(2);
      tab.width[l] = feats[l].size(3);
      tab.scale[l] = spatial_scales[l];
    }
    int64_t total = 0;
    for (size_t j = 0; j < S; ++j) {
      tab.begin[j] = total;
      tab.level[j] = stage_levels[j];
      tab.size[j] = stage_sizes[j];
      tab.out[j] = outs[j].data_ptr<scalar_t>();
      total += outs[j].numel();
    }
    tab.begin[S] = total;
    if (total == 0) return;
    stages_forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, tab, rois_c.data_ptr<scalar_t>(), feats[0].size(0), sampling_ratio, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The kernel writes NCHW; channels-last crops are a layout copy here (the CPU kernel writes them
  // directly). The mask head asks for them on the CPU only.
  if (channels_last)
    for (auto& o : outs) o = o.contiguous(at::MemoryFormat::ChannelsLast);
  return outs;
}

std::vector<at::Tensor> roi_align_stages_backward_cuda(
    at::TensorList grads, const at::Tensor& rois, at::IntArrayRef stage_levels, at::ArrayRef<double> spatial_scales,
    int64_t batch_size, at::IntArrayRef channels, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_stages_backward";
  check_common_cuda(rois, c10::nullopt, op);
  const int64_t L = static_cast<int64_t>(spatial_scales.size());
  check_stages_backward(grads, rois, stage_levels, L, op);
  TORCH_CHECK_VALUE(L <= kMaxLevels && static_cast<int64_t>(channels.size()) == L &&
                        static_cast<int64_t>(heights.size()) == L && static_cast<int64_t>(widths.size()) == L,
                    op, ": channels/heights/widths must have one entry per level");
  c10::cuda::CUDAGuard guard(rois.device());
  at::globalContext().alertNotDeterministic("roi_align_stages_backward_cuda");
  // Accumulated in the op-math type (float for half and bfloat16), cast once at the end, as on the CPU;
  // the incoming gradients are read in that type too.
  const auto acc_type = at::toOpMathType(rois.scalar_type());
  std::vector<at::Tensor> result;
  for (int64_t l = 0; l < L; ++l) {
    result.push_back(at::zeros({batch_size, channels[l], heights[l], widths[l]}, rois.options().dtype(acc_type)));
  }
  std::vector<at::Tensor> gs;
  for (size_t j = 0; j < grads.size(); ++j) {
    const auto& g = grads[j];
    gs.push_back(g.to(acc_type).contiguous());
  }
  const auto rois_c = rois.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "roi_align_stages_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    Table<Acc> tab{};
    tab.num = static_cast<int>(gs.size());
    for (int64_t l = 0; l < L; ++l) {
      tab.data[l] = result[l].data_ptr<Acc>();
      tab.channels[l] = channels[l];
      tab.height[l] = heights[l];
      tab.width[l] = widths[l];
      tab.scale[l] = spatial_scales[l];
    }
    int64_t total = 0;
    for (size_t j = 0; j < gs.size(); ++j) {
      tab.begin[j] = total;
      tab.level[j] = stage_levels[j];
      const bool empty = gs[j].dim() != 4 || gs[j].numel() == 0;
      tab.size[j] = empty ? 1 : gs[j].size(2);
      tab.out[j] = empty ? nullptr : gs[j].data_ptr<Acc>();
      if (!empty) {
        TORCH_CHECK_VALUE(gs[j].size(1) == channels[stage_levels[j]], op, ": grads[", j, "] has ", gs[j].size(1),
                          " channels, expected ", channels[stage_levels[j]]);
      }
      total += empty ? 0 : gs[j].numel();
    }
    tab.begin[gs.size()] = total;
    if (total == 0) return;
    stages_backward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, tab, rois_c.data_ptr<scalar_t>(), batch_size, sampling_ratio, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cast_all(result, rois.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CUDA, m) {
  m.impl("roi_align_multilevel", &roi_align_multilevel_cuda);
  m.impl("roi_align_multilevel_backward", &roi_align_multilevel_backward_cuda);
  m.impl("roi_align_stages", &roi_align_stages_cuda);
  m.impl("roi_align_stages_backward", &roi_align_stages_backward_cuda);
}

}  // namespace roi_align
}  // namespace dynamask
