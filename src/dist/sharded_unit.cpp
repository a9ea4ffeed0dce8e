// Sharded units: shard storage, gathers with accounting, typed views, and the prefetching
// pipeline over a step's schedule.
#include "dist/sharded_unit.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>

#include "quant/tensor_io.h"

namespace qlora::dist {

at::Tensor byte_view(const at::Tensor& buffer, size_t offset, size_t nbytes, at::ScalarType dtype,
                     const std::vector<int64_t>& shape) {
  const size_t item = c10::elementSize(dtype);
  if (!buffer.is_contiguous() || offset % item != 0 || nbytes % item != 0)
    throw std::invalid_argument("byte_view: offset " + std::to_string(offset) + " / nbytes " +
                                std::to_string(nbytes) + " not a multiple of the itemsize " +
                                std::to_string(item));
  const size_t have = static_cast<size_t>(buffer.numel()) * buffer.element_size();
  if (offset + nbytes > have)
    throw std::invalid_argument("byte_view: bytes [" + std::to_string(offset) + ", " +
                                std::to_string(offset + nbytes) + ") beyond a buffer of " +
                                std::to_string(have));
  const at::Tensor bytes = buffer.view({-1}).view(at::kByte);
  return bytes.narrow(0, static_cast<int64_t>(offset), static_cast<int64_t>(nbytes))
      .view(dtype)
      .view(shape);
}

// ------------------------------------------------------------------------------------------
// BufferPool

at::Tensor BufferPool::acquire(int64_t numel, at::ScalarType dtype, at::Device device) {
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  // A buffer more than twice the request is not taken: a block unit parked in the embedding's
  // buffer would make the head's gather allocate a second buffer of that size (125 MiB more at
  // the head of a 1B model).
  size_t best = free_.size();
  for (size_t i = 0; i < free_.size(); ++i)
    if (free_[i].device() == device && free_[i].numel() >= nbytes &&
        free_[i].numel() / 2 <= nbytes &&
        (best == free_.size() || free_[i].numel() < free_[best].numel()))
      best = i;
  at::Tensor bytes;
  if (best < free_.size()) {
    bytes = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
  } else {
    // Capacity rounded up to a multiple of 1/32 of the next power of two (at most ~3% more,
    // pages never written stay unmapped): units of nearly one size share buffers, e.g. the head
    // (norm + lm_head) fits the embedding's buffer.
    int64_t pow2 = 1;
    while (pow2 < nbytes) pow2 *= 2;
    const int64_t granule = std::max<int64_t>(64, pow2 / 32);
    const int64_t capacity = (nbytes + granule - 1) / granule * granule;
    bytes = at::empty({capacity}, at::TensorOptions().dtype(at::kByte).device(device));
  }
  return bytes.narrow(0, 0, nbytes).view(dtype);
}

void BufferPool::give_back(const at::Tensor& buffer) {
  // The whole allocation behind the view goes back.
  const auto& storage = buffer.storage();
  at::Tensor bytes = at::empty({0}, buffer.options().dtype(at::kByte));
  bytes.set_(storage, 0, {static_cast<int64_t>(storage.nbytes())}, {1});
  free_.push_back(bytes);
  if (free_.size() > max_free_) {
    auto smallest = std::min_element(free_.begin(), free_.end(), [](const auto& a, const auto& b) {
      return a.numel() < b.numel();
    });
    free_.erase(smallest);
  }
}

size_t BufferPool::free_bytes() const {
  size_t n = 0;
  for (const at::Tensor& t : free_) n += static_cast<size_t>(t.numel());
  return n;
}

// ------------------------------------------------------------------------------------------
// ShardedUnit

ShardedUnit::ShardedUnit(UnitLayout layout, at::ScalarType storage, const DeviceContext& device,
                         bool sharded, ShardStats* stats, bool is_base, BufferPool* pool)
    : layout_(std::move(layout)),
      storage_(storage),
      comm_(&device.comm()),
      sharded_(sharded),
      stats_(stats),
      is_base_(is_base),
      pool_(pool) {
  const size_t item = itemsize();
  const int n = sharded_ ? comm_->world_size() : 1;
  padded_numel_ = layout_.padded_numel(item, n);
  shard_numel_ = layout_.shard_numel(item, n);
  shard_ = device.zeros({shard_numel_}, storage_);
  if (stats_ && is_base_) stats_->resident_bytes += static_cast<size_t>(shard_numel_) * item;
}

size_t ShardedUnit::itemsize() const { return c10::elementSize(storage_); }

std::pair<size_t, size_t> ShardedUnit::owned_bytes() const {
  if (!sharded_) return {0, layout_.nbytes};
  return layout_.owned_bytes(itemsize(), comm_->rank(), comm_->world_size());
}

at::Tensor ShardedUnit::shard_bytes() { return shard_.view(at::kByte); }

ShardedUnit::Gathered ShardedUnit::gather_start() {
  Gathered g;
  const size_t item = itemsize();
  if (!sharded_ || comm_->world_size() == 1) {
    g.buffer = shard_;  // the whole unit is here already
  } else {
    g.buffer = pool_ ? pool_->acquire(padded_numel_, storage_, shard_.device())
                     : at::empty({padded_numel_}, shard_.options());
    comm_->detail_set("gather of " + layout_.name);  // named by the watchdog if it hangs
    g.work = comm_->all_gather_start(shard_, g.buffer);
    if (stats_)
      stats_->bytes_gathered += static_cast<size_t>(padded_numel_ - shard_numel_) * item;
  }
  if (stats_) {
    ++stats_->gathers;
    if (is_base_) {
      const size_t gathered = sharded_ ? static_cast<size_t>(padded_numel_) * item : 0;
      stats_->live_gathered_bytes += gathered;
      stats_->peak_gathered_bytes =
          std::max(stats_->peak_gathered_bytes, stats_->live_gathered_bytes);
    }
  }
  return g;
}

void ShardedUnit::release(Gathered& g) {
  if (!g.buffer.defined()) return;
  g.work.wait();
  const bool own_buffer = sharded_ && comm_->world_size() > 1;
  if (stats_ && is_base_ && sharded_)
    stats_->live_gathered_bytes -= static_cast<size_t>(padded_numel_) * itemsize();
  if (pool_ && own_buffer) pool_->give_back(g.buffer);
  g.buffer = at::Tensor();
}

at::Tensor ShardedUnit::segment_view(const at::Tensor& buffer, const Segment& s) const {
  const at::ScalarType dtype = quant::scalar_type_from(s.dtype);
  if (s.kind == SegmentKind::packed) {
    // Packed codes viewed as the storage dtype [ceil(nbytes / itemsize), 1], the bitsandbytes
    // storage layout; the aligned segment has the zero bytes that round it up.
    const size_t item = itemsize();
    const size_t nbytes = (s.nbytes + item - 1) / item * item;
    return byte_view(buffer, s.offset, nbytes, storage_, {static_cast<int64_t>(nbytes / item), 1});
  }
  return byte_view(buffer, s.offset, s.nbytes, dtype, s.shape);
}

// ------------------------------------------------------------------------------------------
// UnitPipeline

UnitPipeline::UnitPipeline(std::vector<std::vector<ShardedUnit*>> schedule, int prefetch)
    : schedule_(std::move(schedule)), prefetch_(prefetch) {
  if (prefetch_ < 0 || prefetch_ > 2)
    throw std::invalid_argument("prefetch " + std::to_string(prefetch_) + " must be 0, 1 or 2");
}

void UnitPipeline::start(size_t k) {
  Entry e;
  e.position = k;
  for (ShardedUnit* u : schedule_[k]) e.gathered.push_back(u->gather_start());
  in_flight_.push_back(std::move(e));
}

UnitPipeline::Entry& UnitPipeline::entry(size_t k) {
  for (Entry& e : in_flight_)
    if (e.position == k) return e;
  throw std::logic_error("UnitPipeline: position " + std::to_string(k) + " is not in flight");
}

const std::vector<at::Tensor>& UnitPipeline::acquire(size_t k) {
  if (k >= schedule_.size())
    throw std::logic_error("UnitPipeline: position " + std::to_string(k) + " past the schedule");
  const size_t last = std::min(schedule_.size() - 1, k + static_cast<size_t>(prefetch_));
  // Start in schedule order: the communication thread runs collectives in the order started,
  // and every rank starts them in this same order.
  while (next_to_start_ <= k) start(next_to_start_++);
  Entry& e = entry(k);
  for (ShardedUnit::Gathered& g : e.gathered) g.work.wait();
  e.waited = true;
  e.buffers.clear();
  for (ShardedUnit::Gathered& g : e.gathered) e.buffers.push_back(g.buffer);
  // The prefetch goes out after the wait, as in DESIGN.md section 2 ("wait gather(i); start
  // gather(i+1)"), so at most 1 + prefetch positions are alive at once.
  while (next_to_start_ <= last) start(next_to_start_++);
  return e.buffers;
}

void UnitPipeline::release(size_t k) {
  for (auto it = in_flight_.begin(); it != in_flight_.end(); ++it) {
    if (it->position != k) continue;
    it->buffers.clear();
    for (size_t j = 0; j < it->gathered.size(); ++j) schedule_[k][j]->release(it->gathered[j]);
    in_flight_.erase(it);
    return;
  }
  throw std::logic_error("UnitPipeline: release of position " + std::to_string(k) +
                         " that is not in flight");
}

void UnitPipeline::drain() {
  while (!in_flight_.empty()) release(in_flight_.front().position);
}

}  // namespace qlora::dist
