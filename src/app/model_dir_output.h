// Writing a model directory safely: the output must be absent or empty, everything is written
// into a hidden sibling first and renamed into place only when complete, so a failure (or a
// crash) never leaves a half-written model or touches an earlier output.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace qlora::app {

// A Hugging Face model directory given as input: throws std::invalid_argument "<dir>: model
// directory does not exist", or "... is a file, not a model directory" when it names a file.
void model_dir_require(const std::string& model_dir);

// The normalized output path ("q/" names q); throws std::invalid_argument when out_dir exists
// and is not an empty directory.
std::filesystem::path output_dir_check(const std::string& out_dir);

// Calls fill(tmp) with a fresh hidden sibling directory of `out`, then renames it to `out`.
// On any exception the sibling is removed and the exception passes on.
void output_dir_commit(const std::filesystem::path& out,
                       const std::function<void(const std::filesystem::path&)>& fill);

// Copies the side files of a Hugging Face model directory (tokenizer, generation config, ...):
// every regular file except config.json, *.safetensors*, and hidden files.
void copy_side_files(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace qlora::app
