// qlora::data::Tokenizer on small hand-made tokenizer.json files: BPE merge order, byte_fallback
// with unk fusing, added tokens with lstrip/rstrip/single_word, decoders, and one clear message
// for each malformed or unsupported file. Expected ids and strings were produced by the
// `tokenizers` package 0.23.3 (Tokenizer.from_str on the same json text), not by this code.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "expect_error.h"

namespace qlora::data {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using Ids = std::vector<int32_t>;

const std::string kMergesJson = R"json({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}, "merges": ["b c", "a b", "a bc"]}, "post_processor": null, "decoder": null})json";
const std::string kByteFallbackJson = R"json({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}], "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}, "pre_tokenizer": null, "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "vocab": {"<unk>": 0, "a": 1, "<0xE2>": 2, "<0x82>": 3, "<0xAC>": 4, "\u2581": 5, "\u2581a": 6}, "merges": ["\u2581 a"]}, "post_processor": null, "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}})json";
const std::string kAddedJson = R"json({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{"id": 10, "content": "<L>", "single_word": false, "lstrip": true, "rstrip": false, "normalized": false, "special": true}, {"id": 11, "content": "<R>", "single_word": false, "lstrip": false, "rstrip": true, "normalized": false, "special": false}, {"id": 12, "content": "<N>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}, {"id": 13, "content": "xy", "single_word": true, "lstrip": false, "rstrip": false, "normalized": true, "special": false}], "normalizer": null, "pre_tokenizer": null, "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": {" ": 0, "x": 1, "y": 2}, "merges": []}, "post_processor": null, "decoder": null})json";

TEST(Tokenizer, MergesApplyLowestRankFirst) {
  const auto tok = Tokenizer::from_json_text(kMergesJson, "merges.json");
  // merges: "b c" (rank 0), "a b" (1), "a bc" (2); 'd' is not in the vocabulary and has no unk.
  EXPECT_EQ(tok.encode("abc"), (Ids{5}));
  EXPECT_EQ(tok.encode("abab"), (Ids{3, 3}));
  EXPECT_EQ(tok.encode("abd"), (Ids{3}));
  EXPECT_EQ(tok.encode("cab"), (Ids{2, 3}));
  EXPECT_EQ(tok.encode("aabbcc"), (Ids{0, 3, 4, 2}));
  EXPECT_EQ(tok.encode(""), (Ids{}));
  EXPECT_EQ(tok.vocab_size(), 6);
  EXPECT_EQ(tok.token_to_id("bc"), 4);
  EXPECT_EQ(tok.id_to_token(5), "abc");
  EXPECT_EQ(tok.id_to_token(6), std::nullopt);
  EXPECT_EQ(tok.content_hash().size(), 16u);
}

TEST(Tokenizer, ByteFallbackAndFusedUnk) {
  const auto tok = Tokenizer::from_json_text(kByteFallbackJson, "byte_fallback.json");
  EXPECT_EQ(tok.encode("a€"), (Ids{6, 2, 3, 4}));        // € = E2 82 AC as <0x..> tokens
  EXPECT_EQ(tok.encode("ßß a"), (Ids{5, 0, 6}));          // ß has no byte tokens: one fused <unk>
  EXPECT_EQ(tok.encode("a a€ß"), (Ids{6, 6, 2, 3, 4, 0}));
  EXPECT_EQ(tok.decode({6, 2, 3, 4}), "a€");
  EXPECT_EQ(tok.decode({2, 3}), "\xef\xbf\xbd\xef\xbf\xbd");  // an incomplete sequence: one U+FFFD per byte
  EXPECT_EQ(tok.decode({6, 0, 5, 1}), "a<unk> a");  // Replace, ByteFallback, Fuse, Strip(1, 0)
  EXPECT_EQ(tok.decode({6, 0, 5, 1}, true), "a a");
}

TEST(Tokenizer, AddedTokensStripAndSingleWord) {
  const auto tok = Tokenizer::from_json_text(kAddedJson, "added.json");
  // Ids: tokenizers gives tokens outside the model vocabulary ids from its size (3) on.
  EXPECT_EQ(tok.encode("x  <L>  y"), (Ids{1, 3, 0, 0, 2}));      // lstrip takes the spaces before
  EXPECT_EQ(tok.encode("x  <R>  y"), (Ids{1, 0, 0, 4, 2}));      // rstrip takes the spaces after
  EXPECT_EQ(tok.encode("x  <N>  y"), (Ids{1, 0, 0, 5, 0, 0, 2}));
  EXPECT_EQ(tok.encode("xy xyx x xy"), (Ids{6, 0, 1, 2, 1, 0, 1, 0, 6}));  // single_word
  EXPECT_EQ(tok.encode("<L><L>  <R> <R>"), (Ids{3, 3, 0, 0, 4, 4}));
  EXPECT_EQ(tok.encode("x\xff<N>"), (Ids{1, 5}));  // U+FFFD is not in the vocabulary: dropped
  EXPECT_EQ(tok.token_to_id("<R>"), 4);
  // No decoder: tokens joined by spaces; unknown ids (99) are skipped.
  EXPECT_EQ(tok.decode({1, 3, 0, 4, 5, 6, 99}), "x <L>   <R> <N> xy");
  EXPECT_EQ(tok.decode({1, 3, 0, 4, 5, 6, 99}, true), "x   <R> xy");
  EXPECT_EQ(tok.vocab_size(), 7);
}

