// `qlora_dist plot OUT_DIR [--out FILE.png]`: loss (train and eval) and learning rate against the
// optimizer step, from OUT_DIR/metrics.jsonl, rendered with PLplot (pngcairo) into a PNG. In a
// build without PLplot (-DQLORA_WITH_PLPLOT=OFF) it checks metrics.jsonl, then throws
// std::runtime_error saying so.
#pragma once

#include <string>

namespace qlora::app {

struct PlotReport {
  std::string png;
  int train_points = 0;
  int eval_points = 0;
};

// Throws std::invalid_argument naming the file for a missing / unreadable metrics.jsonl, a line
// that is not JSON, or no training points; the PNG is written beside and renamed.
PlotReport plot_metrics(const std::string& out_dir, const std::string& png_path);

}  // namespace qlora::app
