// LLaMA-Factory 0.9.5's chat templates (data/template.py) by name, and how they turn a conversation
// into token ids: each formatted element is encoded on its own (add_special_tokens=false) and
// the pieces concatenated; {bos_token}/{eos_token} slots become the tokenizer's ids.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/tokenizer_config.h"

namespace qlora::data {

enum class Role { user, assistant, system, function, observation };
const char* role_name(Role role);  // LLaMA-Factory's Role values: "user", "assistant", ...

struct Message {
  Role role;
  std::string content;
};

// One element of a formatter's slots: text (with "{{content}}" where the message goes) or the
// tokenizer's BOS / EOS token (LLaMA-Factory's {"bos_token"} / {"eos_token"} sets).
struct Slot {
  enum class Kind { text, bos_token, eos_token };
  Kind kind = Kind::text;
  std::string text;
};
using Slots = std::vector<Slot>;

// Where the system prompt goes: its own formatted element before the first user turn
// (LLaMA-Factory's Template), or prepended to the first user message's content (Llama2Template:
// llama2, mistral).
enum class SystemPlacement { own_element, fused_into_first_user };

struct ChatTemplate {
  std::string name;
  Slots format_prefix;       // turn 0 only, before the system
  Slots format_system;       // "{{content}}" = system prompt
  Slots format_user;
  Slots format_assistant;
  Slots format_observation;  // tool results (sharegpt "observation")
  std::string default_system;             // used when a row has no (or an empty) system prompt
  std::vector<std::string> stop_words;    // added as special tokens; [0] replaces EOS if replace_eos
  bool efficient_eos = false;  // EOS once at the end of the sample instead of in each answer
  bool replace_eos = false;
  SystemPlacement system_placement = SystemPlacement::own_element;
};

// LLaMA-Factory's template of that name. Known: chat_template_names(). Another name is
// std::invalid_argument "unknown chat template 'X' (valid: alpaca, chatml, ...)".
const ChatTemplate& chat_template_by_name(const std::string& name);
std::vector<std::string> chat_template_names();

// The tokenizer as LLaMA-Factory's templates see it after get_template_and_fix_tokenizer:
// replace_eos makes stop_words[0] the EOS token, a missing EOS becomes "<|endoftext|>", the other
// stop words become special tokens. A token string the vocabulary lacks gets the next free id
// (vocab_size, vocab_size + 1, ...), as transformers' add_special_tokens does; encode() splits
// these strings out of the text before the base tokenizer sees it.
class TemplateTokenizer {
 public:
  using EncodeFn = std::function<std::vector<int32_t>(std::string_view)>;  // add_special_tokens=false
  using TokenToIdFn = std::function<std::optional<int32_t>(std::string_view)>;

  TemplateTokenizer(EncodeFn encode, TokenToIdFn token_to_id, int64_t vocab_size,
                    const TokenizerConfig& config, const ChatTemplate& chat_template);

  std::vector<int32_t> encode(std::string_view text) const;
  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }
  std::optional<int32_t> bos_token_id() const { return bos_token_id_; }
  std::optional<int32_t> eos_token_id() const { return eos_token_id_; }
  bool add_bos_token() const { return add_bos_token_; }
  // Every token string the template registered, with its id (existing or new).
  const std::vector<std::pair<std::string, int32_t>>& template_tokens() const { return added_; }
  int64_t vocab_size() const { return vocab_size_; }  // including the new tokens

 private:
  int32_t register_token(const std::string& token);

  EncodeFn encode_;
  TokenToIdFn token_to_id_;
  int64_t vocab_size_;
  std::optional<std::string> bos_token_, eos_token_;
  std::optional<int32_t> bos_token_id_, eos_token_id_;
  bool add_bos_token_ = false;
  std::vector<std::pair<std::string, int32_t>> added_;
};

// LLaMA-Factory's Template._encode: one id list per message. Turn 0 gets prefix + system (the
// row's system, else the template's default; none when both are empty).
std::vector<std::vector<int32_t>> template_encode_messages(const TemplateTokenizer& tokenizer,
                                                           const ChatTemplate& chat_template,
                                                           const std::vector<Message>& messages,
                                                           const std::string& system);

// LLaMA-Factory's encode_multiturn: (prompt_ids, answer_ids) per turn; messages alternate
// user|observation, assistant, ... and end with an assistant message.
std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> template_encode_multiturn(
    const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
    const std::vector<Message>& messages, const std::string& system);

}  // namespace qlora::data
