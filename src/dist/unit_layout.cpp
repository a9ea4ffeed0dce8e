// The layout table of sharded units: aligned segments, padding to the world size, owned byte
// ranges, and the JSON form stored next to the unit bytes in a quantized HDF5 model.
#include "dist/unit_layout.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "io/shape_str.h"
#include "quant4_format.h"

namespace qlora::dist {

namespace {

// Sizes come from the model description or from a unit file's layout table: a table written
// by hand can hold any shape, so every product and sum is checked (2^62 bytes is far beyond any
// unit and keeps the alignment and the offsets below free of overflow).
constexpr size_t kMaxUnitBytes = size_t{1} << 62;

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

int64_t shape_numel(const std::vector<int64_t>& shape, const std::string& seg_name) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("negative dimension in a unit segment shape");
    if (__builtin_mul_overflow(n, d, &n) || static_cast<uint64_t>(n) > kMaxUnitBytes)
      throw std::invalid_argument("segment '" + seg_name + "' shape " + io::shape_str(shape) +
                                  " has more elements than a unit can hold (2^62 bytes)");
  }
  return n;
}

size_t segment_nbytes(SegmentKind kind, io::DType dtype, const std::vector<int64_t>& shape,
                      const std::string& seg_name) {
  const int64_t n = shape_numel(shape, seg_name);
  if (kind == SegmentKind::packed) return static_cast<size_t>((n + 1) / 2);
  const size_t nbytes = static_cast<size_t>(n) * io::dtype_size(dtype);  // n <= 2^62, size <= 8
  if (nbytes > kMaxUnitBytes)
    throw std::invalid_argument("segment '" + seg_name + "' shape " + io::shape_str(shape) + " of " +
                                io::dtype_name(dtype) + " is more than a unit can hold (2^62 bytes)");
  return nbytes;
}

}  // namespace

const char* segment_kind_name(SegmentKind kind) {
  switch (kind) {
    case SegmentKind::packed: return "packed";
    case SegmentKind::absmax: return "absmax";
    case SegmentKind::nested_absmax: return "nested_absmax";
    case SegmentKind::nested_offset: return "nested_offset";
    case SegmentKind::tensor: return "tensor";
  }
  throw std::invalid_argument("unknown segment kind " + std::to_string(static_cast<int>(kind)));
}

SegmentKind segment_kind_from_name(const std::string& name) {
  for (SegmentKind k : {SegmentKind::packed, SegmentKind::absmax, SegmentKind::nested_absmax,
                        SegmentKind::nested_offset, SegmentKind::tensor})
    if (name == segment_kind_name(k)) return k;
  throw std::invalid_argument("unknown segment kind '" + name +
                              "' (expected packed, absmax, nested_absmax, nested_offset, tensor)");
}

bool Segment::operator==(const Segment& o) const {
  return name == o.name && kind == o.kind && dtype == o.dtype && shape == o.shape &&
         offset == o.offset && nbytes == o.nbytes;
}

bool UnitLayout::operator==(const UnitLayout& o) const {
  return name == o.name && segments == o.segments && nbytes == o.nbytes;
}

const Segment& UnitLayout::add(const std::string& seg_name, SegmentKind kind, io::DType dtype,
                               const std::vector<int64_t>& shape) {
  if (has(seg_name))
    throw std::invalid_argument("unit '" + name + "' already has a segment '" + seg_name + "'");
  Segment s;
  s.name = seg_name;
  s.kind = kind;
  s.dtype = dtype;
  s.shape = shape;
  s.offset = nbytes;
  s.nbytes = segment_nbytes(kind, dtype, shape, seg_name);
  if (s.nbytes > kMaxUnitBytes - s.offset)
    throw std::invalid_argument("unit '" + name + "' would be more than 2^62 bytes with segment '" +
                                seg_name + "'");
  nbytes = align_up(s.offset + s.nbytes, kSegmentAlign);
  segments.push_back(std::move(s));
  return segments.back();
}

bool UnitLayout::has(const std::string& seg_name) const {
  return std::any_of(segments.begin(), segments.end(),
                     [&](const Segment& s) { return s.name == seg_name; });
}

const Segment& UnitLayout::segment(const std::string& seg_name) const {
  for (const Segment& s : segments)
    if (s.name == seg_name) return s;
  throw std::out_of_range("unit '" + name + "' has no segment '" + seg_name + "'");
}

int64_t UnitLayout::numel(size_t itemsize) const {
  if (itemsize == 0 || kSegmentAlign % itemsize != 0)
    throw std::invalid_argument("unit storage itemsize " + std::to_string(itemsize) +
                                " does not divide the segment alignment 64");
  return static_cast<int64_t>(nbytes / itemsize);
}

int64_t UnitLayout::padded_numel(size_t itemsize, int world_size) const {
  if (world_size < 1) throw std::invalid_argument("world size must be >= 1");
  const int64_t n = numel(itemsize);
  return (n + world_size - 1) / world_size * world_size;
}

int64_t UnitLayout::shard_numel(size_t itemsize, int world_size) const {
  return padded_numel(itemsize, world_size) / world_size;
}

