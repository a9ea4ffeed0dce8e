// The training configuration: defaults, INI + command-line precedence, the INI writer's round
// trip, every value check (one table), unknown keys with the nearest suggestion, malformed files,
// required keys, and each guard and warning of DESIGN.md section 5.
#include "app/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "expect_error.h"
#include "io/temp_dir.h"

namespace qlora::app {
namespace {

using io::testing::file_write;
using io::testing::TempDir;
using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using Overrides = std::vector<std::pair<std::string, std::string>>;

// The three keys without a default, nothing else.
const char* kMinimalIni =
    "[model]\n"
    "model_name_or_path = /models/tiny\n"
    "[data]\n"
    "train_file = /data/train.h5\n"
    "[output]\n"
    "output_dir = /runs/out\n";

TrainConfig config_minimal() {
  TrainConfig c;
  c.model_name_or_path = "/models/tiny";
  c.train_file = "/data/train.h5";
  c.output_dir = "/runs/out";
  return c;
}

// "section.key" -> value, from config_to_ini text.
std::map<std::string, std::string> ini_values(const std::string& ini) {
  std::map<std::string, std::string> out;
  std::istringstream in(ini);
  std::string line;
  std::string section;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.front() == '[') {
      section = line.substr(1, line.size() - 2);
      continue;
    }
    const size_t eq = line.find(" =");  // "key = value", or "key =" for an empty string
    out[section + "." + line.substr(0, eq)] = eq + 3 <= line.size() ? line.substr(eq + 3) : "";
  }
  return out;
}

class ConfigTest : public ::testing::Test {
 protected:
  std::string ini_write(const std::string& text) {
    const std::string path = dir_.file("config.ini");
    file_write(path, text);
    return path;
  }
  std::string read_error(const std::string& text, const Overrides& overrides = {}) {
    const std::string path = ini_write(text);
    return invalid_argument_message([&] { config_read(path, overrides); });
  }
  TempDir dir_;
};

TEST_F(ConfigTest, DefaultsAreTheMemberInitializers) {
  const std::string path = ini_write(kMinimalIni);
  const TrainConfig c = config_read(path, {});
  EXPECT_EQ(config_to_ini(c), config_to_ini(config_minimal()));
  EXPECT_EQ(c.config_path, path);
  EXPECT_EQ(c.quantization_bit, "4");
  EXPECT_EQ(c.quantization_type, "nf4");
  EXPECT_TRUE(c.double_quantization);
  EXPECT_EQ(c.quantization_blocksize, 64);
  EXPECT_EQ(c.lora_rank, 8);
  EXPECT_EQ(c.lora_alpha, 16.0);
  EXPECT_EQ(c.learning_rate, 1e-4);
  EXPECT_EQ(c.max_steps, -1);
  EXPECT_TRUE(c.do_train);
  EXPECT_FALSE(c.do_eval);
  EXPECT_EQ(c.report_to, "jsonl");
}

TEST_F(ConfigTest, KeysTableMatchesTheStruct) {
  const auto& keys = config_keys();
  const std::map<std::string, std::string> defaults = ini_values(config_to_ini(TrainConfig{}));
  ASSERT_EQ(keys.size(), defaults.size());
  std::set<std::string> names;
  for (const ConfigKey& k : keys) {
    EXPECT_TRUE(names.insert(k.name).second) << "duplicate key " << k.name;
    EXPECT_FALSE(k.help.empty()) << k.name;
    ASSERT_EQ(defaults.count(k.name), 1u) << k.name;
    EXPECT_EQ(defaults.at(k.name), k.default_value) << k.name;
  }
  EXPECT_EQ(defaults.at("train.learning_rate"), "0.0001");
  EXPECT_EQ(defaults.at("train.adam_epsilon"), "1e-08");
  EXPECT_EQ(defaults.at("train.num_train_epochs"), "3.0");
  EXPECT_EQ(defaults.at("model.model_name_or_path"), "");
}

