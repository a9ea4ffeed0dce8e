// Metric sinks of a training run on rank 0: metrics.jsonl (one JSON object per line; a resumed
// run drops the lines the interrupted one wrote after its checkpoint) and TensorBoard event files
// under output_dir/runs (scalars train/<key> and eval/<key>). Keys are in README "Outputs".
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "train/tensorboard.h"

namespace qlora::train {

// The set of sinks ([output] report_to).
struct ReportTo {
  bool jsonl = true;
  bool tensorboard = false;
};

class MetricsLog {
 public:
  // Disabled: writes nothing. Enabled: keeps the lines of `file` with step <= resume_step.
  MetricsLog(const std::filesystem::path& file, bool enabled, int64_t resume_step);
  void write(const nlohmann::ordered_json& record);

 private:
  bool enabled_;
  std::string path_;
  std::ofstream out_;
};

// Writes a record to the jsonl file and, when enabled, to TensorBoard.
class MetricSinks {
 public:
  // `main_rank`: only rank 0 writes; on other ranks every write is a no-op.
  MetricSinks(const std::filesystem::path& dir, const ReportTo& report_to, bool main_rank,
              const std::string& jsonl_name, int64_t resume_step);
  void write(const nlohmann::ordered_json& record);

 private:
  MetricsLog jsonl_;
  std::optional<TensorBoardWriter> tensorboard_;
};

int64_t max_rss_bytes();  // this process's peak resident set

}  // namespace qlora::train