std::pair<size_t, size_t> UnitLayout::owned_bytes(size_t itemsize, int rank,
                                                  int world_size) const {
  const size_t shard_bytes = static_cast<size_t>(shard_numel(itemsize, world_size)) * itemsize;
  const size_t begin = std::min(nbytes, static_cast<size_t>(rank) * shard_bytes);
  const size_t end = std::min(nbytes, begin + shard_bytes);
  return {begin, end};
}

void unit_add_quantized(UnitLayout& unit, const std::string& name,
                        const std::vector<int64_t>& shape, int32_t blocksize, bool double_quant) {
  const int64_t n = shape_numel(shape, name);
  const int64_t blocks = kernels::num_blocks(n, blocksize);
  unit.add(name, SegmentKind::packed, io::DType::U8, shape);
  if (double_quant) {
    unit.add(name + ".absmax", SegmentKind::absmax, io::DType::U8, {blocks});
    unit.add(name + ".nested_absmax", SegmentKind::nested_absmax, io::DType::F32,
             {kernels::num_blocks(blocks, kernels::kNestedBlocksize)});
    unit.add(name + ".nested_offset", SegmentKind::nested_offset, io::DType::F32, {1});
  } else {
    unit.add(name + ".absmax", SegmentKind::absmax, io::DType::F32, {blocks});
  }
}

std::string units_to_json(const std::vector<UnitLayout>& units) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const UnitLayout& u : units) {
    nlohmann::ordered_json segs = nlohmann::ordered_json::array();
    for (const Segment& s : u.segments)
      segs.push_back({{"name", s.name},
                      {"kind", segment_kind_name(s.kind)},
                      {"dtype", io::dtype_name(s.dtype)},
                      {"shape", s.shape},
                      {"offset", s.offset},
                      {"nbytes", s.nbytes}});
    out.push_back({{"name", u.name}, {"nbytes", u.nbytes}, {"segments", segs}});
  }
  return out.dump();
}

namespace {

// object[key] as a non-negative integer: nlohmann's get<size_t>() would cast a float (2e118) or a
// negative number, undefined behaviour or a wrapped value.
size_t json_size(const nlohmann::json& object, const char* key) {
  const nlohmann::json& v = object.at(key);
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
    throw std::invalid_argument(std::string("'") + key + "' is " + std::string(v.type_name()) +
                                " " + (v.is_structured() ? "" : v.dump()) +
                                " (expected a non-negative integer)");
  return v.get<size_t>();
}

std::vector<int64_t> json_shape(const nlohmann::json& object) {
  const nlohmann::json& v = object.at("shape");
  if (!v.is_array()) throw std::invalid_argument("'shape' is not an array");
  std::vector<int64_t> shape;
  for (const nlohmann::json& d : v) {
    if (!d.is_number_integer() || (d.is_number_unsigned() && d.get<uint64_t>() > INT64_MAX))
      throw std::invalid_argument("'shape' holds " + std::string(d.type_name()) +
                                  " (expected integers)");
    shape.push_back(d.get<int64_t>());
  }
  return shape;
}

}  // namespace

std::vector<UnitLayout> units_from_json(const std::string& json, const std::string& where) {
  std::vector<UnitLayout> units;
  try {
    const nlohmann::json j = nlohmann::json::parse(json);
    if (!j.is_array()) throw std::invalid_argument("expected a JSON array of units");
    for (const auto& ju : j) {
      UnitLayout u;
      u.name = ju.at("name").get<std::string>();
      for (const auto& js : ju.at("segments")) {
        const Segment& s = u.add(js.at("name").get<std::string>(),
                                 segment_kind_from_name(js.at("kind").get<std::string>()),
                                 io::dtype_from_name(js.at("dtype").get<std::string>()),
                                 json_shape(js));
        const size_t offset = json_size(js, "offset"), nbytes = json_size(js, "nbytes");
        if (s.offset != offset || s.nbytes != nbytes)
          throw std::invalid_argument("segment '" + s.name + "' of unit '" + u.name +
                                      "' has offset/nbytes " + std::to_string(offset) + "/" +
                                      std::to_string(nbytes) + ", its shape and dtype give " +
                                      std::to_string(s.offset) + "/" + std::to_string(s.nbytes));
      }
      const size_t nbytes = json_size(ju, "nbytes");
      if (u.nbytes != nbytes)
        throw std::invalid_argument("unit '" + u.name + "' says nbytes " + std::to_string(nbytes) +
                                    ", its segments give " + std::to_string(u.nbytes));
      units.push_back(std::move(u));
    }
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(where + ": malformed unit layout table: " + e.what());
  } catch (const std::exception& e) {
    throw std::invalid_argument(where + ": unit layout table: " + e.what());
  }
  return units;
}

size_t units_owned_bytes(const std::vector<UnitLayout>& units, size_t itemsize, int rank,
                         int world_size) {
  size_t total = 0;
  for (const UnitLayout& u : units) {
    const auto [b, e] = u.owned_bytes(itemsize, rank, world_size);
    total += e - b;
  }
  return total;
}

size_t units_total_bytes(const std::vector<UnitLayout>& units) {
  size_t total = 0;
  for (const UnitLayout& u : units) total += u.nbytes;
  return total;
}

}  // namespace qlora::dist
