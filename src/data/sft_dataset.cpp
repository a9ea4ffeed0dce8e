// JSON / JSON Lines rows -> LLaMA-Factory conversations (converter.py: alpaca, sharegpt with its
// default and OpenAI-style tags) -> samples (processor/supervised.py, processor/pretrain.py).
#include "data/sft_dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
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

// AlpacaDatasetConverter's prompt (columns instruction, input, system, history): the history
// turns, then the user query "instruction\ninput" (leaving out an empty one).
ConvertResult alpaca_prompt(const json& row) {
  std::string instruction, input, system, reason;
  if (!optional_string(row, "instruction", instruction, reason) ||
      !optional_string(row, "input", input, reason) || !optional_string(row, "system", system, reason))
    return bad(reason);
  if (instruction.empty() && input.empty()) return bad("\"instruction\" and \"input\" are both empty");
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
  std::string query = instruction;
  if (!input.empty()) query += (query.empty() ? "" : "\n") + input;
  c.messages.push_back({Role::user, query});
  return ConvertResult{std::move(c), ""};
}

// A required non-empty string answer of an alpaca row ("output", "chosen", "rejected").
bool alpaca_answer(const json& row, const char* key, const char* needed, std::string& out,
                   std::string& reason) {
  if (!row.contains(key) || row[key].is_null())
    reason = std::string("no \"") + key + "\" (" + needed + ")";
  else if (!row[key].is_string())
    reason = std::string("\"") + key + "\" must be a string, got " + short_dump(row[key]);
  else if (row[key].get<std::string>().empty())
    reason = std::string("\"") + key + "\" is empty";
  else
    out = row[key].get<std::string>();
  return reason.empty();
}

// AlpacaDatasetConverter with columns instruction, input, output, system, history.
ConvertResult convert_alpaca(const json& row) {
  std::string output, reason;
  if (!alpaca_answer(row, "output", "alpaca rows need instruction, output", output, reason))
    return bad(reason);
  ConvertResult c = alpaca_prompt(row);
  if (!c.conversation) return c;
  c.conversation->messages.push_back({Role::assistant, output});
  return c;
}

// SharegptDatasetConverter's turns (also for OpenAI messages: the same converter with other
// tags): a leading system message taken out, roles alternating user|observation and
// assistant; the count of turns is the caller's to check.
ConvertResult sharegpt_turns(const json& row, const Tags& tags) {
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
  return ConvertResult{std::move(c), ""};
}

ConvertResult convert_sharegpt(const json& row, const Tags& tags) {
  ConvertResult c = sharegpt_turns(row, tags);
  if (c.conversation && c.conversation->messages.size() % 2 != 0)
    return bad(std::to_string(c.conversation->messages.size()) + " turns; expected prompt/answer "
               "pairs, the last one from " + tags.assistant);
  return c;
}

// The "chosen" / "rejected" message object of a sharegpt / OpenAI preference row: the
// assistant's, with non-empty content (LLaMA-Factory also accepts a function_call answer; tool
// calls are not supported here).
bool sharegpt_answer(const json& row, const char* key, const Tags& tags, std::string& out,
                     std::string& reason) {
  const std::string example = std::string("{\"") + tags.role + "\": \"" + tags.assistant + "\", \"" +
                              tags.content + "\": ...}";
  if (!row.contains(key) || row[key].is_null()) {
    reason = std::string("no \"") + key + "\" (preference rows need \"chosen\" and \"rejected\" "
             "messages " + example + ")";
  } else if (!row[key].is_object() || !row[key].contains(tags.role) ||
             !row[key][tags.role].is_string() || !row[key].contains(tags.content) ||
             !row[key][tags.content].is_string()) {
    reason = std::string("\"") + key + "\" must be a message " + example + ", got " + short_dump(row[key]);
  } else if (row[key][tags.role].get<std::string>() != tags.assistant) {
    reason = std::string("\"") + key + "\": role '" + row[key][tags.role].get<std::string>() +
             "' where " + tags.assistant + " is expected (the answer to the conversation)";
  } else if (row[key][tags.content].get<std::string>().empty()) {
    reason = std::string("\"") + key + "\": empty \"" + tags.content + "\"";
  } else {
    out = row[key][tags.content].get<std::string>();
  }
  return reason.empty();
}

