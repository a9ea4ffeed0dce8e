// JSON / JSON Lines rows -> LLaMA-Factory conversations (converter.py: alpaca, sharegpt with its
// default and OpenAI-style tags) -> samples (processor/supervised.py, processor/pretrain.py).
#include "data/sft_dataset.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "io/hash.h"
#include "io/json_file.h"

namespace qlora::data {
namespace {

using nlohmann::json;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

std::string short_dump(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// The tags of one sharegpt flavour (LLaMA-Factory's DatasetAttr role/content tags).
struct Tags {
  const char* messages;
  const char* role;
  const char* content;
  const char* user;
  const char* assistant;
  const char* observation;
  const char* function;
  const char* system;
};
constexpr Tags kSharegptTags{"conversations", "from", "value", "human", "gpt",
                             "observation", "function_call", "system"};
constexpr Tags kOpenaiTags{"messages", "role", "content", "user", "assistant",
                           "observation", "function_call", "system"};

// A string field that may be absent or null ("" then); another type is a bad row.
bool optional_string(const json& row, const char* key, std::string& out, std::string& reason) {
  out.clear();
  if (!row.contains(key) || row[key].is_null()) return true;
  if (!row[key].is_string()) {
    reason = std::string("\"") + key + "\" must be a string, got " + short_dump(row[key]);
    return false;
  }
  out = row[key].get<std::string>();
  return true;
}

ConvertResult bad(std::string reason) { return ConvertResult{std::nullopt, std::move(reason)}; }

// AlpacaDatasetConverter with columns instruction, input, output, system, history.
ConvertResult convert_alpaca(const json& row) {
  std::string instruction, input, output, system, reason;
  if (!optional_string(row, "instruction", instruction, reason) ||
      !optional_string(row, "input", input, reason) || !optional_string(row, "system", system, reason))
    return bad(reason);
  if (!row.contains("output") || !row["output"].is_string())
    return bad(row.contains("output") ? "\"output\" must be a string, got " + short_dump(row["output"])
                                      : "no \"output\" (alpaca rows need instruction, output)");
  output = row["output"].get<std::string>();
  if (instruction.empty() && input.empty()) return bad("\"instruction\" and \"input\" are both empty");
  if (output.empty()) return bad("\"output\" is empty");

  Conversation c;
  c.system = system;
  if (row.contains("history") && !row["history"].is_null()) {
    const json& h = row["history"];
    if (!h.is_array()) return bad("\"history\" must be a list of [prompt, response] pairs");
    for (size_t i = 0; i < h.size(); ++i) {
      if (!h[i].is_array() || h[i].size() != 2 || !h[i][0].is_string() || !h[i][1].is_string())
        return bad("\"history\"[" + std::to_string(i) + "] must be a [prompt, response] pair of "
                   "strings, got " + short_dump(h[i]));
      c.messages.push_back({Role::user, h[i][0].get<std::string>()});
      c.messages.push_back({Role::assistant, h[i][1].get<std::string>()});
    }
  }
  std::string query = instruction;  // "instruction\ninput", leaving out an empty one
  if (!input.empty()) query += (query.empty() ? "" : "\n") + input;
  c.messages.push_back({Role::user, query});
  c.messages.push_back({Role::assistant, output});
  return ConvertResult{std::move(c), ""};
}

// SharegptDatasetConverter (also for OpenAI messages: the same converter with other tags).
ConvertResult convert_sharegpt(const json& row, const Tags& tags) {
  if (!row.contains(tags.messages)) return bad(std::string("no \"") + tags.messages + "\" list");
  const json& msgs = row[tags.messages];
  if (!msgs.is_array()) return bad(std::string("\"") + tags.messages + "\" must be a list");
  Conversation c;
  std::string reason;
  if (!optional_string(row, "system", c.system, reason)) return bad(reason);
  size_t first = 0;
  auto field = [&](size_t i, const char* key, std::string& out) -> bool {
    const json& m = msgs[i];
    if (!m.is_object() || !m.contains(key) || !m[key].is_string()) {
      reason = "message " + std::to_string(i + 1) + ": needs a string \"" + key + "\", got " + short_dump(m);
      return false;
    }
    out = m[key].get<std::string>();
    return true;
  };
  std::string role, content;
  if (!msgs.empty()) {
    if (!field(0, tags.role, role)) return bad(reason);
    if (role == tags.system) {
      if (!field(0, tags.content, content)) return bad(reason);
      c.system = content;
      first = 1;
    }
  }
  for (size_t i = first; i < msgs.size(); ++i) {
    if (!field(i, tags.role, role) || !field(i, tags.content, content)) return bad(reason);
    const bool odd = (i - first) % 2 == 0;  // LLaMA-Factory's turn_idx % 2 == 0: a prompt
    Role r;
    if (role == tags.user && odd) r = Role::user;
    else if (role == tags.observation && odd) r = Role::observation;
    else if (role == tags.assistant && !odd) r = Role::assistant;
    else if (role == tags.function && !odd) r = Role::function;
    else
      return bad("message " + std::to_string(i + 1) + ": role '" + role + "' where " +
                 (odd ? std::string(tags.user) + "/" + tags.observation
                      : std::string(tags.assistant) + "/" + tags.function) +
                 " is expected (roles alternate, a system message may only come first)");
    if (r == Role::function)
      return bad("message " + std::to_string(i + 1) + ": '" + role +
                 "' (tool call) turns are not supported");
    if (content.empty()) return bad("message " + std::to_string(i + 1) + ": empty \"" + tags.content + "\"");
    c.messages.push_back({r, content});
  }
  if (c.messages.empty()) return bad("no turns besides the system message");
  if (c.messages.size() % 2 != 0)
    return bad(std::to_string(c.messages.size()) + " turns; expected prompt/answer pairs, the last "
               "one from " + tags.assistant);
  return ConvertResult{std::move(c), ""};
}

ConvertResult convert_text(const json& row) {
  if (!row.contains("text")) return bad("no \"text\"");
  if (!row["text"].is_string()) return bad("\"text\" must be a string, got " + short_dump(row["text"]));
  Conversation c;
  c.messages.push_back({Role::user, row["text"].get<std::string>()});
  if (c.messages[0].content.empty()) return bad("\"text\" is empty");
  return ConvertResult{std::move(c), ""};
}

int64_t count_targets(const Sample& s) {
  int64_t n = 0;
  for (int32_t l : s.labels) n += l != kIgnoreLabel;
  return n;
}

}  // namespace

Formatting formatting_from_name(const std::string& name) {
  if (name == "auto") return Formatting::automatic;
  else if (name == "alpaca") return Formatting::alpaca;
  else if (name == "sharegpt") return Formatting::sharegpt;
  else if (name == "openai") return Formatting::openai;
  else if (name == "text") return Formatting::text;
  else
    throw std::invalid_argument("unknown dataset formatting '" + name +
                                "' (valid: auto, alpaca, sharegpt, openai, text)");
}

const char* formatting_name(Formatting formatting) {
  if (formatting == Formatting::automatic) return "auto";
  else if (formatting == Formatting::alpaca) return "alpaca";
  else if (formatting == Formatting::sharegpt) return "sharegpt";
  else if (formatting == Formatting::openai) return "openai";
  else if (formatting == Formatting::text) return "text";
  else throw std::logic_error("formatting_name: unknown value " + std::to_string(static_cast<int>(formatting)));
}

std::vector<JsonRow> read_json_rows(const std::string& path, int64_t max_rows) {
  std::string text = io::file_read(path, "dataset file");
  if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);  // UTF-8 byte order mark
  size_t start = 0;
  while (start < text.size() && is_space(text[start])) ++start;
  const std::string expected = "expected a JSON array of row objects or JSON Lines (one object per line)";
  if (start == text.size()) throw std::invalid_argument(path + ": empty file; " + expected);
  std::vector<JsonRow> rows;
  auto full = [&] { return max_rows >= 0 && static_cast<int64_t>(rows.size()) >= max_rows; };
  auto check_object = [&](const json& v, const std::string& where) {
    if (!v.is_object())
      throw std::invalid_argument(where + ": a row must be a JSON object, got " + std::string(v.type_name()));
  };

