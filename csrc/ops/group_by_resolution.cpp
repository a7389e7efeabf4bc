// Schema of the per-resolution dispatcher. Kernels: cpu/group_by_resolution_kernel.cpp,
// cuda/group_by_resolution_kernel.cu; fake kernel: dynamask/ops/_group_by_resolution_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dynamask, m) {
  // Stable counting sort of RoIs by descending resolution index. choice: [R] int64 in
  // [0, num_resolutions). Returns (perm [R], counts [num_resolutions]), both int64.
  m.def("group_by_resolution(Tensor choice, int num_resolutions) -> (Tensor perm, Tensor counts)");
}
