// The metrics plot: two panels (loss; learning rate) drawn by PLplot's pngcairo device. A build
// configured with -DQLORA_WITH_PLPLOT=OFF still reads and checks metrics.jsonl, then refuses.
#include "app/plot_command.h"

#ifdef QLORA_HAVE_PLPLOT
#include <plplot/plplot.h>
#endif

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace fs = std::filesystem;

namespace qlora::app {

namespace {

struct Series {
  std::vector<double> x, y;
};

#ifdef QLORA_HAVE_PLPLOT
static_assert(std::is_same<PLFLT, double>::value, "PLplot built with single-precision PLFLT");

void range(const std::vector<PLFLT>& v, PLFLT& lo, PLFLT& hi) {
  for (PLFLT a : v) {
    lo = std::min(lo, a);
    hi = std::max(hi, a);
  }
}

void pad(PLFLT& lo, PLFLT& hi) {
  if (hi <= lo) {
    lo -= 0.5;
    hi += 0.5;
  } else {
    const PLFLT m = 0.05 * (hi - lo);
    lo -= m;
    hi += m;
  }
}
#endif

}  // namespace

PlotReport plot_metrics(const std::string& out_dir, const std::string& png_path) {
  const fs::path metrics = fs::path(out_dir) / "metrics.jsonl";
  std::ifstream in(metrics);
  if (!in)
    throw std::invalid_argument(metrics.string() + ": cannot be read (expected the output_dir of "
                                "a qlora_dist train run)");
  Series loss, eval, lr;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      throw std::invalid_argument(metrics.string() + ":" + std::to_string(line_no) +
                                  ": not a JSON object");
    }
    if (!j.is_object() || !j.contains("step")) continue;
    const double step = j["step"].get<double>();
    if (j.contains("loss") && j["loss"].is_number()) {  // null: every step of it was skipped
      loss.x.push_back(step);
      loss.y.push_back(j["loss"].get<double>());
    }
    if (j.contains("learning_rate")) {
      lr.x.push_back(step);
      lr.y.push_back(j["learning_rate"].get<double>());
    }
    if (j.contains("eval_loss")) {
      eval.x.push_back(step);
      eval.y.push_back(j["eval_loss"].get<double>());
    }
  }
  if (loss.x.empty())
    throw std::invalid_argument(metrics.string() + ": no training steps logged yet (no \"loss\" lines)");

  const fs::path png = png_path.empty() ? fs::path(out_dir) / "metrics.png" : fs::path(png_path);
  if (!png.parent_path().empty() && !fs::is_directory(png.parent_path()))
    throw std::invalid_argument(png.string() + ": directory does not exist");
#ifndef QLORA_HAVE_PLPLOT
  throw std::runtime_error("this build has no PLplot (configured with -DQLORA_WITH_PLPLOT=OFF); "
                           "rebuild with libplplot-dev and plplot-driver-cairo installed to plot " +
                           metrics.string());
#else
  const fs::path tmp = png.parent_path() / ("." + png.filename().string() + ".tmp.png");

  PLFLT x0 = loss.x.front(), x1 = loss.x.front(), y0 = loss.y.front(), y1 = loss.y.front();
  range(loss.x, x0, x1);
  range(eval.x, x0, x1);
  range(loss.y, y0, y1);
  range(eval.y, y0, y1);
  pad(y0, y1);
  if (x1 <= x0) x1 = x0 + 1;
  PLFLT l0 = 0, l1 = 0;
  range(lr.y, l0, l1);
  if (l1 <= l0) l1 = l0 + 1e-12;

  plsdev("pngcairo");
  plsfnam(tmp.c_str());
  plspage(0, 0, 1200, 900, 0, 0);
  plscol0(0, 255, 255, 255);  // background
  plscol0(1, 30, 30, 30);     // axes and labels
  plscol0(2, 31, 119, 180);   // train loss
  plscol0(3, 214, 39, 40);    // eval loss
  plscol0(4, 44, 160, 44);    // learning rate
  plinit();
  plfont(1);

  pladv(0);
  plvpor(0.1, 0.95, 0.5, 0.92);
  plwind(x0, x1, y0, y1);
  plcol0(1);
  plbox("bcnstg", 0, 0, "bcnstvg", 0, 0);
  pllab("", "loss", ("loss: train (blue line), eval (red points)  " + out_dir).c_str());
  plcol0(2);
  plwidth(2.0);
  plline(static_cast<PLINT>(loss.x.size()), loss.x.data(), loss.y.data());
  if (!eval.x.empty()) {
    plcol0(3);
    plline(static_cast<PLINT>(eval.x.size()), eval.x.data(), eval.y.data());
    plssym(0, 1.5);
    plpoin(static_cast<PLINT>(eval.x.size()), eval.x.data(), eval.y.data(), 17);
  }

  plvpor(0.1, 0.95, 0.13, 0.37);
  plwind(x0, x1, l0, l1 + 0.05 * (l1 - l0));
  plcol0(1);
  plwidth(1.0);
  plbox("bcnstg", 0, 0, "bcnstvg", 0, 0);
  pllab("optimizer step", "learning rate", "");
  plcol0(4);
  plwidth(2.0);
  if (!lr.x.empty()) plline(static_cast<PLINT>(lr.x.size()), lr.x.data(), lr.y.data());
  plend();

  if (!fs::exists(tmp) || fs::file_size(tmp) == 0)
    throw std::runtime_error(png.string() + ": PLplot wrote nothing (is plplot-driver-cairo installed?)");
  fs::rename(tmp, png);
  return {png.string(), static_cast<int>(loss.x.size()), static_cast<int>(eval.x.size())};
#endif
}

}  // namespace qlora::app