// Every key away from its default (except the two with a single allowed value), written,
// read back, written again: the same text and bit-identical doubles.
TEST_F(ConfigTest, FullIniRoundTrips) {
  TrainConfig c;
  c.model_name_or_path = "/models/llama 7b/hf";
  c.adapter_name_or_path = "/adapters/a1";
  c.tokenizer_name_or_path = "/models/llama 7b/hf";
  c.compute_dtype = "bf16";
  c.device = "cpu";
  c.upcast_layernorm = true;
  c.resize_vocab = true;
  c.create_new_adapter = true;
  c.quantization_bit = "8";
  c.quantization_type = "fp4";
  c.double_quantization = false;
  c.quantization_blocksize = 4096;
  c.quant_storage = "uint8";
  c.quantization_device_map = "auto";
  c.finetuning_type = "oft";
  c.lora_rank = 13;
  c.lora_alpha = 0.1 + 0.2;  // 0.30000000000000004: needs 17 digits
  c.lora_dropout = 0.05;
  c.lora_target = "q_proj,v_proj";
  c.use_rslora = true;
  c.pissa_init = true;
  c.dataset = "/data/a.json, /data/b.jsonl";
  c.eval_dataset = "/data/e.json";
  c.template_name = "llama3";
  c.formatting = "sharegpt";
  c.cutoff_len = 2;
  c.train_on_prompt = true;
  c.packing = true;
  c.neat_packing = true;
  c.max_samples = 17;
  c.tokenized_path = "/data/tok";
  c.dataset_skip_bad = true;
  c.stage = "dpo";
  c.pref_beta = 0.25;
  c.pref_loss = "simpo";
  c.simpo_gamma = 0.75;
  c.pref_ftx = 0.125;
  c.dpo_label_smoothing = 0.0625;
  c.per_device_train_batch_size = 3;
  c.gradient_accumulation_steps = 5;
  c.learning_rate = 2.5e-4;
  c.lr_scheduler_type = "cosine";
  c.warmup_ratio = 1.0 / 3.0;
  c.warmup_steps = 7;
  c.num_train_epochs = 0.5;
  c.max_steps = 11;
  c.weight_decay = 0.01;
  c.adam_beta1 = 0.8;
  c.adam_beta2 = 0.95;
  c.adam_epsilon = 1e-6;
  c.max_grad_norm = 0.0;
  c.seed = 1234567890123;
  c.do_train = false;
  c.do_eval = true;
  c.eval_steps = 9;
  c.max_skipped_steps = 3;
  c.gradient_checkpointing = false;
  c.disable_gradient_checkpointing = true;
  c.backend = "mpi";
  c.sharding = "none";
  c.prefetch = 2;
  c.timeout_s = 42.5;
  c.output_dir = "/runs/o";
  c.logging_steps = 1;
  c.save_steps = 100;
  c.save_total_limit = 3;
  c.resume_from_checkpoint = "/runs/o/checkpoint-100";
  c.report_to = "jsonl,tensorboard";
  c.overwrite_output_dir = true;

  const std::string ini = config_to_ini(c);
  const std::map<std::string, std::string> values = ini_values(ini);
  for (const ConfigKey& k : config_keys()) {
    ASSERT_EQ(values.count(k.name), 1u) << k.name << " missing from\n" << ini;
    if (k.name == "quantization.quantization_method") continue;  // one allowed value
    if (k.name == "data.train_file" || k.name == "data.eval_file" ||
        k.name == "data.mask_history" || k.name == "data.val_size")
      continue;  // exclude data.dataset, eval_dataset, train_on_prompt: DataKeysRoundTrip
    EXPECT_NE(values.at(k.name), k.default_value) << k.name << " left at its default";
  }
  // Sections in the documented order.
  size_t last = 0;
  for (const char* s : {"[model]", "[quantization]", "[finetuning]", "[data]", "[train]",
                        "[dist]", "[output]"}) {
    const size_t at = ini.find(std::string(s) + "\n");
    ASSERT_NE(at, std::string::npos) << s;
    EXPECT_GE(at, last) << s;
    last = at;
  }

  const std::string path = ini_write(ini);
  const TrainConfig back = config_read(path, {});
  EXPECT_EQ(config_to_ini(back), ini);
  EXPECT_EQ(back.lora_alpha, c.lora_alpha);  // exact, not near
  EXPECT_EQ(back.warmup_ratio, c.warmup_ratio);
  EXPECT_EQ(back.learning_rate, c.learning_rate);
  EXPECT_EQ(back.seed, c.seed);
  EXPECT_EQ(back.model_name_or_path, c.model_name_or_path);  // inner blank kept
}

// The data keys that exclude those FullIniRoundTrips sets.
TEST_F(ConfigTest, DataKeysRoundTrip) {
  TrainConfig c = config_minimal();
  c.train_file = "";
  c.dataset = "/data/a.json";
  c.template_name = "chatml";
  c.mask_history = true;
  c.val_size = 100;
  c.do_eval = true;
  const std::string ini = config_to_ini(c);
  const TrainConfig back = config_read(ini_write(ini), {});
  EXPECT_EQ(config_to_ini(back), ini);
  EXPECT_TRUE(back.mask_history);
  EXPECT_EQ(back.val_size, 100.0);
  c = config_minimal();
  c.eval_file = "/data/e.h5";
  EXPECT_EQ(config_read(ini_write(config_to_ini(c)), {}).eval_file, "/data/e.h5");
}

TEST_F(ConfigTest, EmptyStringsRoundTrip) {
  TrainConfig c = config_minimal();  // adapter_name_or_path and eval_file empty
  const std::string ini = config_to_ini(c);
  EXPECT_TRUE(contains(ini, "\nadapter_name_or_path =\n")) << ini;
  EXPECT_EQ(config_to_ini(config_read(ini_write(ini), {})), ini);
}

TEST_F(ConfigTest, OverridesWinOverTheFile) {
  const std::string path = ini_write(std::string(kMinimalIni) +
                                     "[train]\nlearning_rate = 0.001\nseed = 7\n");
  const TrainConfig c = config_read(path, {{"train.learning_rate", "2e-4"},
                                           {"--finetuning.lora_rank", "16"},
                                           {"train.seed", "1"},
                                           {"train.seed", "3"}});  // the last one wins
  EXPECT_EQ(c.learning_rate, 2e-4);
  EXPECT_EQ(c.lora_rank, 16);
  EXPECT_EQ(c.seed, 3);
  EXPECT_EQ(c.model_name_or_path, "/models/tiny");
}

