// Test driver for the packing reference test: reads samples from JSON, makes token rows with our
// rows_pad / rows_pack and writes them with token_rows_write, for pytest to compare with
// LLaMA-Factory's PackedSupervisedDatasetProcessor.
//   pack_probe IN.json OUT.h5 MODE CUTOFF_LEN PAD_ID VOCAB [GROUP]
//     IN:   [{"input_ids": [...], "labels": [...]}, ...]
//     MODE: pad | pack | neat
//   prints the PackReport as one JSON line on stdout.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/packing.h"

using namespace qlora;

int main(int argc, char** argv) {
  try {
    if (argc < 7) {
      std::fprintf(stderr, "usage: pack_probe IN.json OUT.h5 pad|pack|neat CUTOFF_LEN PAD_ID VOCAB [GROUP]\n");
      return 2;
    }
    std::ifstream in(argv[1]);
    const nlohmann::json j = nlohmann::json::parse(in);
    std::vector<data::Sample> samples;
    for (const auto& s : j)
      samples.push_back({s.at("input_ids").get<std::vector<int32_t>>(),
                         s.at("labels").get<std::vector<int32_t>>()});
    const std::string mode = argv[3];
    const int64_t cutoff = std::stoll(argv[4]);
    const auto pad = static_cast<int32_t>(std::stol(argv[5]));
    const int64_t vocab = std::stoll(argv[6]);
    const int64_t group = argc > 7 ? std::stoll(argv[7]) : data::kPackGroupSamples;
    data::PackReport report;
    data::TokenRows rows;
    if (mode == "pad") rows = data::rows_pad(samples, pad, &report);
    else if (mode == "pack" || mode == "neat")
      rows = data::rows_pack(samples, cutoff, mode == "neat", pad, &report, group);
    else throw std::invalid_argument("unknown mode " + mode + " (expected pad, pack or neat)");
    data::token_rows_write(argv[2], rows, vocab, pad, {{"packing", mode}});
    nlohmann::json r = {{"samples", report.samples}, {"samples_dropped", report.samples_dropped},
                        {"rows", report.rows},       {"tokens", report.tokens},
                        {"padding", report.padding}, {"efficiency", report.efficiency()}};
    std::printf("%s\n", r.dump().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pack_probe: error: %s\n", e.what());
    return 1;
  }
}
