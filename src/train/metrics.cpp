// Metric sinks: see metrics.h.
#include "train/metrics.h"

#include "io/atomic_write.h"

#include <sys/resource.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace qlora::train {

MetricsLog::MetricsLog(const std::filesystem::path& file, bool enabled, int64_t resume_step)
    : enabled_(enabled) {
  if (!enabled_) return;
  std::vector<std::string> keep;
  if (std::filesystem::exists(file)) {
    std::ifstream in(file);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      try {
        if (nlohmann::json::parse(line).value("step", int64_t{0}) <= resume_step) keep.push_back(line);
      } catch (const nlohmann::json::exception&) {
        // a line cut by a crash: dropped
      }
    }
  }
  // Rewritten through a temporary file: a crash here leaves the old lines, never fewer.
  std::string text;
  for (const std::string& l : keep) text += l + "\n";
  io::file_write_atomic(file, text);
  path_ = file.string();
  out_.open(file, std::ios::app);
  if (!out_) throw std::runtime_error(path_ + ": cannot be opened (" + std::strerror(errno) + ")");
}

void MetricsLog::write(const nlohmann::ordered_json& record) {
  if (!enabled_) return;
  out_ << record.dump() << "\n";
  out_.flush();
  if (!out_) throw std::runtime_error(path_ + ": cannot be written (" + std::strerror(errno) + ")");
}

MetricSinks::MetricSinks(const std::filesystem::path& dir, const ReportTo& report_to,
                         bool main_rank, const std::string& jsonl_name, int64_t resume_step)
    : jsonl_(dir / jsonl_name, main_rank && report_to.jsonl, resume_step) {
  if (main_rank && report_to.tensorboard) tensorboard_.emplace((dir / "runs").string());
}

void MetricSinks::write(const nlohmann::ordered_json& record) {
  jsonl_.write(record);
  if (!tensorboard_) return;
  std::vector<std::pair<std::string, double>> values;
  for (const auto& [key, value] : record.items()) {
    if (key == "step" || !value.is_number()) continue;
    const bool is_eval = key.rfind("eval_", 0) == 0;
    values.emplace_back(is_eval ? "eval/" + key.substr(5) : "train/" + key, value.get<double>());
  }
  tensorboard_->scalars(record.at("step").get<int64_t>(), values);
}

int64_t max_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;
}

}  // namespace qlora::train