TEST_F(ConfigTest, CommandLineAloneIsEnough) {
  const TrainConfig c = config_read("", {{"model.model_name_or_path", "/m"},
                                         {"data.train_file", "/t.h5"},
                                         {"output.output_dir", "/o"},
                                         {"model.upcast_layernorm", "yes"}});
  EXPECT_EQ(c.config_path, "");
  EXPECT_EQ(c.model_name_or_path, "/m");
  EXPECT_TRUE(c.upcast_layernorm);
}

TEST_F(ConfigTest, BooleanSpellings) {
  const std::string path = ini_write(kMinimalIni);
  for (const char* yes : {"true", "TRUE", "True", "1", "yes", "Yes", "on", "ON"})
    EXPECT_TRUE(config_read(path, {{"model.upcast_layernorm", yes}}).upcast_layernorm) << yes;
  for (const char* no : {"false", "FALSE", "0", "no", "No", "off", "OFF"})
    EXPECT_FALSE(config_read(path, {{"quantization.double_quantization", no}})
                     .double_quantization) << no;
}

TEST_F(ConfigTest, CommentsBlankLinesAndSpaces) {
  const std::string path = ini_write(
      "# a comment\n\n[model]\n  model_name_or_path   =   /models/tiny  \n"
      "[finetuning]\nlora_rank = 4  # small\n\n[data]\ntrain_file=/d.h5\n"
      "[output]\noutput_dir = /o\n");
  const TrainConfig c = config_read(path, {});
  EXPECT_EQ(c.model_name_or_path, "/models/tiny");
  EXPECT_EQ(c.lora_rank, 4);
  EXPECT_EQ(c.train_file, "/d.h5");
}

// ---- one bad value per row: through the command line and through the file ----

struct BadValue {
  const char* key;
  const char* value;
  const char* fragment;
};

std::ostream& operator<<(std::ostream& os, const BadValue& b) {
  return os << b.key << " = '" << b.value << "'";
}

class ConfigBadValue : public ConfigTest, public ::testing::WithParamInterface<BadValue> {};

TEST_P(ConfigBadValue, CommandLine) {
  const BadValue& b = GetParam();
  const std::string path = ini_write(kMinimalIni);
  const std::string m =
      invalid_argument_message([&] { config_read(path, {{b.key, b.value}}); });
  EXPECT_EQ(m.rfind(std::string("command line --") + b.key + ": ", 0), 0u) << m;
  EXPECT_TRUE(contains(m, b.key)) << m;
  EXPECT_TRUE(contains(m, b.fragment)) << m << "\nexpected: " << b.fragment;
  EXPECT_FALSE(contains(m, "\n")) << m;
}

TEST_P(ConfigBadValue, File) {
  const BadValue& b = GetParam();
  const std::string key = b.key;
  const size_t dot = key.find('.');
  const std::string path = ini_write(std::string(kMinimalIni) + "[" + key.substr(0, dot) + "]\n" +
                                     key.substr(dot + 1) + " = " + b.value + "\n");
  const std::string m = invalid_argument_message([&] { config_read(path, {}); });
  EXPECT_EQ(m.rfind(path + ": ", 0), 0u) << m;
  EXPECT_TRUE(contains(m, b.key)) << m;
  EXPECT_TRUE(contains(m, b.fragment)) << m << "\nexpected: " << b.fragment;
}

