// JSON files: see json_file.h.
#include "io/json_file.h"

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

namespace qlora::io {

nlohmann::json json_file_read(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(path.string() + ": cannot be read");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace qlora::io