PairConvertResult bad_pair(std::string reason) { return PairConvertResult{std::nullopt, std::move(reason)}; }

PairConvertResult convert_pair(ConvertResult prompt, const std::string& chosen,
                               const std::string& rejected) {
  if (!prompt.conversation) return bad_pair(prompt.bad_reason);
  PairConversation p;
  p.prompt = std::move(prompt.conversation->messages);
  p.system = std::move(prompt.conversation->system);
  p.chosen = chosen;
  p.rejected = rejected;
  return PairConvertResult{std::move(p), ""};
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
    } catch (const json::exception& e) {  // out_of_range: a number like 1e999
      throw std::invalid_argument(path + ": not valid JSON (" + std::string(e.what()) + ")");
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
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
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
  else if (r.contains("instruction") || r.contains("output") || r.contains("chosen"))
    return Formatting::alpaca;
  else if (r.contains("text")) return Formatting::text;
  std::string keys;
  for (const auto& [k, v] : r.items()) keys += (keys.empty() ? "" : ", ") + k;
  throw std::invalid_argument(first_row.where + ": cannot tell the dataset formatting from the keys {" +
                              keys + "}; expected \"conversations\" (sharegpt), \"messages\" (openai), "
                              "\"instruction\"/\"output\"/\"chosen\" (alpaca) or \"text\", or set formatting");
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

bool is_pair_row(const json& row) { return row.contains("chosen") && row.contains("rejected"); }

PairConvertResult convert_pair_row(const json& row, Formatting formatting) {
  std::string chosen, rejected, reason;
  if (formatting == Formatting::alpaca) {
    const char* needed = "alpaca preference rows need instruction, chosen, rejected";
    if (!alpaca_answer(row, "chosen", needed, chosen, reason) ||
        !alpaca_answer(row, "rejected", needed, rejected, reason))
      return bad_pair(reason);
    return convert_pair(alpaca_prompt(row), chosen, rejected);
  }
  if (formatting == Formatting::sharegpt || formatting == Formatting::openai) {
    const Tags& tags = formatting == Formatting::sharegpt ? kSharegptTags : kOpenaiTags;
    ConvertResult prompt = sharegpt_turns(row, tags);
    if (prompt.conversation && prompt.conversation->messages.size() % 2 == 0)
      return bad_pair(std::to_string(prompt.conversation->messages.size()) + " turns in \"" +
                      tags.messages + "\"; a preference row's conversation ends with a " +
                      tags.user + " turn (odd count), the answers are \"chosen\" and \"rejected\"");
    if (!prompt.conversation) return bad_pair(prompt.bad_reason);
    if (!sharegpt_answer(row, "chosen", tags, chosen, reason) ||
        !sharegpt_answer(row, "rejected", tags, rejected, reason))
      return bad_pair(reason);
    return convert_pair(std::move(prompt), chosen, rejected);
  }
  throw std::invalid_argument(std::string("convert_pair_row: formatting '") + formatting_name(formatting) +
                              "' has no preference rows (expected alpaca, sharegpt or openai)");
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

PairSample pair_encode_conversation(const TemplateTokenizer& tokenizer,
                                    const ChatTemplate& chat_template,
                                    const PairConversation& pair, int64_t cutoff_len,
                                    bool* truncated) {
  if (pair.prompt.empty() || pair.prompt.size() % 2 == 0)
    throw std::invalid_argument("pair_encode_conversation: " + std::to_string(pair.prompt.size()) +
                                " prompt messages (expected an odd count ending with a user turn)");
  // encode_oneturn: every message but the last makes the prompt, the last the answer.
  auto encode = [&](const std::string& answer, std::vector<int32_t>& prompt_ids) {
    std::vector<Message> messages = pair.prompt;
    messages.push_back({Role::assistant, answer});
    auto encoded = template_encode_messages(tokenizer, chat_template, messages, pair.system);
    prompt_ids.clear();
    for (size_t i = 0; i + 1 < encoded.size(); ++i)
      prompt_ids.insert(prompt_ids.end(), encoded[i].begin(), encoded[i].end());
    return std::move(encoded.back());
  };
  std::vector<int32_t> prompt_ids, unused;
  std::vector<int32_t> chosen_ids = encode(pair.chosen, prompt_ids);
  std::vector<int32_t> rejected_ids = encode(pair.rejected, unused);
  if (chat_template.efficient_eos) {
    const int32_t eos = tokenizer.eos_token_id().value_or(kIgnoreLabel);
    chosen_ids.push_back(eos);
    rejected_ids.push_back(eos);
  }
  const auto longest = static_cast<int64_t>(std::max(chosen_ids.size(), rejected_ids.size()));
  // "consider the response is more important": the longer answer's length is the target.
  const auto [source_len, target_len] =
      infer_seqlen(static_cast<int64_t>(prompt_ids.size()), longest, cutoff_len);
  if (truncated) *truncated = source_len < static_cast<int64_t>(prompt_ids.size()) || target_len < longest;
  prompt_ids.resize(source_len);
  PairSample out;
  for (auto [answer, sample] : {std::pair{&chosen_ids, &out.chosen}, std::pair{&rejected_ids, &out.rejected}}) {
    if (static_cast<int64_t>(answer->size()) > target_len) answer->resize(target_len);
    sample->input_ids = prompt_ids;
    sample->input_ids.insert(sample->input_ids.end(), answer->begin(), answer->end());
    sample->labels.assign(prompt_ids.size(), kIgnoreLabel);
    sample->labels.insert(sample->labels.end(), answer->begin(), answer->end());
  }
  return out;
}

namespace {

void load_options_check(const SftOptions& options) {
  if (options.cutoff_len < 1)
    throw std::invalid_argument("cutoff_len must be at least 1, got " + std::to_string(options.cutoff_len));
  if (options.max_samples && *options.max_samples < 1)
    throw std::invalid_argument("max_samples must be at least 1, got " + std::to_string(*options.max_samples));
}

std::string row_keys(const json& row) {
  std::string keys;
  for (const auto& [k, v] : row.items()) keys += (keys.empty() ? "" : ", ") + k;
  return "{" + keys + "}";
}

// The row loop both loaders share: `encode(row, formatting, cut, reason)` gives a sample (or
// sets reason), `count(sample, tokens, targets)` adds its token counts; bad rows throw or are
// skipped and listed.
template <typename Out, typename Encode, typename Count>
std::vector<Out> rows_load(const std::vector<JsonRow>& rows, Formatting formatting,
                           const SftOptions& options, SftReport& report, Encode&& encode,
                           Count&& count) {
  report.formatting = formatting;
  report.rows_read = static_cast<int64_t>(rows.size());
  std::vector<Out> samples;
  for (const JsonRow& row : rows) {
    bool cut = false;
    std::string reason;
    Out s = encode(row.value, cut, reason);
    if (!reason.empty()) {
      const std::string message = row.where + ": " + reason;
      if (!options.skip_bad) throw std::invalid_argument(message);
      ++report.skipped;
      if (report.first_bad.size() < SftReport::kMaxBadListed) report.first_bad.push_back(message);
      continue;
    }
    report.truncated += cut;
    count(s, report.tokens, report.target_tokens);
    samples.push_back(std::move(s));
  }
  report.samples = static_cast<int64_t>(samples.size());
  return samples;
}

std::string no_target_reason(int64_t cutoff_len, size_t length) {
  return "no target token left after cutoff_len " + std::to_string(cutoff_len) + " (prompt of " +
         std::to_string(length) + " tokens or more)";
}

}  // namespace

std::vector<Sample> sft_dataset_load(const std::string& path, const TemplateTokenizer& tokenizer,
                                     const ChatTemplate& chat_template, const SftOptions& options,
                                     SftReport* report_out) {
  load_options_check(options);
  const std::vector<JsonRow> rows = read_json_rows(path, options.max_samples.value_or(-1));
  if (rows.empty()) throw std::invalid_argument(path + ": no rows (an empty array or only blank lines)");
  if (is_pair_row(rows.front().value))
    throw std::invalid_argument(rows.front().where + ": a preference row (\"chosen\" and \"rejected\" "
                                "answers) in a dataset for train.stage = sft: set train.stage = dpo "
                                "to train on preference pairs, or give rows with one answer");
  const Formatting formatting = options.formatting == Formatting::automatic
                                    ? detect_formatting(rows.front())
                                    : options.formatting;
  SftReport report;
  auto encode = [&](const json& row, bool& cut, std::string& reason) {
    ConvertResult conv = convert_row(row, formatting);
    Sample s;
    reason = conv.bad_reason;
    if (conv.conversation) {
      s = formatting == Formatting::text
              ? pretrain_encode_text(tokenizer, chat_template, conv.conversation->messages[0].content, options, &cut)
              : sft_encode_conversation(tokenizer, chat_template, *conv.conversation, options, &cut);
      if (count_targets(s) == 0) reason = no_target_reason(options.cutoff_len, s.input_ids.size());
    }
    return s;
  };
  auto count = [](const Sample& s, int64_t& tokens, int64_t& targets) {
    tokens += static_cast<int64_t>(s.input_ids.size());
    targets += count_targets(s);
  };
  std::vector<Sample> samples = rows_load<Sample>(rows, formatting, options, report, encode, count);
  if (report_out) *report_out = std::move(report);
  return samples;
}

std::vector<PairSample> pair_dataset_load(const std::string& path,
                                          const TemplateTokenizer& tokenizer,
                                          const ChatTemplate& chat_template,
                                          const SftOptions& options, SftReport* report_out) {
  load_options_check(options);
  if (options.formatting == Formatting::text)
    throw std::invalid_argument(path + ": formatting text has no preference pairs (train.stage = "
                                "dpo reads alpaca, sharegpt or openai rows with \"chosen\" and "
                                "\"rejected\" answers)");
  const std::vector<JsonRow> rows = read_json_rows(path, options.max_samples.value_or(-1));
  if (rows.empty()) throw std::invalid_argument(path + ": no rows (an empty array or only blank lines)");
  if (!is_pair_row(rows.front().value))
    throw std::invalid_argument(rows.front().where + ": train.stage = dpo needs preference rows with "
                                "\"chosen\" and \"rejected\" answers; this row has the keys " +
                                row_keys(rows.front().value) + " (a dataset for train.stage = sft?)");
  const Formatting formatting = options.formatting == Formatting::automatic
                                    ? detect_formatting(rows.front())
                                    : options.formatting;
  if (formatting == Formatting::text)
    throw std::invalid_argument(rows.front().where + ": a \"text\" row has no preference pair (expected "
                                "alpaca, sharegpt or openai rows with \"chosen\" and \"rejected\")");
  SftReport report;
  auto encode = [&](const json& row, bool& cut, std::string& reason) {
    PairConvertResult conv = convert_pair_row(row, formatting);
    PairSample s;
    reason = conv.bad_reason;
    if (conv.pair) {
      s = pair_encode_conversation(tokenizer, chat_template, *conv.pair, options.cutoff_len, &cut);
      if (count_targets(s.chosen) == 0 || count_targets(s.rejected) == 0)
        reason = no_target_reason(options.cutoff_len, s.chosen.input_ids.size());
    }
    return s;
  };
  auto count = [](const PairSample& s, int64_t& tokens, int64_t& targets) {
    for (const Sample* side : {&s.chosen, &s.rejected}) {
      tokens += static_cast<int64_t>(side->input_ids.size());
      targets += count_targets(*side);
    }
  };
  std::vector<PairSample> pairs = rows_load<PairSample>(rows, formatting, options, report, encode, count);
  if (report_out) *report_out = std::move(report);
  return pairs;
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
    if (val_size >= static_cast<double>(n)) {  // also keeps the cast below inside int64
      char count[32];
      std::snprintf(count, sizeof count, "%.17g", val_size);
      throw std::invalid_argument("val_size " + std::string(count) + " of " + std::to_string(n) +
                                  " samples leaves none to train on; both need at least one");
    }
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