const BadValue kBadValues[] = {
    // types
    {"train.do_eval", "maybe", "train.do_eval = 'maybe' is not a boolean (expected true or false)"},
    {"train.do_eval", "", "is not a boolean"},
    {"finetuning.lora_rank", "eight", "finetuning.lora_rank = 'eight' is not an integer"},
    {"finetuning.lora_rank", "8.5", "is not an integer"},
    {"train.seed", "99999999999999999999", "is not an integer"},
    {"train.learning_rate", "abc", "train.learning_rate = 'abc' is not a number"},
    {"train.learning_rate", "nan", "is not a number"},
    {"train.learning_rate", "1e999", "is not a number"},
    {"train.learning_rate", "0x1p-3", "is not a number"},
    // enums
    {"model.compute_dtype", "fp8", "'fp8' is not allowed (expected auto, bf16, fp16 or fp32)"},
    {"model.device", "tpu", "expected auto, cpu or cuda"},
    {"quantization.quantization_bit", "3",
     "Bitsandbytes only accepts 4-bit or 8-bit quantization (quantization.quantization_bit = 3"},
    {"quantization.quantization_method", "gptq",
     "only bnb (bitsandbytes) quantizes on the fly"},
    {"quantization.quantization_type", "int4", "expected nf4 or fp4"},
    {"quantization.quant_storage", "int8", "expected auto, uint8, bf16, fp16 or fp32"},
    {"quantization.quantization_device_map", "balanced", "expected none or auto"},
    {"finetuning.finetuning_type", "prefix", "expected lora, oft, full or freeze"},
    {"train.lr_scheduler_type", "step", "expected constant, linear or cosine"},
    {"dist.backend", "gloo", "expected auto, mpi or nccl"},
    {"dist.sharding", "hybrid", "expected full or none"},
    {"output.report_to", "wandb", "'wandb' is not allowed"},
    {"output.report_to", "none,jsonl", "'none' cannot be combined"},
    {"output.report_to", "jsonl,", "'' is not allowed"},
    {"output.resume_from_checkpoint", "", "expected auto, none or a checkpoint directory"},
    {"finetuning.lora_target", "q_proj,x_proj", "lora_target 'x_proj' is not a linear of the model"},
    {"finetuning.lora_target", "all,q_proj", "'all' cannot be combined"},
    // ranges
    {"quantization.quantization_blocksize", "48", "48 is out of range (expected a power of two"},
    {"quantization.quantization_blocksize", "16", "a power of two in [32, 4096]"},
    {"quantization.quantization_blocksize", "8192", "a power of two in [32, 4096]"},
    {"finetuning.lora_rank", "0", "finetuning.lora_rank = 0 is out of range (expected >= 1)"},
    {"finetuning.lora_alpha", "0", "expected > 0"},
    {"finetuning.lora_alpha", "-16", "expected > 0"},
    {"finetuning.lora_dropout", "1", "0 <= lora_dropout < 1"},
    {"finetuning.lora_dropout", "-0.1", "0 <= lora_dropout < 1"},
    {"data.cutoff_len", "1", "expected >= 2"},
    {"data.formatting", "csv", "expected auto, alpaca, sharegpt, openai or text"},
    {"data.template", "vicuna", "expected default, alpaca, chatml, qwen, llama2, llama3, mistral, "
                                "smollm2 or empty"},
    {"data.max_samples", "-1", "expected >= 0; 0 = all"},
    {"data.val_size", "-0.5", "0, a fraction in (0, 1), or a whole number of samples"},
    {"data.val_size", "2.5", "0, a fraction in (0, 1), or a whole number of samples"},
    {"data.val_size", "0.1", "data.val_size needs data.dataset"},
    {"data.dataset", "/d.json", "data.dataset and data.train_file are both set"},
    {"train.per_device_train_batch_size", "0", "expected >= 1"},
    {"train.gradient_accumulation_steps", "0", "expected >= 1"},
    {"train.learning_rate", "-1e-5", "expected >= 0"},
    {"train.warmup_ratio", "1.5", "0 <= warmup_ratio <= 1"},
    {"train.warmup_ratio", "-0.1", "0 <= warmup_ratio <= 1"},
    {"train.warmup_steps", "-1", "expected >= 0"},
    {"train.num_train_epochs", "0", "> 0 unless train.max_steps > 0"},
    {"train.max_steps", "0", "train.max_steps = 0 is out of range (expected -1 for num_train_epochs, or >= 1)"},
    {"train.max_steps", "-2", "-1 for num_train_epochs, or >= 1"},
    {"train.weight_decay", "-0.1", "expected >= 0"},
    {"train.adam_beta1", "1", "0 <= adam_beta1 < 1"},
    {"train.adam_beta2", "-0.5", "0 <= adam_beta2 < 1"},
    {"train.adam_epsilon", "0", "expected > 0"},
    {"train.max_grad_norm", "-1", "expected >= 0; 0 = no clipping"},
    {"train.seed", "-1", "expected >= 0"},
    {"train.stage", "ppo", "expected sft or dpo"},
    {"train.pref_loss", "hinge", "expected sigmoid, ipo, orpo or simpo"},
    {"train.pref_beta", "0", "expected > 0"},
    {"train.simpo_gamma", "-1", "expected >= 0"},
    {"train.pref_ftx", "-0.5", "expected >= 0"},
    {"train.dpo_label_smoothing", "0.5", "0 <= dpo_label_smoothing < 0.5"},
    {"train.eval_steps", "-1", "expected >= 0"},
    {"dist.prefetch", "3", "expected 0, 1 or 2"},
    {"dist.prefetch", "-1", "expected 0, 1 or 2"},
    {"dist.timeout_s", "0", "expected > 0 seconds"},
    {"dist.timeout_s", "-5", "expected > 0 seconds"},
    {"train.max_skipped_steps", "0", "expected >= 1"},
    {"output.logging_steps", "0", "expected >= 1"},
    {"output.save_steps", "-1", "expected >= 0"},
    {"output.save_total_limit", "-1", "expected >= 0"},
};
INSTANTIATE_TEST_SUITE_P(Table, ConfigBadValue, ::testing::ValuesIn(kBadValues));

TEST_F(ConfigTest, NumTrainEpochsZeroIsFineWithMaxSteps) {
  const std::string path = ini_write(kMinimalIni);
  const TrainConfig c =
      config_read(path, {{"train.num_train_epochs", "0"}, {"train.max_steps", "10"}});
  EXPECT_EQ(c.max_steps, 10);
}

