// Sharded units (DESIGN.md section 3): a unit is one flat buffer of bytes laid out by a table of
// segments (name, kind, byte offset, nbytes, dtype, shape), every segment starting on a 64-byte
// boundary. Every rank computes the same table from the model description alone; it does not
// depend on the world size. Only the padding does: viewed as `storage` elements (the compute
// dtype), the unit has numel = nbytes / itemsize elements, padded to a multiple of world_size,
//   padded_numel = ceil(numel / N) * N,  shard S = padded_numel / N,
// and rank r owns elements [r*S, (r+1)*S), i.e. bytes [r*S*itemsize, (r+1)*S*itemsize).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"

namespace qlora::dist {

constexpr size_t kSegmentAlign = 64;

enum class SegmentKind {
  packed,         // 4-bit codes, two per byte, first element in the high nibble (U8 [(n+1)/2])
  absmax,         // per-block scales: F32 [blocks], or U8 [blocks] codes when double quantized
  nested_absmax,  // F32 [ceil(blocks / 256)]
  nested_offset,  // F32 [1]: the mean subtracted before the nested quantization
  tensor,         // a plain tensor (norm, bias, embedding, lm_head, LoRA A / B)
};
const char* segment_kind_name(SegmentKind kind);
SegmentKind segment_kind_from_name(const std::string& name);  // throws std::invalid_argument

struct Segment {
  std::string name;  // e.g. "model.layers.0.self_attn.q_proj.weight.absmax"
  SegmentKind kind = SegmentKind::tensor;
  io::DType dtype = io::DType::U8;
  std::vector<int64_t> shape;  // of the piece (for packed: the original weight's [out, in])
  size_t offset = 0;           // bytes from the start of the unit; multiple of kSegmentAlign
  size_t nbytes = 0;

  bool operator==(const Segment& o) const;
};

struct UnitLayout {
  std::string name;  // "embed", "block.3", "head", "lora.3"
  std::vector<Segment> segments;
  size_t nbytes = 0;  // payload, a multiple of kSegmentAlign (so of every itemsize)

  // Appends a segment at the next aligned offset. For kind packed, `shape` is the weight's shape
  // and nbytes = (numel + 1) / 2; otherwise nbytes = numel * dtype size.
  const Segment& add(const std::string& name, SegmentKind kind, io::DType dtype,
                     const std::vector<int64_t>& shape);
  const Segment& segment(const std::string& name) const;  // throws std::out_of_range naming it
  bool has(const std::string& name) const;

  int64_t numel(size_t itemsize) const;  // nbytes / itemsize
  int64_t padded_numel(size_t itemsize, int world_size) const;
  int64_t shard_numel(size_t itemsize, int world_size) const;
  // The payload bytes rank `rank` owns: [begin, end), clamped to [0, nbytes) (may be empty for
  // the last ranks of a small unit).
  std::pair<size_t, size_t> owned_bytes(size_t itemsize, int rank, int world_size) const;

  bool operator==(const UnitLayout& o) const;
};

// The segments of a 4-bit quantized weight named `name` ("<module>.weight"): packed, absmax and,
// when double quantized, nested_absmax and nested_offset, named like bitsandbytes' checkpoint
// tensors (name, name.absmax, name.nested_absmax, name.nested_offset).
void unit_add_quantized(UnitLayout& unit, const std::string& name, const std::vector<int64_t>& shape,
                        int32_t blocksize, bool double_quant);

// The layout table as JSON (one object per unit, segments in order) and back; the reader checks
// offsets, alignment and sizes and throws std::invalid_argument naming `where`.
std::string units_to_json(const std::vector<UnitLayout>& units);
std::vector<UnitLayout> units_from_json(const std::string& json, const std::string& where);

// Bytes rank `rank` holds at rest and reads at load: the sum over units of its owned bytes.
size_t units_owned_bytes(const std::vector<UnitLayout>& units, size_t itemsize, int rank,
                         int world_size);
size_t units_total_bytes(const std::vector<UnitLayout>& units);

}  // namespace qlora::dist
