// The data-parallel sampler: epoch e visits the rows in the order of a permutation drawn from
// (seed, e) alone; optimizer step s of the epoch takes the global batch
// perm[s*G, (s+1)*G) with G = micro_batch * grad_accum * world_size rows, and rank r takes the
// contiguous part [r*G/N, (r+1)*G/N) of it, micro-step k the rows [k*m, (k+1)*m) of that part.
// So the global batch of a step is the same whatever the world size; the last incomplete global
// batch of an epoch is dropped (drop_last).
#pragma once

#include <cstdint>
#include <vector>

namespace qlora::dist {

class DistributedSampler {
 public:
  DistributedSampler(int64_t num_rows, int64_t micro_batch, int64_t grad_accum, int rank,
                     int world_size, uint64_t seed, bool shuffle = true);

  int64_t global_batch() const { return micro_batch_ * grad_accum_ * world_size_; }
  int64_t steps_per_epoch() const { return num_rows_ / global_batch(); }
  // The rows of micro-step `micro` of optimizer step `step` (counted from the start of training,
  // over epochs) for this rank.
  std::vector<int64_t> rows(int64_t step, int64_t micro) const;
  // All rows of the global batch of `step` (every rank's), in rank-then-micro order.
  std::vector<int64_t> global_rows(int64_t step) const;
  int64_t epoch_of(int64_t step) const { return step / steps_per_epoch(); }

 private:
  const std::vector<int64_t>& permutation(int64_t epoch) const;
  int64_t num_rows_, micro_batch_, grad_accum_;
  int rank_, world_size_;
  uint64_t seed_;
  bool shuffle_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> perm_;
};

}  // namespace qlora::dist