TEST_F(ConfigTest, LoraTargetAllAndLists) {
  const std::string path = ini_write(kMinimalIni);
  EXPECT_EQ(config_read(path, {{"finetuning.lora_target", "all"}}).lora_target, "all");
  EXPECT_EQ(config_read(path, {{"finetuning.lora_target", "q_proj, down_proj"}}).lora_target,
            "q_proj, down_proj");
}

// ---- unknown keys ----

TEST_F(ConfigTest, UnknownKeyInFileNamesTheNearest) {
  const std::string path = ini_write(std::string(kMinimalIni) + "[train]\nlearnig_rate = 0.1\n");
  EXPECT_EQ(invalid_argument_message([&] { config_read(path, {}); }),
            path + ": unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)");
}

// Found by fuzzing the INI (tests/fuzz/train_config.cpp): a file of many or huge unknown keys made
// one message of all of them and an edit distance per key quadratic in its length.
TEST_F(ConfigTest, ManyOrLongUnknownKeysAreCut) {
  std::string ini = std::string(kMinimalIni) + "[train]\n";
  for (int i = 0; i < 8; ++i) ini += "bogus" + std::to_string(i) + " = 1\n";
  ini += std::string(5000, 'k') + " = 1\n";
  const std::string m = read_error(ini);
  EXPECT_TRUE(contains(m, "unknown key 'train.bogus4'")) << m;
  EXPECT_FALSE(contains(m, "bogus5")) << m;
  EXPECT_TRUE(contains(m, "; and 4 more unknown keys")) << m;
  EXPECT_LT(m.size(), 1000u) << m;
  const std::string long_key = read_error(std::string(kMinimalIni) + "[train]\n" +
                                          std::string(5000, 'k') + " = 1\n");
  EXPECT_TRUE(contains(long_key, "unknown key 'train." + std::string(58, 'k') + "...'")) << long_key;
}

TEST_F(ConfigTest, KeyInTheWrongSection) {
  const std::string path = ini_write(std::string(kMinimalIni) + "[model]\nlearning_rate = 0.1\n");
  EXPECT_EQ(invalid_argument_message([&] { config_read(path, {}); }),
            path + ": unknown key 'model.learning_rate' (did you mean 'train.learning_rate'?)");
}

TEST_F(ConfigTest, SeveralUnknownKeysOneLine) {
  const std::string m = read_error(std::string(kMinimalIni) +
                                   "[train]\nlearnig_rate = 0.1\n[finetuning]\nlora_rnak = 4\n");
  EXPECT_TRUE(contains(m, "unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)"))
      << m;
  EXPECT_TRUE(contains(m, "unknown key 'finetuning.lora_rnak' (did you mean 'finetuning.lora_rank'?)"))
      << m;
  EXPECT_FALSE(contains(m, "\n")) << m;
}

TEST_F(ConfigTest, UnknownKeyOnCommandLine) {
  const std::string path = ini_write(kMinimalIni);
  EXPECT_EQ(invalid_argument_message([&] { config_read(path, {{"train.learnig_rate", "0.1"}}); }),
            "command line --train.learnig_rate: unknown key 'train.learnig_rate' (did you mean "
            "'train.learning_rate'?)");
  EXPECT_TRUE(contains(invalid_argument_message([&] { config_read(path, {{"lora_rank", "4"}}); }),
                       "(did you mean 'finetuning.lora_rank'?)"));
}

TEST(ConfigNearestKey, WholeNameOrKeyPart) {
  EXPECT_EQ(config_nearest_key("learnig_rate"), "train.learning_rate");
  EXPECT_EQ(config_nearest_key("model.learning_rate"), "train.learning_rate");
  EXPECT_EQ(config_nearest_key("train.learnig_rate"), "train.learning_rate");
  EXPECT_EQ(config_nearest_key("lora_rnak"), "finetuning.lora_rank");
  EXPECT_EQ(config_nearest_key("TRAIN.SEED"), "train.seed");
  EXPECT_EQ(config_nearest_key("quantization.quantisation_bit"), "quantization.quantization_bit");
  EXPECT_EQ(config_nearest_key("model.seed"), "train.seed");
  EXPECT_EQ(config_nearest_key("rank"), "finetuning.lora_rank");
  EXPECT_EQ(config_nearest_key("epochs"), "train.num_train_epochs");
  EXPECT_EQ(config_nearest_key("train.lora_dropout"), "finetuning.lora_dropout");
  EXPECT_EQ(config_nearest_key("output.output_dir"), "output.output_dir");
}

// ---- malformed files ----

TEST_F(ConfigTest, MalformedLineNamesFileAndLine) {
  const std::string path =
      ini_write("[model]\nmodel_name_or_path /models/tiny\n[output]\noutput_dir = /o\n");
  const std::string m = invalid_argument_message([&] { config_read(path, {}); });
  EXPECT_EQ(m.rfind(path + ":2: malformed line 'model_name_or_path /models/tiny'", 0), 0u) << m;
}

TEST_F(ConfigTest, MalformedSectionHeader) {
  const std::string m = read_error("# top\n[model\nmodel_name_or_path = /m\n");
  EXPECT_TRUE(contains(m, ":2: malformed section header '[model'")) << m;
}

