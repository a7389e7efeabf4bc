// CPU kernel of group_by_resolution: a stable counting sort (one counting pass, one scatter pass).
// Serial on purpose: R is at most a few thousand RoIs, far below where threads pay off.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/group_by_resolution_checks.h"
#include "ops/group_by_resolution_common.h"

namespace dynamask {
namespace group_by_resolution {
namespace {

std::tuple<at::Tensor, at::Tensor> group_by_resolution_cpu(const at::Tensor& choice, int64_t num_resolutions) {
  check_inputs(choice, num_resolutions);
  const auto c = choice.contiguous();
  const int64_t R = c.size(0);
  const int64_t* p = c.data_ptr<int64_t>();
  auto counts = at::zeros({num_resolutions}, c.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK_VALUE(valid_choice(p[i], num_resolutions), "group_by_resolution: choice[", i, "] is ", p[i],
                      " but must be in [0, ", num_resolutions, ")");
    ++cnt[p[i]];
  }
  std::vector<int64_t> next(cnt, cnt + num_resolutions);
  counts_to_bucket_starts(next.data(), num_resolutions);
  auto perm = at::empty({R}, c.options());
  int64_t* out = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) out[next[p[i]]++] = i;
  return {perm, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamask, CPU, m) { m.impl("group_by_resolution", &group_by_resolution_cpu); }

}  // namespace group_by_resolution
}  // namespace dynamask
