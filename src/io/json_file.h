// Reading a small JSON file a user or a run of ours wrote (adapter_config.json,
// trainer_state.json): one line naming the file when it cannot be read or is not JSON.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>

namespace qlora::io {

// std::invalid_argument "<path>: cannot be read" or "<path>: not valid JSON (<parser's words>)".
nlohmann::json json_file_read(const std::filesystem::path& path);

}  // namespace qlora::io