TEST_F(ConfigTest, KeyOutsideAnySection) {
  const std::string m = read_error(std::string("lora_rank = 8\n") + kMinimalIni);
  EXPECT_TRUE(contains(m, ":1: 'lora_rank = 8' is outside any section")) << m;
  EXPECT_TRUE(contains(m, "'lora_rank' under [finetuning]")) << m;
}

TEST_F(ConfigTest, KeySetTwice) {
  const std::string m =
      read_error(std::string(kMinimalIni) + "[train]\nseed = 1\n[train]\nseed = 2\n");
  EXPECT_TRUE(contains(m, ":10: train.seed is set twice (first on line 8)")) << m;
}

TEST_F(ConfigTest, MissingFile) {
  const std::string path = dir_.file("absent.ini");
  const std::string m = invalid_argument_message([&] { config_read(path, {}); });
  EXPECT_EQ(m.rfind(path + ": cannot open", 0), 0u) << m;
}

// ---- required keys ----

TEST_F(ConfigTest, ModelIsRequired) {
  const std::string path = ini_write("[data]\ntrain_file = /t.h5\n[output]\noutput_dir = /o\n");
  EXPECT_EQ(invalid_argument_message([&] { config_read(path, {}); }),
            path + ": model.model_name_or_path is required (a Hugging Face model directory or an "
                   "HDF5 unit file)");
}

TEST_F(ConfigTest, OutputDirIsRequired) {
  const std::string m = read_error("[model]\nmodel_name_or_path = /m\n[data]\ntrain_file = /t\n");
  EXPECT_TRUE(contains(m, ": output.output_dir is required")) << m;
}

TEST_F(ConfigTest, RequiredOnCommandLineOnly) {
  const std::string m = invalid_argument_message([] { config_read("", {}); });
  EXPECT_EQ(m.rfind("command line: model.model_name_or_path is required", 0), 0u) << m;
}

TEST_F(ConfigTest, TrainFileRequiredWhenTraining) {
  const std::string m = read_error("[model]\nmodel_name_or_path = /m\n[output]\noutput_dir = /o\n");
  EXPECT_TRUE(contains(m, "data.train_file is required when train.do_train = true")) << m;
}

TEST_F(ConfigTest, EvalFileRequiredWhenEvaluating) {
  const std::string m = read_error(kMinimalIni, {{"train.do_eval", "true"}});
  EXPECT_TRUE(contains(m, "data.eval_file is required when train.do_eval = true")) << m;
}

TEST_F(ConfigTest, EvalOnlyNeedsNoTrainFile) {
  const std::string path = ini_write(
      "[model]\nmodel_name_or_path = /m\n[data]\neval_file = /e.h5\n[train]\ndo_train = false\n"
      "do_eval = true\n[output]\noutput_dir = /o\n");
  const TrainConfig c = config_read(path, {});
  EXPECT_FALSE(c.do_train);
  EXPECT_TRUE(c.do_eval);
}

TEST_F(ConfigTest, NothingToDo) {
  const std::string m = read_error(kMinimalIni, {{"train.do_train", "false"}});
  EXPECT_TRUE(contains(m, "train.do_train and train.do_eval are both false")) << m;
}

// ---- help ----

TEST(ConfigHelp, EveryKeyWithDefaultAndSection) {
  const std::string help = config_help();
  for (const ConfigKey& k : config_keys())
    EXPECT_TRUE(contains(help, "--" + k.name + " (default: ")) << k.name;
  for (const char* s : {"[model]", "[quantization]", "[finetuning]", "[data]", "[train]",
                        "[dist]", "[output]"})
    EXPECT_TRUE(contains(help, s)) << s;
  EXPECT_TRUE(contains(help, "--train.learning_rate (default: 0.0001)"));
  EXPECT_TRUE(contains(help, "--model.model_name_or_path (default: empty)"));
  std::istringstream in(help);
  std::string line;
  while (std::getline(in, line)) EXPECT_LE(line.size(), 100u) << line;
}

// ---- guards: one test each ----

std::string guard_error(const TrainConfig& c, int world_size = 1) {
  return invalid_argument_message([&] { config_guards(c, world_size); });
}

TEST(ConfigGuards, DefaultsPass) {
  TrainConfig c = config_minimal();
  c.device = "cpu";
  EXPECT_TRUE(config_guards(c, 1).empty());
  EXPECT_TRUE(config_guards(c, 4).empty());
}

TEST(ConfigGuards, PreferenceKeysThatDoNotCombine) {
  TrainConfig c = config_minimal();
  c.stage = "dpo";
  c.dpo_label_smoothing = 0.1;
  EXPECT_NO_THROW(config_guards(c, 1));  // sigmoid
  c.pref_loss = "ipo";
  EXPECT_EQ(guard_error(c),
            "train.dpo_label_smoothing applies to pref_loss = sigmoid or simpo, not ipo");
  c.pref_loss = "simpo";
  EXPECT_NO_THROW(config_guards(c, 1));
  c.dpo_label_smoothing = 0.0;
  c.neat_packing = true;
  EXPECT_TRUE(contains(guard_error(c), "data.packing does not apply to train.stage = dpo"));
  c.stage = "sft";
  EXPECT_NO_THROW(config_guards(c, 1));
}

