// LLaMA-Factory 0.9.5's templates (data/template.py register_template calls) as data, and its
// Template._encode / Llama2Template._encode / fix_special_tokens rewritten for our tokenizer.
#include "data/chat_template.h"

#include <map>
#include <stdexcept>

namespace qlora::data {
namespace {

Slot text(std::string s) { return Slot{Slot::Kind::text, std::move(s)}; }
const Slot kBos{Slot::Kind::bos_token, ""};
const Slot kEos{Slot::Kind::eos_token, ""};

// register_template's defaults: user/system "{{content}}", assistant "{{content}}" + EOS (no EOS
// with efficient_eos), observation = the template's user format.
ChatTemplate make_template(std::string name, Slots user, Slots assistant, Slots system,
                           Slots observation = {}) {
  ChatTemplate t;
  t.name = std::move(name);
  t.format_user = user.empty() ? Slots{text("{{content}}")} : user;
  t.format_assistant = assistant.empty() ? Slots{text("{{content}}"), kEos} : assistant;
  t.format_system = system.empty() ? Slots{text("{{content}}")} : system;
  t.format_observation = observation.empty() ? t.format_user : observation;
  return t;
}

std::map<std::string, ChatTemplate> build_templates() {
  std::map<std::string, ChatTemplate> all;
  auto add = [&](ChatTemplate t) { all.emplace(t.name, std::move(t)); };
  const std::string im_user = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n";
  const std::string im_assistant = "{{content}}<|im_end|>\n";
  const std::string im_system = "<|im_start|>system\n{{content}}<|im_end|>\n";

  add(make_template("default", {text("Human: {{content}}"), kEos, text("\nAssistant:")},
                    {text("{{content}}"), kEos, text("\n")},
                    {text("System: {{content}}"), kEos, text("\n")}));
  {
    ChatTemplate t = make_template("alpaca", {text("### Instruction:\n{{content}}\n\n### Response:\n")},
                                   {text("{{content}}"), kEos, text("\n\n")}, {});
    t.default_system =
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n";
    add(t);
  }
  {
    ChatTemplate t = make_template(
        "chatml", {text(im_user)}, {text(im_assistant)}, {text(im_system)},
        {text("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n")});
    t.stop_words = {"<|im_end|>", "<|im_start|>"};
    t.replace_eos = true;
    add(t);
  }
  {
    ChatTemplate t = make_template("qwen", {text(im_user)}, {text(im_assistant)}, {text(im_system)},
                                   {text("<|im_start|>user\n<tool_response>\n{{content}}\n"
                                         "</tool_response><|im_end|>\n<|im_start|>assistant\n")});
    t.default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
    t.stop_words = {"<|im_end|>"};
    t.replace_eos = true;
    add(t);
  }
  {
    ChatTemplate t = make_template("llama2", {kBos, text("[INST] {{content}} [/INST]")}, {},
                                   {text("<<SYS>>\n{{content}}\n<</SYS>>\n\n")});
    t.system_placement = SystemPlacement::fused_into_first_user;
    add(t);
  }
  {
    ChatTemplate t = make_template(
        "llama3",
        {text("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")},
        {text("{{content}}<|eot_id|>")},
        {text("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>")},
        {text("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")});
    t.format_prefix = {kBos};
    t.stop_words = {"<|eot_id|>", "<|eom_id|>"};
    t.replace_eos = true;
    add(t);
  }
  {
    ChatTemplate t = make_template("mistral", {text("[INST] {{content}}[/INST]")},
                                   {text(" {{content}}"), kEos}, {text("{{content}}\n\n")},
                                   {text("[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]")});
    t.format_prefix = {kBos};
    t.system_placement = SystemPlacement::fused_into_first_user;
    add(t);
  }
  {
    ChatTemplate t = make_template("smollm2", {text(im_user)}, {text(im_assistant)}, {text(im_system)});
    t.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face.";
    t.stop_words = {"<|im_end|>"};
    add(t);
  }
  add(make_template("empty", {}, {text("{{content}}")}, {}));
  return all;
}

const std::map<std::string, ChatTemplate>& templates() {
  static const std::map<std::string, ChatTemplate> all = build_templates();
  return all;
}

// StringFormatter.apply: the first "{{content}}" of each text slot becomes `content`.
Slots format_slots(const Slots& slots, const std::string& content) {
  Slots out = slots;
  for (Slot& s : out) {
    if (s.kind != Slot::Kind::text) continue;
    const size_t at = s.text.find("{{content}}");
    if (at != std::string::npos) s.text.replace(at, 11, content);
  }
  return out;
}

void append_ids(const TemplateTokenizer& tokenizer, const Slots& elements, std::vector<int32_t>& ids) {
  for (const Slot& e : elements) {
    if (e.kind == Slot::Kind::text) {
      if (e.text.empty()) continue;
      const std::vector<int32_t> piece = tokenizer.encode(e.text);
      ids.insert(ids.end(), piece.begin(), piece.end());
    } else if (e.kind == Slot::Kind::bos_token) {
      if (tokenizer.bos_token_id()) ids.push_back(*tokenizer.bos_token_id());
    } else if (e.kind == Slot::Kind::eos_token) {
      if (tokenizer.eos_token_id()) ids.push_back(*tokenizer.eos_token_id());
    } else {
      throw std::logic_error("append_ids: unknown slot kind " + std::to_string(static_cast<int>(e.kind)));
    }
  }
}

}  // namespace

const char* role_name(Role role) {
  if (role == Role::user) return "user";
  else if (role == Role::assistant) return "assistant";
  else if (role == Role::system) return "system";
  else if (role == Role::function) return "function";
  else if (role == Role::observation) return "observation";
  else throw std::logic_error("role_name: unknown role " + std::to_string(static_cast<int>(role)));
}

std::vector<std::string> chat_template_names() {
  std::vector<std::string> names;
  for (const auto& [name, t] : templates()) names.push_back(name);
  return names;
}

const ChatTemplate& chat_template_by_name(const std::string& name) {
  const auto it = templates().find(name);
  if (it != templates().end()) return it->second;
  std::string valid;
  for (const std::string& n : chat_template_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown chat template '" + name + "' (valid: " + valid + ")");
}

TemplateTokenizer::TemplateTokenizer(EncodeFn encode, TokenToIdFn token_to_id, int64_t vocab_size,
                                     const TokenizerConfig& config, const ChatTemplate& chat_template)
    : encode_(std::move(encode)), token_to_id_(std::move(token_to_id)), vocab_size_(vocab_size),
      bos_token_(config.bos_token), eos_token_(config.eos_token), add_bos_token_(config.add_bos_token) {
  if (bos_token_) bos_token_id_ = token_to_id_(*bos_token_);
  if (eos_token_) eos_token_id_ = token_to_id_(*eos_token_);
  // fix_special_tokens: replace_eos, then a missing EOS, then the remaining stop words.
  auto set_eos = [&](const std::string& token) {
    if (eos_token_ && *eos_token_ == token && eos_token_id_) return;
    eos_token_ = token;
    eos_token_id_ = register_token(token);
  };
  std::vector<std::string> stop_words = chat_template.stop_words;
  if (chat_template.replace_eos) {
    if (stop_words.empty())
      throw std::invalid_argument("chat template '" + chat_template.name +
                                  "': replace_eos needs at least one stop word");
    set_eos(stop_words.front());
    stop_words.erase(stop_words.begin());
  }
  if (!eos_token_id_) set_eos("<|endoftext|>");
  for (const std::string& w : stop_words) register_token(w);
}

int32_t TemplateTokenizer::register_token(const std::string& token) {
  for (const auto& [s, id] : added_) {
    if (s == token) return id;
  }
  const std::optional<int32_t> known = token_to_id_(token);
  const int32_t id = known ? *known : static_cast<int32_t>(vocab_size_++);
  added_.emplace_back(token, id);
  return id;
}

std::vector<int32_t> TemplateTokenizer::encode(std::string_view text) const {
  if (added_.empty()) return encode_(text);
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    // The leftmost registered token, the longest one where several start at the same place.
    size_t best_at = std::string_view::npos, best_len = 0;
    int32_t best_id = 0;
    for (const auto& [s, id] : added_) {
      const size_t at = text.find(s, pos);
      if (at == std::string_view::npos) continue;
      if (at < best_at || (at == best_at && s.size() > best_len)) {
        best_at = at;
        best_len = s.size();
        best_id = id;
      }
    }
    const size_t end = best_at == std::string_view::npos ? text.size() : best_at;
    if (end > pos) {
      const std::vector<int32_t> piece = encode_(text.substr(pos, end - pos));
      ids.insert(ids.end(), piece.begin(), piece.end());
    }
    if (best_at == std::string_view::npos) break;
    ids.push_back(best_id);
    pos = best_at + best_len;
  }
  return ids;
}

std::vector<std::vector<int32_t>> template_encode_messages(const TemplateTokenizer& tokenizer,
                                                           const ChatTemplate& chat_template,
                                                           const std::vector<Message>& messages,
                                                           const std::string& system_in) {
  const std::string& system = system_in.empty() ? chat_template.default_system : system_in;
  const bool fused = chat_template.system_placement == SystemPlacement::fused_into_first_user;
  if (chat_template.system_placement != SystemPlacement::own_element && !fused)
    throw std::logic_error("template_encode_messages: unknown system placement");
  std::vector<std::vector<int32_t>> encoded;
  for (size_t i = 0; i < messages.size(); ++i) {
    const Message& m = messages[i];
    Slots elements;
    std::string system_text;  // fused: the formatted system, prepended to the first user content
    if (i == 0) {
      elements = chat_template.format_prefix;
      if (!system.empty()) {
        const Slots formatted = format_slots(chat_template.format_system, system);
        if (fused) {
          system_text = formatted.front().text;
        } else {
          elements.insert(elements.end(), formatted.begin(), formatted.end());
        }
      }
    }
    Slots body;
    if (m.role == Role::user) {
      body = format_slots(chat_template.format_user, system_text + m.content);
    } else if (m.role == Role::assistant) {
      body = format_slots(chat_template.format_assistant, m.content);
    } else if (m.role == Role::observation) {
      body = format_slots(chat_template.format_observation, m.content);
    } else {
      throw std::invalid_argument(std::string("chat template '") + chat_template.name + "': a " +
                                  role_name(m.role) + " message cannot be encoded (supported in a "
                                  "conversation: user, assistant, observation)");
    }
    elements.insert(elements.end(), body.begin(), body.end());
    std::vector<int32_t> ids;
    append_ids(tokenizer, elements, ids);
    encoded.push_back(std::move(ids));
  }
  return encoded;
}

std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> template_encode_multiturn(
    const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
    const std::vector<Message>& messages, const std::string& system) {
  if (messages.size() % 2 != 0)
    throw std::invalid_argument("template_encode_multiturn: " + std::to_string(messages.size()) +
                                " messages; expected prompt/answer pairs (an even count)");
  std::vector<std::vector<int32_t>> encoded =
      template_encode_messages(tokenizer, chat_template, messages, system);
  std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> pairs;
  for (size_t i = 0; i + 1 < encoded.size(); i += 2)
    pairs.emplace_back(std::move(encoded[i]), std::move(encoded[i + 1]));
  return pairs;
}

}  // namespace qlora::data
