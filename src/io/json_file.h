// Reading a small JSON file a user or a run of ours wrote (adapter_config.json,
// trainer_state.json), or any file's bytes: one line naming the file when it cannot be read or
// is not JSON.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace qlora::io {

// std::invalid_argument "<path>: cannot be read" or "<path>: not valid JSON (<parser's words>)".
nlohmann::json json_file_read(const std::filesystem::path& path);

// The bytes of a file; std::invalid_argument "<path>: cannot be read (<what>)" when it cannot
// be opened (`what` says what the file was for; "" leaves the parentheses out).
std::string file_read(const std::filesystem::path& path, const std::string& what = "");

}  // namespace qlora::io