TEST(ConfigGuards, BitsandbytesBitWidth) {
  TrainConfig c = config_minimal();
  c.quantization_bit = "3";
  EXPECT_EQ(guard_error(c),
            "Bitsandbytes only accepts 4-bit or 8-bit quantization "
            "(quantization.quantization_bit = 3)");
}

TEST(ConfigGuards, OnlyBitsandbytes) {
  TrainConfig c = config_minimal();
  c.quantization_method = "gptq";
  EXPECT_TRUE(contains(guard_error(c), "quantization.quantization_method = 'gptq': only bnb"));
}

TEST(ConfigGuards, QuantizationNeedsLoraOrOft) {
  TrainConfig c = config_minimal();
  c.finetuning_type = "full";
  EXPECT_EQ(guard_error(c),
            "Quantization is only compatible with the LoRA or OFT method "
            "(finetuning.finetuning_type = full)");
  c.finetuning_type = "freeze";
  EXPECT_TRUE(contains(guard_error(c), "(finetuning.finetuning_type = freeze)"));
}

TEST(ConfigGuards, FullWithoutQuantization) {
  TrainConfig c = config_minimal();
  c.quantization_bit = "none";
  c.finetuning_type = "full";
  EXPECT_EQ(guard_error(c),
            "finetuning.finetuning_type = full is not supported: qlora_dist trains LoRA adapters");
}

TEST(ConfigGuards, OftNotYet) {
  TrainConfig c = config_minimal();
  c.finetuning_type = "oft";
  EXPECT_EQ(guard_error(c), "finetuning.finetuning_type = oft is not yet supported; use lora");
}

TEST(ConfigGuards, SingleAdapterOnQuantizedModel) {
  TrainConfig c = config_minimal();
  c.adapter_name_or_path = "/a1";
  EXPECT_NO_THROW(config_guards(c, 1));
  c.adapter_name_or_path = "/a1, /a2";
  const std::string m = guard_error(c);
  EXPECT_EQ(m.rfind("Quantized model only accepts a single adapter. Merge them first.", 0), 0u)
      << m;
  EXPECT_TRUE(contains(m, "model.adapter_name_or_path = /a1, /a2")) << m;
}

TEST(ConfigGuards, ResizeVocabOnQuantizedModel) {
  TrainConfig c = config_minimal();
  c.resize_vocab = true;
  EXPECT_TRUE(contains(guard_error(c), "Cannot resize embedding layers of a quantized model."));
}

TEST(ConfigGuards, PissaOnQuantizedModel) {
  TrainConfig c = config_minimal();
  c.pissa_init = true;
  EXPECT_TRUE(contains(guard_error(c), "Cannot initialize PiSSA adapter on quantized models."));
}

TEST(ConfigGuards, NewAdapterOnQuantizedModel) {
  TrainConfig c = config_minimal();
  c.create_new_adapter = true;
  EXPECT_TRUE(contains(guard_error(c), "Cannot create new adapter upon a quantized model."));
}

TEST(ConfigGuards, DeviceMapAutoIsInferenceOnly) {
  TrainConfig c = config_minimal();
  c.quantization_device_map = "auto";
  EXPECT_EQ(guard_error(c),
            "A device map of 'auto' is for inference only; remove "
            "quantization.quantization_device_map for training.");
  c.do_train = false;
  c.do_eval = true;
  c.eval_file = "/e.h5";
  EXPECT_NO_THROW(config_guards(c, 1));
}

TEST(ConfigGuards, EightBitSharded) {
  TrainConfig c = config_minimal();
  c.quantization_bit = "8";
  EXPECT_EQ(guard_error(c, 2),
            "Only 4-bit quantized model can use fsdp+qlora (quantization.quantization_bit = 8 "
            "with dist.sharding = full on 2 ranks)");
}

TEST(ConfigGuards, EightBitNotYet) {
  TrainConfig c = config_minimal();
  c.quantization_bit = "8";
  const std::string expected =
      "8-bit (LLM.int8) training is not supported yet; use quantization.quantization_bit = 4";
  EXPECT_EQ(guard_error(c, 1), expected);
  c.sharding = "none";
  EXPECT_EQ(guard_error(c, 2), expected);
}

TEST(ConfigGuards, UnquantizedNotYet) {
  TrainConfig c = config_minimal();
  c.quantization_bit = "none";
  EXPECT_TRUE(contains(guard_error(c), "quantization.quantization_bit = none is not supported yet"));
}

TEST(ConfigGuards, NcclNeedsGpus) {
  TrainConfig c = config_minimal();
  c.backend = "nccl";
  c.device = "cpu";
  EXPECT_TRUE(contains(guard_error(c), "dist.backend = nccl needs GPUs (model.device = cpu)"));
}