// A valid tokenizer.json with one part replaced.
std::string with(const std::string& key, const std::string& value, std::string base = kMergesJson) {
  const std::string pattern = "\"" + key + "\": ";
  const size_t at = base.find(pattern);
  if (at == std::string::npos) throw std::logic_error("no key " + key);
  const size_t v = at + pattern.size();
  // The value in the base file is null or an object/array: find its end.
  size_t end = v;
  if (base.compare(v, 4, "null") == 0) {
    end = v + 4;
  } else {
    int depth = 0;
    bool in_string = false;
    for (; end < base.size(); ++end) {
      const char c = base[end];
      if (in_string) {
        if (c == '\\') ++end;
        else if (c == '"') in_string = false;
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        if (--depth == 0) {
          ++end;
          break;
        }
      }
    }
  }
  return base.substr(0, v) + value + base.substr(end);
}

std::string load_error(const std::string& json) {
  return invalid_argument_message([&] { Tokenizer::from_json_text(json, "tok.json"); });
}

TEST(Tokenizer, UnsupportedComponentsNameTheirPlace) {
  const std::string bpe_vocab = R"("vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"])";
  EXPECT_EQ(load_error(with("model", R"({"type": "WordPiece", "unk_token": "[UNK]", "vocab": {}})")),
            "tok.json: model.type 'WordPiece' is not supported (supported: BPE)");
  EXPECT_EQ(load_error(with("model", R"({"type": "Unigram", "vocab": []})")),
            "tok.json: model.type 'Unigram' is not supported (supported: BPE)");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "dropout": 0.1, )" + bpe_vocab + "}")),
            "tok.json: model.dropout 0.1 is not supported (supported: null)");
  const std::string n = load_error(with("normalizer", R"({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "BertNormalizer"}]})"));
  EXPECT_TRUE(contains(n, "tok.json: normalizer.normalizers[1].type 'BertNormalizer' is not supported (supported: NFC,")) << n;
  const std::string p = load_error(with("pre_tokenizer", R"({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "Whitespace"}]})"));
  EXPECT_TRUE(contains(p, "tok.json: pre_tokenizer.pretokenizers[1].type 'Whitespace' is not supported")) << p;
  const std::string b = load_error(with("pre_tokenizer", R"({"type": "BertPreTokenizer"})"));
  EXPECT_TRUE(contains(b, "tok.json: pre_tokenizer.type 'BertPreTokenizer' is not supported")) << b;
  const std::string d = load_error(with("decoder", R"({"type": "WordPiece", "prefix": "##", "cleanup": true})"));
  EXPECT_TRUE(contains(d, "tok.json: decoder.type 'WordPiece' is not supported (supported: ByteLevel,")) << d;
  const std::string pp = load_error(with("post_processor", R"({"type": "Sequence", "processors": [{"type": "Weird"}]})"));
  EXPECT_TRUE(contains(pp, "tok.json: post_processor.processors[0].type 'Weird' is not supported")) << pp;
  const std::string t = load_error(with("truncation", R"({"max_length": 512, "strategy": "LongestFirst"})"));
  EXPECT_TRUE(contains(t, "tok.json: truncation {\"max_length\":512")) << t;
  EXPECT_TRUE(contains(t, "is not supported (supported: null)")) << t;
  const std::string s = load_error(with("pre_tokenizer", R"({"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Sideways", "invert": false})"));
  EXPECT_TRUE(contains(s, "tok.json: pre_tokenizer.behavior 'Sideways' is not supported (supported: Removed,")) << s;
}

TEST(Tokenizer, MalformedFilesNameWhatIsWrong) {
  EXPECT_TRUE(contains(load_error("{not json"), "tok.json: not valid JSON")) << load_error("{not json");
  // A number JSON cannot hold (found by fuzzing: nlohmann's out_of_range escaped unnamed).
  EXPECT_TRUE(contains(load_error(R"({"model": {"vocab": {"a": 1e999}}})"), "tok.json: not valid JSON"));
  EXPECT_EQ(load_error("[1, 2]"), "tok.json: the top level must be a JSON object");
  EXPECT_EQ(load_error(R"({"normalizer": null})"), "tok.json: model is missing");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "merges": []})")), "tok.json: model.vocab is missing");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "vocab": {"a": 0}, "merges": ["a q"]})")),
            "tok.json: model.merges[0] names 'q', which is not in model.vocab");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "vocab": {"a": 0}, "merges": ["a a"]})")),
            "tok.json: model.merges[0] makes 'aa', which is not in model.vocab");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "vocab": {"a": 0}, "merges": ["aa"]})")),
            "tok.json: model.merges[0] must be two tokens separated by one space, got \"aa\"");
  EXPECT_EQ(load_error(with("model", R"({"type": "BPE", "vocab": {"a": -3}, "merges": []})")),
            "tok.json: model.vocab[\"a\"] must be a token id in [0, 2^31), got -3");
  const std::string re = load_error(with("pre_tokenizer", R"({"type": "Split", "pattern": {"Regex": "(a"}, "behavior": "Isolated", "invert": false})"));
  EXPECT_TRUE(contains(re, "tok.json: pre_tokenizer.pattern: the pattern '(a' does not compile")) << re;
  EXPECT_EQ(load_error(with("pre_tokenizer", R"({"type": "Metaspace", "replacement": "ab"})")),
            "tok.json: pre_tokenizer.replacement must be one character, got 'ab'");
  EXPECT_EQ(load_error(with("added_tokens", R"([{"content": "<s>"}])")), "tok.json: added_tokens[0].id is missing");
  const std::string f = invalid_argument_message([] { Tokenizer::from_file("/nonexistent/tokenizer.json"); });
  EXPECT_EQ(f, "/nonexistent/tokenizer.json: cannot be read (tokenizer file)");
}

}  // namespace
}  // namespace qlora::data
