// Deterministic data-parallel sampling (see sampler.h): a splitmix64-driven Fisher-Yates shuffle
// per epoch, so the order is fixed by (seed, epoch) on every platform and every world size.
#include "dist/sampler.h"

#include "io/hash.h"

#include <numeric>
#include <stdexcept>
#include <string>

namespace qlora::dist {

using io::splitmix64;

DistributedSampler::DistributedSampler(int64_t num_rows, int64_t micro_batch, int64_t grad_accum,
                                       int rank, int world_size, uint64_t seed, bool shuffle)
    : num_rows_(num_rows),
      micro_batch_(micro_batch),
      grad_accum_(grad_accum),
      rank_(rank),
      world_size_(world_size),
      seed_(seed),
      shuffle_(shuffle) {
  if (micro_batch < 1 || grad_accum < 1 || world_size < 1 || rank < 0 || rank >= world_size)
    throw std::invalid_argument("sampler: micro batch, gradient accumulation and world size must "
                                "be >= 1 and the rank inside the world");
  if (num_rows < global_batch())
    throw std::invalid_argument(
        "the dataset has " + std::to_string(num_rows) + " rows, fewer than one global batch of " +
        std::to_string(global_batch()) + " (per_device_train_batch_size " +
        std::to_string(micro_batch) + " x gradient_accumulation_steps " +
        std::to_string(grad_accum) + " x " + std::to_string(world_size) + " ranks)");
}

const std::vector<int64_t>& DistributedSampler::permutation(int64_t epoch) const {
  if (epoch == cached_epoch_) return perm_;
  perm_.resize(static_cast<size_t>(num_rows_));
  std::iota(perm_.begin(), perm_.end(), int64_t{0});
  if (shuffle_) {
    uint64_t state = seed_ * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch) + 1;
    for (int64_t i = num_rows_ - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(i + 1));
      std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
    }
  }
  cached_epoch_ = epoch;
  return perm_;
}

std::vector<int64_t> DistributedSampler::rows(int64_t step, int64_t micro) const {
  if (micro < 0 || micro >= grad_accum_)
    throw std::invalid_argument("sampler: micro-step " + std::to_string(micro) + " out of range");
  const int64_t spe = steps_per_epoch();
  const std::vector<int64_t>& perm = permutation(step / spe);
  const int64_t base = (step % spe) * global_batch() +
                       static_cast<int64_t>(rank_) * micro_batch_ * grad_accum_ +
                       micro * micro_batch_;
  return std::vector<int64_t>(perm.begin() + base, perm.begin() + base + micro_batch_);
}

std::vector<int64_t> DistributedSampler::global_rows(int64_t step) const {
  const int64_t spe = steps_per_epoch();
  const std::vector<int64_t>& perm = permutation(step / spe);
  const int64_t base = (step % spe) * global_batch();
  return std::vector<int64_t>(perm.begin() + base, perm.begin() + base + global_batch());
}

}  // namespace qlora::dist
