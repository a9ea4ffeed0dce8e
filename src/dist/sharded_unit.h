// A unit on one rank: the shard it owns at rest, and the whole unit while gathered.
//   shard    [S]               storage dtype (the compute dtype; fp32 for LoRA units)
//   gathered [padded_numel]    = all_gather(shards), held only between gather and release
// With sharding off (`sharded = false`) the rank holds the whole unit and gathering is free.
// The pipeline walks a fixed schedule of unit groups (the same on every rank), keeping up to
// `prefetch` later groups' gathers in flight while the caller computes on the current one.
//
// Communication accounting (bytes this rank receives): a gather of a unit moves
// (N-1)/N * padded_numel * itemsize bytes into each rank; a reduce-scatter of an fp32 unit sends
// and receives (N-1)/N * padded_numel * 4 bytes per rank (ring algorithms; the MPI library may
// pick others, the count is the payload a rank must obtain).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <deque>
#include <vector>

#include "dist/communicator.h"
#include "dist/device_context.h"
#include "dist/unit_layout.h"

namespace qlora::dist {

struct ShardStats {
  size_t resident_bytes = 0;         // shards of base units held at rest
  size_t live_gathered_bytes = 0;    // gathered base units alive now
  size_t peak_gathered_bytes = 0;    // most gathered base-unit bytes alive at once
  size_t bytes_gathered = 0;         // received by all-gathers (base and LoRA units)
  size_t bytes_reduce_scattered = 0; // received by gradient reduce-scatters / all-reduces
  size_t gathers = 0;
};

// Gather buffers to reuse: a fresh buffer of a unit's size would come from new pages that fault
// on first touch, on every gather (a 100 MB unit: ~30 ms of page faults, as long as the copy).
// Keeps at most `max_free` released buffers; acquire takes the smallest that fits and is at
// most twice the request (a larger one stays for the unit it was made for), else allocates one
// rounded up to its size class (1/32 of the next power of two).
class BufferPool {
 public:
  explicit BufferPool(size_t max_free = 3) : max_free_(max_free) {}
  at::Tensor acquire(int64_t numel, at::ScalarType dtype, at::Device device);  // [numel], undefined contents
  void give_back(const at::Tensor& buffer);  // a tensor acquire returned (views into it dropped)
  size_t free_bytes() const;

 private:
  size_t max_free_;
  std::vector<at::Tensor> free_;  // uint8 [capacity]
};

class ShardedUnit {
 public:
  // `is_base`: counts towards resident / gathered base-weight bytes (LoRA units do not).
  // `pool` (may be null): where gather buffers come from and go back to.
  // The shard lives on `device` and is gathered through its communicator.
  ShardedUnit(UnitLayout layout, at::ScalarType storage, const DeviceContext& device, bool sharded,
              ShardStats* stats, bool is_base, BufferPool* pool = nullptr);

  const UnitLayout& layout() const { return layout_; }
  at::ScalarType storage() const { return storage_; }
  bool sharded() const { return sharded_; }
  int64_t padded_numel() const { return padded_numel_; }
  int64_t shard_numel() const { return shard_numel_; }
  size_t itemsize() const;
  // [begin, end) payload bytes that this rank's shard holds (the whole unit when not sharded).
  std::pair<size_t, size_t> owned_bytes() const;

  at::Tensor& shard() { return shard_; }  // [S] (or [padded_numel] when not sharded)
  // The shard's bytes as uint8, to fill at load: owned_bytes().second - first bytes are payload.
  at::Tensor shard_bytes();

  // Starts gathering into a fresh buffer; a unit may be gathered several times at once (each
  // call returns its own buffer id).
  struct Gathered {
    at::Tensor buffer;  // [padded_numel] storage dtype
    Work work;
  };
  Gathered gather_start();
  void release(Gathered& g);  // drops the buffer and updates the accounting

  // Typed views into a gathered buffer (which must stay alive while they are used).
  at::Tensor segment_view(const at::Tensor& buffer, const Segment& segment) const;
  at::Tensor segment_view(const at::Tensor& buffer, const std::string& name) const {
    return segment_view(buffer, layout_.segment(name));
  }

 private:
  UnitLayout layout_;
  at::ScalarType storage_;
  Communicator* comm_;
  bool sharded_;
  ShardStats* stats_;
  bool is_base_;
  BufferPool* pool_;
  int64_t padded_numel_ = 0;
  int64_t shard_numel_ = 0;
  at::Tensor shard_;
};

// A uint8 / fp32 / ... view of `nbytes` bytes at `offset` of a contiguous tensor's storage,
// shaped `shape` (dtype must divide offset and nbytes).
at::Tensor byte_view(const at::Tensor& buffer, size_t offset, size_t nbytes, at::ScalarType dtype,
                     const std::vector<int64_t>& shape);

// The schedule of a step: position k uses the units schedule[k] (e.g. a block's base unit and
// its LoRA unit). acquire(k) makes sure the gathers of positions k..k+prefetch have started,
// waits for position k and returns its buffers (in the order of schedule[k]); release(k) drops
// them. Positions must be acquired in order 0, 1, 2, ... and each released before the one after
// next is acquired.
class UnitPipeline {
 public:
  UnitPipeline(std::vector<std::vector<ShardedUnit*>> schedule, int prefetch);
  const std::vector<at::Tensor>& acquire(size_t k);
  void release(size_t k);
  size_t size() const { return schedule_.size(); }
  // Releases whatever is still in flight (waits for it first): call before a step ends.
  void drain();

 private:
  struct Entry {
    size_t position = 0;
    std::vector<ShardedUnit::Gathered> gathered;
    std::vector<at::Tensor> buffers;
    bool waited = false;
  };
  void start(size_t k);
  Entry& entry(size_t k);

  std::vector<std::vector<ShardedUnit*>> schedule_;
  int prefetch_;
  size_t next_to_start_ = 0;
  std::deque<Entry> in_flight_;
};

}  // namespace qlora::dist