// model.device = cuda is accepted in a CUDA build where a GPU is visible, and refused with the
// reason where none is; auto follows the GPUs; nccl needs cuda.
TEST(ConfigGuards, CudaNeedsAVisibleGpu) {
  TrainConfig c = config_minimal();
  c.device = "cuda";
#ifdef QLORA_HAVE_NCCL
  c.gpus_visible = 0;
  c.gpus_reason = "cudaGetDeviceCount: no CUDA-capable device is detected";
  EXPECT_TRUE(contains(guard_error(c), "model.device = cuda: no GPU visible on this node "
                                       "(cudaGetDeviceCount: no CUDA-capable device is detected)"));
  c.gpus_visible = 2;
  EXPECT_NO_THROW(config_guards(c, 1));
  EXPECT_EQ(config_device(c), "cuda");
  EXPECT_EQ(config_compute_dtype(c), "bf16");
  c.backend = "nccl";
  EXPECT_NO_THROW(config_guards(c, 1));
  c.device = "auto";
  EXPECT_EQ(config_device(c), "cuda");
  c.gpus_visible = 0;
  EXPECT_EQ(config_device(c), "cpu");
  EXPECT_TRUE(contains(guard_error(c), "dist.backend = nccl needs GPUs (model.device = auto, "
                                       "no GPU visible)"));
#else
  EXPECT_TRUE(contains(guard_error(c), "model.device = cuda: this build has no CUDA"));
  c.device = "auto";
  c.backend = "nccl";
  EXPECT_TRUE(contains(guard_error(c), "dist.backend = nccl: this build has no NCCL"));
#endif
}

TEST(ConfigGuards, WorldSizeMustBePositive) {
  EXPECT_TRUE(contains(guard_error(config_minimal(), 0), "world_size = 0"));
}

// ---- warnings ----

TEST(ConfigWarnings, EvaluatingAQuantizedModel) {
  TrainConfig c = config_minimal();
  c.device = "cpu";
  c.do_train = false;
  c.do_eval = true;
  c.eval_file = "/e.h5";
  const std::vector<std::string> w = config_guards(c, 1);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0], "Evaluating model in 4/8-bit mode may cause lower scores.");
}

// compute_dtype = auto on the CPU: bf16 exactly where the kernel lists avx512_bf16 or amx_bf16
// among the CPU's flags (/proc/cpuinfo, read here independently of the cpuid check), fp32
// elsewhere; the log line says which and why. Holds on both kinds of machine of this project.
TEST(ComputeDtype, AutoFollowsTheCpusBf16Support) {
  std::ifstream in("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      flags = " " + line.substr(line.find(':') + 1) + " ";
      break;
    }
  if (flags.empty()) GTEST_SKIP() << "no flags line in /proc/cpuinfo";
  const bool avx512_bf16 = flags.find(" avx512_bf16 ") != std::string::npos;
  const bool amx_bf16 = flags.find(" amx_bf16 ") != std::string::npos;
  TrainConfig c = config_minimal();
  c.device = "cpu";
  c.compute_dtype = "auto";
  const std::string reason = config_compute_dtype_reason(c);
  if (avx512_bf16 || amx_bf16) {
    EXPECT_EQ(config_compute_dtype(c), "bf16");
    EXPECT_TRUE(contains(reason, "compute dtype: bf16 (model.compute_dtype = auto: this CPU has "))
        << reason;
    EXPECT_TRUE(contains(reason, avx512_bf16 ? "AVX512_BF16" : "AMX-BF16")) << reason;
  } else {
    EXPECT_EQ(config_compute_dtype(c), "fp32");
    EXPECT_EQ(reason, "compute dtype: fp32 (model.compute_dtype = auto: this CPU has neither "
                      "AVX512_BF16 nor AMX-BF16)");
  }
  c.compute_dtype = "fp32";
  EXPECT_EQ(config_compute_dtype(c), "fp32");
  EXPECT_EQ(config_compute_dtype_reason(c), "compute dtype: fp32 (model.compute_dtype = fp32)");
}

TEST(ConfigWarnings, QuantStorageCorrectedToComputeDtype) {
  TrainConfig c = config_minimal();
  c.device = "cpu";
  c.compute_dtype = "fp32";
  c.quant_storage = "uint8";
  std::vector<std::string> w = config_guards(c, 2);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_TRUE(contains(w[0], "quant_storage uint8 -> fp32: in distributed mode the 4-bit storage "
                             "dtype must equal the compute dtype (FSDP+QLoRA); corrected"))
      << w[0];
  c.compute_dtype = "bf16";
  w = config_guards(c, 2);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_TRUE(contains(w[0], "quant_storage uint8 -> bf16")) << w[0];
  c.quant_storage = "bf16";
  EXPECT_TRUE(config_guards(c, 2).empty());
}

TEST(ConfigWarnings, DropoutDependsOnWorldSize) {
  TrainConfig c = config_minimal();
  c.device = "cpu";
  c.lora_dropout = 0.1;
  EXPECT_TRUE(config_guards(c, 1).empty());
  const std::vector<std::string> w = config_guards(c, 4);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_TRUE(contains(w[0], "finetuning.lora_dropout = 0.1 on 4 ranks")) << w[0];
}

}  // namespace
}  // namespace qlora::app
