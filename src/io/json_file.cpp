// JSON files: see json_file.h.
#include "io/json_file.h"

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

namespace qlora::io {

std::string file_read(const std::filesystem::path& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw std::invalid_argument(path.string() + ": cannot be read" +
                                (what.empty() ? "" : " (" + what + ")"));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

nlohmann::json json_file_read(const std::filesystem::path& path) {
  const std::string text = file_read(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace qlora::io
