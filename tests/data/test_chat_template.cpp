// Chat templates against LLaMA-Factory 0.9.5's rules (data/template.py), with a byte-level fake
// tokenizer so every expected id list is written from the template text by hand.
#include "data/chat_template.h"

#include <gtest/gtest.h>

#include "expect_error.h"
#include "fake_text_tokenizer.h"

namespace qlora::data {
namespace {

using testing::bytes;
using testing::cat;
using testing::contains;
using Pairs = std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>>;
constexpr int32_t kBos = 256, kEos = 257, kImEnd = 258;

std::vector<Message> two_turns() {
  return {{Role::user, "hi"}, {Role::assistant, "yo"}, {Role::user, "q2"}, {Role::assistant, "a2"}};
}

TEST(ChatTemplate, UnknownNameListsTheValidOnes) {
  const std::string msg = testing::invalid_argument_message([] { chat_template_by_name("vicuna"); });
  EXPECT_TRUE(contains(msg, "'vicuna'")) << msg;
  for (const char* n : {"default", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "smollm2", "empty"})
    EXPECT_TRUE(contains(msg, n)) << n << " missing from: " << msg;
}

TEST(ChatTemplate, EmptyTemplateIsTheTextAlone) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  const Pairs got = template_encode_multiturn(tok, t, two_turns(), "");
  EXPECT_EQ(got, (Pairs{{bytes("hi"), bytes("yo")}, {bytes("q2"), bytes("a2")}}));
  // A system prompt is plain text before the first user message (format_system "{{content}}").
  const Pairs with_system = template_encode_multiturn(tok, t, {{Role::user, "hi"}, {Role::assistant, "yo"}}, "S");
  EXPECT_EQ(with_system[0].first, bytes("Shi"));
}

TEST(ChatTemplate, DefaultTemplateEosSlotsAndSystem) {
  const ChatTemplate& t = chat_template_by_name("default");
  const auto tok = testing::fake_tokenizer(t);
  const Pairs got = template_encode_multiturn(tok, t, two_turns(), "sys");
  const std::vector<int32_t> p0 = cat({bytes("System: sys"), {kEos}, bytes("\n"), bytes("Human: hi"), {kEos},
                                       bytes("\nAssistant:")});
  const std::vector<int32_t> a0 = cat({bytes("yo"), {kEos}, bytes("\n")});
  const std::vector<int32_t> p1 = cat({bytes("Human: q2"), {kEos}, bytes("\nAssistant:")});
  const std::vector<int32_t> a1 = cat({bytes("a2"), {kEos}, bytes("\n")});
  EXPECT_EQ(got, (Pairs{{p0, a0}, {p1, a1}}));
}

TEST(ChatTemplate, AlpacaDefaultSystemWhenTheRowHasNone) {
  const ChatTemplate& t = chat_template_by_name("alpaca");
  const auto tok = testing::fake_tokenizer(t);
  const Pairs got = template_encode_multiturn(tok, t, {{Role::user, "hi"}, {Role::assistant, "yo"}}, "");
  EXPECT_EQ(got[0].first, bytes("Below is an instruction that describes a task. Write a response that "
                                "appropriately completes the request.\n\n### Instruction:\nhi\n\n### Response:\n"));
  EXPECT_EQ(got[0].second, cat({bytes("yo"), {kEos}, bytes("\n\n")}));
}

TEST(ChatTemplate, Llama2FusesTheSystemIntoTheFirstUserMessage) {
  const ChatTemplate& t = chat_template_by_name("llama2");
  const auto tok = testing::fake_tokenizer(t);
  const Pairs got = template_encode_multiturn(tok, t, two_turns(), "S");
  EXPECT_EQ(got[0].first, cat({{kBos}, bytes("[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]")}));
  EXPECT_EQ(got[0].second, cat({bytes("yo"), {kEos}}));
  EXPECT_EQ(got[1].first, cat({{kBos}, bytes("[INST] q2 [/INST]")}));
  // mistral: BOS prefix once, system "S\n\n" fused, answer " a" + EOS.
  const ChatTemplate& m = chat_template_by_name("mistral");
  const auto mtok = testing::fake_tokenizer(m);
  const Pairs mg = template_encode_multiturn(mtok, m, two_turns(), "S");
  EXPECT_EQ(mg[0].first, cat({{kBos}, bytes("[INST] S\n\nhi[/INST]")}));
  EXPECT_EQ(mg[0].second, cat({bytes(" yo"), {kEos}}));
  EXPECT_EQ(mg[1].first, bytes("[INST] q2[/INST]"));
}

TEST(ChatTemplate, ReplaceEosUsesTheFirstStopWordAndAddsTheOthers) {
  // chatml: EOS becomes <|im_end|> (known id), <|im_start|> is new: the next id after the vocab.
  const ChatTemplate& t = chat_template_by_name("chatml");
  const auto tok = testing::fake_tokenizer(t);
  EXPECT_EQ(tok.eos_token(), "<|im_end|>");
  EXPECT_EQ(tok.eos_token_id(), kImEnd);
  EXPECT_EQ(tok.vocab_size(), testing::kFakeVocab + 1);
  EXPECT_EQ(tok.encode("a<|im_start|>b"), (std::vector<int32_t>{'a', 259, 'b'}));
  // llama3: both stop words are new, in order; BOS prefix; EOS id is <|eot_id|>'s.
  const ChatTemplate& l3 = chat_template_by_name("llama3");
  const auto tok3 = testing::fake_tokenizer(l3);
  EXPECT_EQ(tok3.eos_token_id(), 259);
  EXPECT_EQ(tok3.encode("<|eom_id|><|eot_id|>"), (std::vector<int32_t>{260, 259}));
  const Pairs got = template_encode_multiturn(tok3, l3, {{Role::user, "u"}, {Role::assistant, "a"}}, "");
  EXPECT_EQ(got[0].second, (std::vector<int32_t>{'a', 259}));
  EXPECT_EQ(got[0].first.front(), kBos);
}

TEST(ChatTemplate, MissingEosBecomesEndOfText) {
  TokenizerConfig c = testing::fake_config();
  c.eos_token.reset();
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t, c);
  EXPECT_EQ(tok.eos_token(), "<|endoftext|>");
  EXPECT_EQ(tok.eos_token_id(), testing::kFakeVocab);
}

TEST(ChatTemplate, SmolLM2KeepsItsEosAndObservationIsTheUserFormat) {
  const ChatTemplate& t = chat_template_by_name("smollm2");
  const auto tok = testing::fake_tokenizer(t);
  EXPECT_EQ(tok.eos_token(), "</s>");  // no replace_eos
  const Pairs got = template_encode_multiturn(
      tok, t, {{Role::user, "u"}, {Role::assistant, "a"}, {Role::observation, "o"}, {Role::assistant, "b"}}, "");
  EXPECT_EQ(got[1].first, cat({bytes("<|im_start|>user\no"), {kImEnd}, bytes("\n<|im_start|>assistant\n")}));
}

TEST(ChatTemplate, OddMessageCountAndFunctionRoleAreRefused) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  EXPECT_TRUE(contains(testing::invalid_argument_message([&] {
    template_encode_multiturn(tok, t, {{Role::user, "u"}}, "");
  }), "even"));
  EXPECT_TRUE(contains(testing::invalid_argument_message([&] {
    template_encode_multiturn(tok, t, {{Role::user, "u"}, {Role::function, "f"}}, "");
  }), "function"));
}

}  // namespace
}  // namespace qlora::data
