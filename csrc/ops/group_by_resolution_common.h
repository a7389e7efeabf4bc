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

// Turns counts[k] (the number of RoIs with resolution index k) into the first output position of
// index k, in place: the RoIs of every higher index come first. O(K); K is tiny (4 in DynaMask).
template <typename Count>
DYNAMASK_INLINE void counts_to_bucket_starts(Count* counts, int64_t num_resolutions) {
  Count start = 0;
  for (int64_t k = num_resolutions - 1; k >= 0; --k) {
    const Count n = counts[k];
    counts[k] = start;
    start += n;
  }
}

}  // namespace group_by_resolution
}  // namespace dynamask
