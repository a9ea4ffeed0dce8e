// Fuzzes the unit layout table a quantized HDF5 unit file stores as its "layout_json" attribute
// (dist::units_from_json: units, segments, kinds, dtypes, shapes, offsets and sizes checked).
// The input is the attribute's text. A table the reader accepts must come back unchanged through
// units_to_json. Bad input must be std::invalid_argument, which units_from_json documents.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "dist/unit_layout.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<dist::UnitLayout> units;
  try {
    units = dist::units_from_json(text, "unit.h5");
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
    return 0;
  }
  const std::vector<dist::UnitLayout> again = dist::units_from_json(dist::units_to_json(units), "again");
  if (again != units) {
    std::fprintf(stderr, "unit_layout fuzz: units_to_json / units_from_json round trip differs\n");
    std::abort();
  }
  for (const dist::UnitLayout& u : units) {
    if (u.nbytes % dist::kSegmentAlign != 0) std::abort();
    for (int world = 1; world <= 3; ++world)
      for (int rank = 0; rank < world; ++rank) {
        const auto [begin, end] = u.owned_bytes(4, rank, world);
        if (begin > end || end > u.nbytes) std::abort();
      }
  }
  return 0;
}
