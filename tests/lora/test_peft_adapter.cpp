// PEFT adapter files: write -> read round trips, the exact key set of peft 0.21.2's
// adapter_config.json, reading an adapter saved by the real peft (data/peft_tiny, written by
// gen_peft_fixture.py), bf16/fp16 tensors, and every error naming the file and the key.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "lora/peft_adapter.h"
#include "quant/tensor_io.h"
#include "temp_dir.h"

#include "expect_error.h"

namespace qlora::lora {
namespace {

using io::testing::file_read;
using io::testing::file_write;
using io::testing::TempDir;
using json = nlohmann::json;
using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

const std::string kQ = "model.layers.0.self_attn.q_proj";
const std::string kDown = "model.layers.1.mlp.down_proj";

at::Tensor randn(at::IntArrayRef shape, uint64_t seed) {
  return at::randn(shape, at::detail::createCPUGenerator(seed),
                   at::TensorOptions().dtype(at::kFloat));
}

// Two layers of different shapes: q_proj 24 -> 24, down_proj 40 -> 24, rank 4.
PeftAdapter adapter_make() {
  PeftAdapter a;
  a.config = {4, 8.0, 0.05, true};
  a.target_modules = {"q_proj", "down_proj"};
  a.base_model_name_or_path = "org/tiny-llama";
  a.weights[kQ] = {randn({4, 24}, 1), randn({24, 4}, 2)};
  a.weights[kDown] = {randn({4, 40}, 3), randn({24, 4}, 4)};
  return a;
}

std::string key_a(const std::string& layer) {
  return "base_model.model." + layer + ".lora_A.weight";
}
std::string key_b(const std::string& layer) {
  return "base_model.model." + layer + ".lora_B.weight";
}

void json_write(const std::string& path, const json& j) { file_write(path, j.dump(2)); }

// Rewrites the weights file of `dir` with `tensors` (name -> tensor, written as given).
void weights_write(const std::string& dir,
                   const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  io::SafetensorsWriter writer;
  for (const auto& [name, t] : tensors) quant::writer_add(writer, name, t);
  writer.write(dir + "/adapter_model.safetensors");
}

TEST(PeftAdapter, RoundTrip) {
  TempDir tmp;
  const std::string dir = tmp.file("adapter/nested");  // created by the writer
  const PeftAdapter a = adapter_make();
  peft_adapter_write(dir, a);

  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    files.push_back(e.path().filename());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"}))
      << "no temporary files left behind";

  const PeftAdapter b = peft_adapter_read(dir);
  EXPECT_EQ(b.config.rank, 4);
  EXPECT_EQ(b.config.alpha, 8.0);
  EXPECT_EQ(b.config.dropout, 0.05);
  EXPECT_TRUE(b.config.use_rslora);
  EXPECT_EQ(b.target_modules, (std::vector<std::string>{"down_proj", "q_proj"}));
  EXPECT_EQ(b.base_model_name_or_path, "org/tiny-llama");
  ASSERT_EQ(b.weights.size(), 2u);
  for (const auto& [layer, ab] : a.weights) {
    ASSERT_TRUE(b.weights.count(layer)) << layer;
    EXPECT_TRUE(at::equal(b.weights.at(layer).first, ab.first)) << layer;
    EXPECT_TRUE(at::equal(b.weights.at(layer).second, ab.second)) << layer;
  }

  // Writing over an existing adapter replaces it.
  PeftAdapter c = a;
  c.config.alpha = 2.5;
  peft_adapter_write(dir, c);
  EXPECT_EQ(peft_adapter_read(dir).config.alpha, 2.5);
}

// The keys and defaults peft 0.21.2's save_pretrained writes for LoraConfig(r, lora_alpha,
// target_modules, task_type="CAUSAL_LM") (json.dumps(indent=2, sort_keys=True), no newline).
TEST(PeftAdapter, ConfigHasPeftKeysAndFormat) {
  TempDir tmp;
  PeftAdapter a = adapter_make();
  a.config = {4, 8.0, 0.0, false};
  a.base_model_name_or_path = "";
  peft_adapter_write(tmp.path(), a);
  const std::string text = file_read(tmp.file("adapter_config.json"));
  const json want = json::parse(R"({
    "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
    "auto_mapping": null, "base_model_name_or_path": null, "bias": "none", "corda_config": null,
    "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null,
    "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
    "kasa_config": null, "layer_replication": null, "layers_pattern": null,
    "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
    "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null,
    "megatron_core": "megatron.core", "modules_to_save": null, "monteclora_config": null,
    "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
    "rank_pattern": {}, "revision": null, "target_modules": ["down_proj", "q_proj"],
    "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
    "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": false,
    "velora_config": null})");
  EXPECT_EQ(json::parse(text), want);
  EXPECT_EQ(text, want.dump(2)) << "byte layout of json.dumps(indent=2, sort_keys=True)";
  EXPECT_EQ(text.substr(0, 34), "{\n  \"alora_invocation_tokens\": nul");
  EXPECT_EQ(text.back(), '}');
  EXPECT_TRUE(contains(text, "\"lora_alpha\": 8,\n")) << "a whole alpha is an integer, as peft's";
  EXPECT_TRUE(contains(text, "\"lora_dropout\": 0.0,\n"));
}

TEST(PeftAdapter, WeightsFileAsPeftWritesIt) {
  TempDir tmp;
  peft_adapter_write(tmp.path(), adapter_make());
  const auto file = io::SafetensorsFile::open(tmp.file("adapter_model.safetensors"));
  ASSERT_EQ(file->tensors().size(), 4u);
  EXPECT_EQ(file->metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  const std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {key_a(kQ), {4, 24}}, {key_b(kQ), {24, 4}}, {key_a(kDown), {4, 40}}, {key_b(kDown), {24, 4}}};
  for (const auto& [name, shape] : want) {
    const io::TensorInfo& info = file->at(name);
    EXPECT_EQ(info.dtype, io::DType::F32) << name;
    EXPECT_EQ(info.shape, shape) << name;
  }
}

// An adapter saved by peft 0.21.2 itself (see gen_peft_fixture.py): target_modules in set order,
// dropout 0.1, weights given by formulas.
TEST(PeftAdapter, ReadsAdapterSavedByPeft) {
  const PeftAdapter a = peft_adapter_read(std::string(QLORA_LORA_TEST_DATA) + "/peft_tiny");
  EXPECT_EQ(a.config.rank, 4);
  EXPECT_EQ(a.config.alpha, 8.0);
  EXPECT_EQ(a.config.dropout, 0.1);
  EXPECT_FALSE(a.config.use_rslora);
  EXPECT_EQ(a.base_model_name_or_path, "qlora-tests/tiny-llama");
  EXPECT_EQ(a.target_modules, (std::vector<std::string>{"down_proj", "q_proj", "v_proj"}));
  const std::map<std::string, std::pair<int64_t, int64_t>> shapes = {
      // layer -> (in, out)
      {"model.layers.0.self_attn.q_proj", {32, 32}},
      {"model.layers.0.self_attn.v_proj", {32, 16}},
      {"model.layers.0.mlp.down_proj", {48, 32}}};
  ASSERT_EQ(a.weights.size(), shapes.size());
  for (const auto& [layer, io_dims] : shapes) {
    ASSERT_TRUE(a.weights.count(layer)) << layer;
    const auto& [in, out] = io_dims;
    const at::Tensor& la = a.weights.at(layer).first;
    const at::Tensor& lb = a.weights.at(layer).second;
    const at::Tensor want_a = at::arange(4 * in, at::kFloat).reshape({4, in}) / 1024;
    const at::Tensor want_b = -at::arange(out * 4, at::kFloat).reshape({out, 4}) / 512;
    EXPECT_TRUE(at::equal(la, want_a)) << layer;
    EXPECT_TRUE(at::equal(lb, want_b)) << layer;
  }
}

TEST(PeftAdapter, ReadsHalfTensorsAsFp32AndPeftVariants) {
  TempDir tmp;
  const PeftAdapter a = adapter_make();
  peft_adapter_write(tmp.path(), a);
  const at::Tensor qa = a.weights.at(kQ).first.to(at::kBFloat16);
  const at::Tensor qb = a.weights.at(kQ).second.to(at::kHalf);
  weights_write(tmp.path(), {{key_a(kQ), qa}, {key_b(kQ), qb}});

  // A config as another peft might write it: unknown keys, target_modules as a regex string,
  // optional keys absent.
  json cfg = json::parse(file_read(tmp.file("adapter_config.json")));
  cfg["some_future_key"] = {{"x", 1}};
  cfg["target_modules"] = ".*\\.(q_proj|v_proj)";
  cfg["lora_alpha"] = 16.5;
  cfg.erase("use_rslora");
  cfg.erase("lora_dropout");
  json_write(tmp.file("adapter_config.json"), cfg);

  const PeftAdapter b = peft_adapter_read(tmp.path());
  EXPECT_EQ(b.config.alpha, 16.5);
  EXPECT_FALSE(b.config.use_rslora) << "peft's default";
  EXPECT_EQ(b.config.dropout, 0.0) << "peft's default";
  EXPECT_EQ(b.target_modules, (std::vector<std::string>{"q_proj"})) << "from the weights";
  ASSERT_EQ(b.weights.size(), 1u);
  EXPECT_EQ(b.weights.at(kQ).first.scalar_type(), at::kFloat);
  EXPECT_EQ(b.weights.at(kQ).second.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(b.weights.at(kQ).first, qa.to(at::kFloat)));
  EXPECT_TRUE(at::equal(b.weights.at(kQ).second, qb.to(at::kFloat)));
}

// Each case breaks one thing of a good adapter; the message must name the file and the key.
TEST(PeftAdapter, ReadErrorsNameFileAndKey) {
  struct Case {
    std::string what;
    std::function<void(const std::string& dir)> damage;
    std::vector<std::string> parts;  // the message must contain each
  };
  auto config_edit = [](const std::string& dir, const std::function<void(json&)>& edit) {
    json cfg = json::parse(file_read(dir + "/adapter_config.json"));
    edit(cfg);
    json_write(dir + "/adapter_config.json", cfg);
  };
  const PeftAdapter good = adapter_make();
  const at::Tensor qa = good.weights.at(kQ).first, qb = good.weights.at(kQ).second;
  const std::vector<Case> cases = {
      {"missing B",
       [&](const std::string& d) {
         weights_write(d, {{key_a(kQ), qa}});
       },
       {"adapter_model.safetensors", key_b(kQ), "missing"}},
      {"missing A",
       [&](const std::string& d) {
         weights_write(d, {{key_b(kQ), qb}});
       },
       {"adapter_model.safetensors", key_a(kQ), "missing"}},
      {"A rank 3",
       [&](const std::string& d) {
         weights_write(d, {{key_a(kQ), qa.slice(0, 0, 3)}, {key_b(kQ), qb}});
       },
       {"adapter_model.safetensors", key_a(kQ), "[3, 24]", "r = 4"}},
      {"B rank 5",
       [&](const std::string& d) {
         weights_write(d, {{key_a(kQ), qa}, {key_b(kQ), at::zeros({24, 5})}});
       },
       {"adapter_model.safetensors", key_b(kQ), "[24, 5]", "r = 4"}},
      {"int tensor",
       [&](const std::string& d) {
         weights_write(d, {{key_a(kQ), qa.to(at::kInt)}, {key_b(kQ), qb}});
       },
       {"adapter_model.safetensors", key_a(kQ), "I32"}},
      {"unknown tensor",
       [&](const std::string& d) {
         weights_write(d,
                       {{key_a(kQ), qa}, {key_b(kQ), qb}, {"base_model.model.lm_head.weight", qb}});
       },
       {"adapter_model.safetensors", "base_model.model.lm_head.weight", "not a LoRA weight"}},
      {"layer not targeted",
       [&](const std::string& d) {
         config_edit(d, [](json& c) { c["target_modules"] = {"q_proj"}; });
       },
       {"adapter_model.safetensors", kDown, "target_modules"}},
      {"peft_type",
       [&](const std::string& d) { config_edit(d, [](json& c) { c["peft_type"] = "IA3"; }); },
       {"adapter_config.json", "'peft_type'", "IA3", "LORA"}},
      {"no peft_type",
       [&](const std::string& d) { config_edit(d, [](json& c) { c.erase("peft_type"); }); },
       {"adapter_config.json", "'peft_type'", "missing"}},
      {"bias all",
       [&](const std::string& d) { config_edit(d, [](json& c) { c["bias"] = "all"; }); },
       {"adapter_config.json", "'bias'", "\"all\"", "none"}},
      {"r string",
       [&](const std::string& d) { config_edit(d, [](json& c) { c["r"] = "4"; }); },
       {"adapter_config.json", "'r'", "integer"}},
      {"r zero",
       [&](const std::string& d) { config_edit(d, [](json& c) { c["r"] = 0; }); },
       {"adapter_config.json", "rank 0"}},
      {"dora",
       [&](const std::string& d) { config_edit(d, [](json& c) { c["use_dora"] = true; }); },
       {"adapter_config.json", "'use_dora'", "DoRA"}},
      {"alpha_pattern",
       [&](const std::string& d) {
         config_edit(d, [](json& c) { c["alpha_pattern"] = {{"q_proj", 4}}; });
       },
       {"adapter_config.json", "'alpha_pattern'"}},
      {"not json",
       [&](const std::string& d) { file_write(d + "/adapter_config.json", "{\"r\": 4,"); },
       {"adapter_config.json", "not valid JSON"}},
      {"no config",
       [&](const std::string& d) { std::filesystem::remove(d + "/adapter_config.json"); },
       {"adapter_config.json", "not found"}},
  };
  for (const Case& c : cases) {
    TempDir tmp;
    peft_adapter_write(tmp.path(), good);
    c.damage(tmp.path());
    const std::string msg = invalid_argument_message([&] { peft_adapter_read(tmp.path()); });
    for (const std::string& part : c.parts)
      EXPECT_TRUE(contains(msg, part)) << c.what << ": '" << part << "' not in: " << msg;
    EXPECT_TRUE(contains(msg, tmp.path())) << c.what << ": the directory not in: " << msg;
  }
}

TEST(PeftAdapter, MissingWeightsFileIsAnError) {
  TempDir tmp;
  peft_adapter_write(tmp.path(), adapter_make());
  std::filesystem::remove(tmp.file("adapter_model.safetensors"));
  try {
    peft_adapter_read(tmp.path());
    ADD_FAILURE() << "nothing thrown";
  } catch (const std::exception& e) {
    EXPECT_TRUE(contains(e.what(), tmp.file("adapter_model.safetensors"))) << e.what();
  }
}

TEST(PeftAdapter, WriteErrors) {
  TempDir tmp;
  PeftAdapter a = adapter_make();
  a.weights[kQ].first = randn({3, 24}, 5);  // rank 3, config says 4
  std::string msg = invalid_argument_message([&] { peft_adapter_write(tmp.path(), a); });
  EXPECT_TRUE(contains(msg, key_a(kQ)) && contains(msg, "[3, 24]")) << msg;

  a = adapter_make();
  a.weights[kQ].second = at::Tensor();
  msg = invalid_argument_message([&] { peft_adapter_write(tmp.path(), a); });
  EXPECT_TRUE(contains(msg, key_b(kQ)) && contains(msg, "missing")) << msg;

  a = adapter_make();
  a.target_modules = {"q_proj"};
  msg = invalid_argument_message([&] { peft_adapter_write(tmp.path(), a); });
  EXPECT_TRUE(contains(msg, kDown) && contains(msg, "target_modules")) << msg;

  a = adapter_make();
  a.config.dropout = 1.0;
  msg = invalid_argument_message([&] { peft_adapter_write(tmp.path(), a); });
  EXPECT_TRUE(contains(msg, "adapter_config.json") && contains(msg, "lora_dropout")) << msg;

  EXPECT_TRUE(std::filesystem::is_empty(tmp.path())) << "nothing written on error";
}

}  // namespace
}  // namespace qlora::lora
