#pragma once
// Counting-sort arithmetic of group_by_resolution, shared by the CPU and CUDA kernels.
//
// RoIs are ordered by descending resolution index, so bucket b = K - 1 - choice holds the RoIs of
// choice K - 1 - b, and bucket b starts at the number of RoIs in the buckets before it.
#include <cstdint>

#include "macros.h"

namespace dynamask {
namespace group_by_resolution {

DYNAMASK_INLINE bool valid_choice(int64_t c, int64_t num_resolutions) { return c >= 0 && c < num_resolutions; }

// First output position of the RoIs with resolution index k: the RoIs of every higher index come first.
// counts[j] is the number of RoIs with index j. O(K); K is tiny (4 in DynaMask).
template <typename Count>
DYNAMASK_INLINE int64_t bucket_start(const Count* counts, int64_t num_resolutions, int64_t k) {
  int64_t start = 0;
  for (int64_t j = num_resolutions - 1; j > k; --j) start += static_cast<int64_t>(counts[j]);
  return start;
}

}  // namespace group_by_resolution
}  // namespace dynamask