  if (text[start] == '[') {
    json all;
    try {
      all = json::parse(text);
    } catch (const json::parse_error& e) {
      throw std::invalid_argument(path + ": not valid JSON at byte " + std::to_string(e.byte) + " (" +
                                  e.what() + ")");
    }
    for (size_t i = 0; i < all.size() && !full(); ++i) {
      const std::string where = path + " row " + std::to_string(i + 1);
      check_object(all[i], where);
      rows.push_back({std::move(all[i]), where});
    }
    return rows;
  }
  if (text[start] != '{')
    throw std::invalid_argument(path + ": not JSON (it starts with '" + std::string(1, text[start]) +
                                "'); " + expected);
  size_t line_no = 0, pos = 0;
  while (pos < text.size() && !full()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    ++line_no;
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(line_no);
    json v;
    try {
      v = json::parse(line);
    } catch (const json::parse_error& e) {
      if (rows.empty() && json::accept(text))
        throw std::invalid_argument(path + ": the top level is one JSON object; " + expected);
      throw std::invalid_argument(where + ": not valid JSON (" + e.what() + ")");
    }
    check_object(v, where);
    rows.push_back({std::move(v), where});
  }
  return rows;
}

Formatting detect_formatting(const JsonRow& first_row) {
  const json& r = first_row.value;
  if (r.contains("conversations")) return Formatting::sharegpt;
  else if (r.contains("messages")) return Formatting::openai;
  else if (r.contains("instruction") || r.contains("output")) return Formatting::alpaca;
  else if (r.contains("text")) return Formatting::text;
  std::string keys;
  for (const auto& [k, v] : r.items()) keys += (keys.empty() ? "" : ", ") + k;
  throw std::invalid_argument(first_row.where + ": cannot tell the dataset formatting from the keys {" +
                              keys + "}; expected \"conversations\" (sharegpt), \"messages\" (openai), "
                              "\"instruction\"/\"output\" (alpaca) or \"text\", or set formatting");
}

ConvertResult convert_row(const json& row, Formatting formatting) {
  if (formatting == Formatting::alpaca) return convert_alpaca(row);
  else if (formatting == Formatting::sharegpt) return convert_sharegpt(row, kSharegptTags);
  else if (formatting == Formatting::openai) return convert_sharegpt(row, kOpenaiTags);
  else if (formatting == Formatting::text) return convert_text(row);
  else
    throw std::invalid_argument(std::string("convert_row: formatting '") + formatting_name(formatting) +
                                "' is not a row format (resolve auto with detect_formatting first)");
}

std::pair<int64_t, int64_t> infer_seqlen(int64_t source_len, int64_t target_len, int64_t cutoff_len) {
  int64_t max_target_len;
  if (target_len * 2 < cutoff_len) {
    max_target_len = cutoff_len;
  } else if (source_len * 2 < cutoff_len) {
    max_target_len = cutoff_len - source_len;
  } else {  // Python: int(cutoff_len * (target_len / (source_len + target_len)))
    max_target_len = static_cast<int64_t>(static_cast<double>(cutoff_len) *
                                          (static_cast<double>(target_len) /
                                           static_cast<double>(source_len + target_len)));
  }
  const int64_t new_target_len = std::min(max_target_len, target_len);
  const int64_t max_source_len = std::max<int64_t>(cutoff_len - new_target_len, 0);
  const int64_t new_source_len = std::min(max_source_len, source_len);
  return {new_source_len, new_target_len};
}

Sample sft_encode_conversation(const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
                               const Conversation& conversation, const SftOptions& options,
                               bool* truncated) {
  if (options.train_on_prompt && chat_template.efficient_eos)
    throw std::invalid_argument("chat template '" + chat_template.name +
                                "' puts EOS only at the end (efficient_eos): train_on_prompt is not "
                                "supported with it");
  if (options.train_on_prompt && options.mask_history)
    throw std::invalid_argument("mask_history and train_on_prompt cannot be combined (LLaMA-Factory "
                                "refuses the pair too): mask_history trains on the last answer only");
  auto pairs = template_encode_multiturn(tokenizer, chat_template, conversation.messages,
                                         conversation.system);
  const int32_t eos = tokenizer.eos_token_id().value_or(kIgnoreLabel);
  int64_t total_length = chat_template.efficient_eos ? 1 : 0;
  if (options.mask_history) std::reverse(pairs.begin(), pairs.end());  // last turns first
  Sample s;
  bool cut = false;
  for (size_t turn = 0; turn < pairs.size(); ++turn) {
    auto& [source, target] = pairs[turn];
    if (total_length >= options.cutoff_len) {
      cut = true;
      break;
    }
    const auto [source_len, target_len] = infer_seqlen(static_cast<int64_t>(source.size()),
                                                       static_cast<int64_t>(target.size()),
                                                       options.cutoff_len - total_length);
    cut = cut || source_len < static_cast<int64_t>(source.size()) ||
          target_len < static_cast<int64_t>(target.size());
    source.resize(source_len);
    target.resize(target_len);
    total_length += source_len + target_len;

    std::vector<int32_t> source_label;
    if (options.train_on_prompt) {
      source_label = source;
    } else if (chat_template.efficient_eos && turn != 0) {
      source_label.assign(source_len, kIgnoreLabel);
      if (source_len > 0) source_label[0] = eos;
    } else {
      source_label.assign(source_len, kIgnoreLabel);
    }
    std::vector<int32_t> target_label =
        options.mask_history && turn != 0 ? std::vector<int32_t>(target_len, kIgnoreLabel) : target;

    std::vector<int32_t> ids = std::move(source), labels = std::move(source_label);
    ids.insert(ids.end(), target.begin(), target.end());
    labels.insert(labels.end(), target_label.begin(), target_label.end());
    if (options.mask_history) {  // turns were reversed: this one goes in front
      ids.insert(ids.end(), s.input_ids.begin(), s.input_ids.end());
      labels.insert(labels.end(), s.labels.begin(), s.labels.end());
      s.input_ids = std::move(ids);
      s.labels = std::move(labels);
    } else {
      s.input_ids.insert(s.input_ids.end(), ids.begin(), ids.end());
      s.labels.insert(s.labels.end(), labels.begin(), labels.end());
    }
  }
  if (chat_template.efficient_eos) {
    s.input_ids.push_back(eos);
    s.labels.push_back(eos);
  }
  if (truncated) *truncated = cut;
  return s;
}

Sample pretrain_encode_text(const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
                            const std::string& text, const SftOptions& options, bool* truncated) {
  const std::string eos = chat_template.name == "llama3" ? "<|end_of_text|>" : tokenizer.eos_token().value_or("");
  std::string doc = text + eos;
  if (tokenizer.add_bos_token() && tokenizer.bos_token()) doc = *tokenizer.bos_token() + doc;
  Sample s;
  s.input_ids = tokenizer.encode(doc);
  const bool cut = static_cast<int64_t>(s.input_ids.size()) > options.cutoff_len;
  if (cut) s.input_ids.resize(options.cutoff_len);
  s.labels = s.input_ids;
  if (truncated) *truncated = cut;
  return s;
}

std::vector<Sample> sft_dataset_load(const std::string& path, const TemplateTokenizer& tokenizer,
                                     const ChatTemplate& chat_template, const SftOptions& options,
                                     SftReport* report_out) {
  if (options.cutoff_len < 1)
    throw std::invalid_argument("cutoff_len must be at least 1, got " + std::to_string(options.cutoff_len));
  if (options.max_samples && *options.max_samples < 1)
    throw std::invalid_argument("max_samples must be at least 1, got " + std::to_string(*options.max_samples));
  const std::vector<JsonRow> rows = read_json_rows(path, options.max_samples.value_or(-1));
  if (rows.empty()) throw std::invalid_argument(path + ": no rows (an empty array or only blank lines)");
  SftReport report;
  report.formatting = options.formatting == Formatting::automatic ? detect_formatting(rows.front())
                                                                   : options.formatting;
  report.rows_read = static_cast<int64_t>(rows.size());
  std::vector<Sample> samples;
  for (const JsonRow& row : rows) {
    ConvertResult conv = convert_row(row.value, report.formatting);
    Sample s;
    bool cut = false;
    std::string reason = conv.bad_reason;
    if (conv.conversation) {
      s = report.formatting == Formatting::text
              ? pretrain_encode_text(tokenizer, chat_template, conv.conversation->messages[0].content, options, &cut)
              : sft_encode_conversation(tokenizer, chat_template, *conv.conversation, options, &cut);
      if (count_targets(s) == 0)
        reason = "no target token left after cutoff_len " + std::to_string(options.cutoff_len) +
                 " (prompt of " + std::to_string(s.input_ids.size()) + " tokens or more)";
    }
    if (!reason.empty()) {
      const std::string message = row.where + ": " + reason;
      if (!options.skip_bad) throw std::invalid_argument(message);
      ++report.skipped;
      if (report.first_bad.size() < SftReport::kMaxBadListed) report.first_bad.push_back(message);
      continue;
    }
    report.truncated += cut;
    report.tokens += static_cast<int64_t>(s.input_ids.size());
    report.target_tokens += count_targets(s);
    samples.push_back(std::move(s));
  }
  report.samples = static_cast<int64_t>(samples.size());
  if (report_out) *report_out = std::move(report);
  return samples;
}

TrainValSplit split_train_val(int64_t n, double val_size, uint64_t seed) {
  if (!(val_size > 0.0) || !std::isfinite(val_size))
    throw std::invalid_argument("val_size must be a fraction in (0, 1] or a count > 1, got " +
                                std::to_string(val_size));
  int64_t n_val;
  if (val_size > 1.0) {
    if (val_size != std::floor(val_size))
      throw std::invalid_argument("val_size above 1 is a count of samples and must be whole, got " +
                                  std::to_string(val_size));
    n_val = static_cast<int64_t>(val_size);
  } else {
    n_val = static_cast<int64_t>(std::ceil(val_size * static_cast<double>(n)));
  }
  if (n_val >= n || n_val < 1)
    throw std::invalid_argument("val_size " + std::to_string(val_size) + " of " + std::to_string(n) +
                                " samples leaves " + std::to_string(n - n_val) + " to train on and " +
                                std::to_string(n_val) + " to validate; both need at least one");
  std::vector<int64_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates; j uniform in [0, i] (rejection sampling)
    const uint64_t range = static_cast<uint64_t>(i) + 1;
    const uint64_t limit = UINT64_MAX - UINT64_MAX % range;
    uint64_t r;
    do r = io::splitmix64(state);
    while (r >= limit);
    std::swap(perm[i], perm[static_cast<int64_t>(r % range)]);
  }
  TrainValSplit split;
  split.val.assign(perm.begin(), perm.begin() + n_val);
  split.train.assign(perm.begin() + n_val, perm.end());
  return split;
}

}  // namespace qlora::data
