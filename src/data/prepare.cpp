// JSON datasets -> token HDF5 files: see prepare.h. The steps, in order: the model's tokenizer
// and tokenizer config, the chat template (LLaMA-Factory's get_template_and_fix_tokenizer), each
// file's samples (sft_dataset_load; pair_dataset_load for preference pairs), the evaluation
// samples (eval_dataset or a seeded split), padded or packed rows, the files.
#include "data/prepare.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <map>
#include <sstream>
#include <stdexcept>

#include "data/model_tokenizer.h"
#include "data/packing.h"
#include "data/sft_dataset.h"
#include "io/hash.h"
#include "io/json_file.h"

namespace fs = std::filesystem;

namespace qlora::data {

namespace {

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : ",") + s;
  return out;
}

// The files of the model directory the tokenization depends on.
const char* const kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json", "chat_template.jinja"};

int32_t token_id_or_throw(const Tokenizer& tokenizer, const std::string& token,
                          const std::string& what, const std::string& model_dir) {
  const std::optional<int32_t> id = tokenizer.token_to_id(token);
  if (!id)
    throw std::invalid_argument(model_dir + ": the " + what + " '" + token +
                                "' of tokenizer_config.json is not a token of tokenizer.json");
  return *id;
}

template <typename T>
struct Loaded {
  std::vector<T> samples;
  SftReport report;  // summed over the files
};

// `load_file(file, report)` (sft_dataset_load or pair_dataset_load) over the files, in order.
template <typename T, typename LoadFile>
Loaded<T> load_files(const std::vector<std::string>& files, LoadFile&& load_file,
                     std::vector<std::string>& skipped_rows) {
  Loaded<T> out;
  for (const std::string& file : files) {
    if (!fs::is_regular_file(file))
      throw std::invalid_argument(file + ": dataset file does not exist");
    SftReport r;
    std::vector<T> samples = load_file(file, r);
    for (T& s : samples) out.samples.push_back(std::move(s));
    out.report.formatting = r.formatting;
    out.report.rows_read += r.rows_read;
    out.report.samples += r.samples;
    out.report.skipped += r.skipped;
    out.report.truncated += r.truncated;
    for (const std::string& bad : r.first_bad)
      if (skipped_rows.size() < SftReport::kMaxBadListed) skipped_rows.push_back(bad);
  }
  return out;
}

// What every prepare_write needs: the model's tokenizer fixed by the chat template, the pad id,
// the processing options.
struct Setup {
  std::string template_name;
  std::unique_ptr<ModelTokenizer> model_tokenizer;
  int32_t pad_id = 0;
  SftOptions so;
};

Setup setup_open(const PrepareOptions& o) {
  Setup s;
  // Plain text needs no chat template: LLaMA-Factory's "empty" adds nothing around it.
  s.template_name = o.template_name.empty() ? "empty" : o.template_name;
  s.model_tokenizer = ModelTokenizer::open(
      o.model_dir, s.template_name,
      "data.dataset needs the Hugging Face tokenizer files in model.model_name_or_path or "
      "model.tokenizer_name_or_path");
  const TokenizerConfig& config = s.model_tokenizer->config();
  s.pad_id = config.pad_token
                 ? token_id_or_throw(s.model_tokenizer->tokenizer(), *config.pad_token, "pad_token", o.model_dir)
                 : s.model_tokenizer->templated().eos_token_id().value_or(0);
  s.so.formatting = formatting_from_name(o.formatting);
  // LLaMA-Factory's DataArguments lowers cutoff_len by one when packing (a packed row of
  // cutoff_len tokens holds at most cutoff_len - 1 sample tokens); its processors use that.
  s.so.cutoff_len = o.packing || o.neat_packing ? o.cutoff_len - 1 : o.cutoff_len;
  s.so.train_on_prompt = o.train_on_prompt;
  s.so.mask_history = o.mask_history;
  if (o.max_samples > 0) s.so.max_samples = o.max_samples;
  s.so.skip_bad = o.skip_bad;
  return s;
}

// Ids the template added beyond the tokenizer's vocabulary would need a larger embedding: a
// quantized model's vocabulary is not resized.
void template_tokens_check(const Setup& s, const std::string& model_dir,
                           const std::vector<const std::vector<int32_t>*>& id_lists) {
  const TemplateTokenizer& template_tokenizer = s.model_tokenizer->templated();
  for (const auto& [token, id] : template_tokenizer.template_tokens())
    if (id >= s.model_tokenizer->tokenizer().vocab_size())
      for (const std::vector<int32_t>* ids : id_lists)
        for (const int32_t t : *ids)
          if (t == id)
            throw std::invalid_argument(
                "data.template = " + s.template_name + " uses the token '" + token +
                "' that the tokenizer of " + model_dir +
                " lacks (it would need a new embedding row; resizing the vocabulary of a "
                "quantized model is not supported): choose the template of this model");
}

// The string attributes of a written file (besides source_files).
std::map<std::string, std::string> file_attrs(const PrepareOptions& o, const Setup& s,
                                              Formatting formatting_used) {
  const bool packing = o.packing || o.neat_packing;
  return {
      {"template", s.template_name},
      {"formatting", formatting_name(formatting_used)},
      {"tokenizer_hash", s.model_tokenizer->tokenizer().content_hash()},
      {"cutoff_len", std::to_string(o.cutoff_len)},
      {"packing", o.neat_packing ? "neat_packing" : packing ? "packing" : "none"},
      {"prepare_key", prepare_key(o)},
  };
}

int64_t count_labels(const std::vector<int32_t>& labels) {
  int64_t n = 0;
  for (const int32_t l : labels) n += l != kIgnoreLabel;
  return n;
}

// Whether the rows of `files` are text (pre-training) documents: the formatting asked for, or
// for auto the one the first row shows.
bool is_text(Formatting formatting, const std::vector<std::string>& files) {
  if (formatting == Formatting::automatic && !files.empty()) {
    const std::vector<JsonRow> first = read_json_rows(files.front(), 1);
    if (!first.empty()) formatting = detect_formatting(first.front());
  }
  return formatting == Formatting::text;
}

// The rows `which` of `rows`, in that order.
TokenRows rows_select(const TokenRows& rows, const std::vector<int64_t>& which) {
  TokenRows out;
  out.rows = static_cast<int64_t>(which.size());
  out.seq_len = rows.seq_len;
  const auto T = static_cast<size_t>(rows.seq_len);
  for (const int64_t r : which) {
    const auto at = static_cast<size_t>(r) * T;
    out.input_ids.insert(out.input_ids.end(), rows.input_ids.begin() + at, rows.input_ids.begin() + at + T);
    out.labels.insert(out.labels.end(), rows.labels.begin() + at, rows.labels.begin() + at + T);
    if (!rows.position_ids.empty())
      out.position_ids.insert(out.position_ids.end(), rows.position_ids.begin() + at,
                              rows.position_ids.begin() + at + T);
  }
  return out;
}

std::string counts_line(const char* name, const PrepareCounts& c, bool pairs) {
  std::ostringstream os;
  if (pairs)
    os << "  " << name << ": " << c.rows << " pairs (a chosen and a rejected row each) x "
       << c.seq_len << " tokens (";
  else
    os << "  " << name << ": " << c.rows << " rows x " << c.seq_len << " tokens from " << c.samples
       << " samples (";
  if (c.rows_read > 0)
    os << c.rows_read << " rows read, " << c.skipped << " skipped, ";
  else
    os << "held out of the training " << (pairs ? "pairs" : "rows") << " by data.val_size, ";
  os << c.truncated << " truncated); " << c.tokens << " tokens, " << c.target_tokens << " with a label; "
     << "padding efficiency " << static_cast<int>(c.packing_efficiency * 1000 + 0.5) / 10.0
     << "%\n";
  return os.str();
}

}  // namespace

std::string PrepareReport::summary() const {
  std::string s = counts_line("train", train, pairs);
  if (has_eval) s += counts_line("eval", eval, pairs);
  for (const std::string& bad : skipped_rows) s += "  skipped " + bad + "\n";
  return s;
}

std::string prepare_key(const PrepareOptions& o) {
  uint64_t h = io::fnv1a64("qlora_dist.prepare 1");
  for (const char* name : kTokenizerFiles) {
    const fs::path p = fs::path(o.model_dir) / name;
    h = io::fnv1a64(name, h);
    if (fs::is_regular_file(p)) h = io::fnv1a64(io::file_read(p), h);
  }
  for (const auto* list : {&o.dataset, &o.eval_dataset}) {
    h = io::fnv1a64("|files", h);
    for (const std::string& file : *list) {
      std::error_code ec;
      const std::string abs = fs::absolute(file, ec).string();
      const auto size = fs::file_size(file, ec);
      const auto mtime = fs::last_write_time(file, ec).time_since_epoch().count();
      h = io::fnv1a64(abs + "\n" + std::to_string(ec ? 0 : size) + "\n" +
                          std::to_string(ec ? 0 : mtime) + "\n",
                      h);
    }
  }
  std::ostringstream os;
  os << o.template_name << '|' << o.formatting << '|' << o.cutoff_len << '|' << o.train_on_prompt
     << o.mask_history << o.packing << o.neat_packing << o.skip_bad << '|' << o.max_samples << '|'
     << o.val_size << '|' << o.seed;
  if (o.pairwise) os << "|pairwise";  // only then: the keys of SFT files stay as they were
  return io::hex16(io::fnv1a64(os.str(), h));
}

namespace {

// prepare_write with options.pairwise: preference pairs into pair files.
PrepareReport prepare_write_pairs(const PrepareOptions& o, const Setup& setup,
                                  const std::string& train_out, const std::string& eval_out) {
  const TemplateTokenizer& template_tokenizer = setup.model_tokenizer->templated();
  const ChatTemplate& chat_template = setup.model_tokenizer->chat_template();
  PrepareReport report;
  report.has_eval = !eval_out.empty();
  report.pairs = true;
  Formatting formatting_used = setup.so.formatting;

  auto load = [&](const std::vector<std::string>& files, PrepareCounts& counts) {
    Loaded<PairSample> loaded = load_files<PairSample>(
        files,
        [&](const std::string& file, SftReport& r) {
          return pair_dataset_load(file, template_tokenizer, chat_template, setup.so, &r);
        },
        report.skipped_rows);
    counts.rows_read = loaded.report.rows_read;
    counts.skipped = loaded.report.skipped;
    counts.truncated = loaded.report.truncated;
    formatting_used = loaded.report.formatting;
    return std::move(loaded.samples);
  };
  auto rows_of = [&](const std::vector<PairSample>& pairs, PrepareCounts& counts) {
    PackReport pad;
    PairRows rows = rows_pad_pairs(pairs, setup.pad_id, &pad);
    counts.samples = pad.samples;
    counts.tokens = pad.tokens;
    counts.packing_efficiency = pad.efficiency();
    return rows;
  };

  std::vector<PairSample> train_pairs = load(o.dataset, report.train);
  std::vector<PairSample> eval_pairs;
  if (!o.eval_dataset.empty()) {
    eval_pairs = load(o.eval_dataset, report.eval);
  } else if (o.val_size > 0) {  // a seeded split of the pairs, as of SFT samples
    const TrainValSplit split =
        split_train_val(static_cast<int64_t>(train_pairs.size()), o.val_size, o.seed);
    std::vector<PairSample> kept;
    for (const int64_t i : split.val) eval_pairs.push_back(train_pairs[i]);
    for (const int64_t i : split.train) kept.push_back(std::move(train_pairs[i]));
    train_pairs = std::move(kept);
  }
  const PairRows train = rows_of(train_pairs, report.train);
  const PairRows eval = rows_of(eval_pairs, report.eval);
  if (!o.dataset.empty() && train.chosen.rows == 0)
    throw std::invalid_argument(join(o.dataset) + ": no training pairs (" +
                                std::to_string(report.train.rows_read) + " rows read, " +
                                std::to_string(report.train.skipped) + " skipped" +
                                (o.val_size > 0 ? "; the rest held out by data.val_size" : "") + ")");
  if (report.has_eval && eval.chosen.rows == 0)
    throw std::invalid_argument("no evaluation pairs (data.eval_dataset is empty or data.val_size "
                                "holds out nothing)");
  template_tokens_check(setup, o.model_dir,
                        {&train.chosen.input_ids, &train.rejected.input_ids,
                         &eval.chosen.input_ids, &eval.rejected.input_ids});

  const std::map<std::string, std::string> attrs = file_attrs(o, setup, formatting_used);
  auto write = [&](const std::string& path, const PairRows& rows,
                   const std::vector<std::string>& sources, PrepareCounts& counts) {
    std::map<std::string, std::string> a = attrs;
    a["source_files"] = join(sources);
    pair_rows_write(path, rows, template_tokenizer.vocab_size(), setup.pad_id, a);
    counts.rows = rows.chosen.rows;
    counts.seq_len = rows.chosen.seq_len;
    counts.target_tokens = count_labels(rows.chosen.labels) + count_labels(rows.rejected.labels);
  };
  if (!o.dataset.empty()) write(train_out, train, o.dataset, report.train);
  if (report.has_eval)
    write(eval_out, eval, o.eval_dataset.empty() ? o.dataset : o.eval_dataset, report.eval);
  return report;
}

}  // namespace

PrepareReport prepare_write(const PrepareOptions& o, const std::string& train_out,
                            const std::string& eval_out) {
  const bool packing = o.packing || o.neat_packing;
  if (o.pairwise && packing)
    throw std::invalid_argument("data.packing does not apply to train.stage = dpo (each pair is one "
                                "row of chosen and one of rejected tokens): set data.packing and "
                                "data.neat_packing to false");
  const Setup setup = setup_open(o);
  if (o.pairwise) return prepare_write_pairs(o, setup, train_out, eval_out);
  const TemplateTokenizer& template_tokenizer = setup.model_tokenizer->templated();
  const ChatTemplate& chat_template = setup.model_tokenizer->chat_template();
  const int32_t pad_id = setup.pad_id;
  const SftOptions& so = setup.so;

  PrepareReport report;
  report.has_eval = !eval_out.empty();
  Formatting formatting_used = so.formatting;

  // Samples of a list of files. Text (pre-training) documents with packing are not cut: they
  // are concatenated and cut into blocks afterwards (rows_of).
  auto load = [&](const std::vector<std::string>& files, bool text_packing, PrepareCounts& counts) {
    SftOptions fo = so;
    if (text_packing) fo.cutoff_len = std::numeric_limits<int32_t>::max();
    Loaded<Sample> loaded = load_files<Sample>(
        files,
        [&](const std::string& file, SftReport& r) {
          return sft_dataset_load(file, template_tokenizer, chat_template, fo, &r);
        },
        report.skipped_rows);
    counts.rows_read = loaded.report.rows_read;
    counts.skipped = loaded.report.skipped;
    counts.truncated = loaded.report.truncated;
    formatting_used = loaded.report.formatting;
    if (text_packing && template_tokenizer.add_bos_token() && template_tokenizer.bos_token_id())
      for (Sample& doc : loaded.samples) {  // BOS goes over each block's first token instead
        doc.input_ids.erase(doc.input_ids.begin());
        doc.labels.erase(doc.labels.begin());
      }
    return std::move(loaded.samples);
  };
  // Rows of samples: padded, packed (LLaMA-Factory's PackedSupervisedDatasetProcessor), or for
  // text with packing its PretrainDatasetProcessor: each document + EOS concatenated per group
  // of kPackGroupSamples documents, cut into blocks of cutoff_len - 1 (a group's remainder
  // dropped), BOS over each block's first token when the tokenizer adds one.
  auto rows_of = [&](const std::vector<Sample>& samples, bool text_packing, PrepareCounts& counts) {
    PackReport pack;
    TokenRows rows;
    if (text_packing) {
      const std::optional<int32_t> bos =
          template_tokenizer.add_bos_token() ? template_tokenizer.bos_token_id() : std::nullopt;
      rows = rows_chunk(samples, o.cutoff_len - 1, bos, &pack);
    } else if (packing) {
      rows = rows_pack(samples, o.cutoff_len, o.neat_packing, pad_id, &pack);
    } else {
      rows = rows_pad(samples, pad_id, &pack);
    }
    counts.samples = pack.samples - pack.samples_dropped;
    counts.tokens = pack.tokens;
    counts.packing_efficiency = pack.efficiency();
    return rows;
  };

  const bool train_text_packing = packing && is_text(so.formatting, o.dataset);
  std::vector<Sample> train_samples = load(o.dataset, train_text_packing, report.train);
  std::vector<Sample> eval_samples;
  TokenRows train, eval;
  if (!o.eval_dataset.empty()) {
    const bool eval_text_packing = packing && is_text(so.formatting, o.eval_dataset);
    eval_samples = load(o.eval_dataset, eval_text_packing, report.eval);
    eval = rows_of(eval_samples, eval_text_packing, report.eval);
    train = rows_of(train_samples, train_text_packing, report.train);
  } else if (o.val_size > 0 && train_text_packing) {
    // Blocks of text are the samples here: the split takes whole blocks.
    const TokenRows all = rows_of(train_samples, true, report.train);
    const TrainValSplit split = split_train_val(all.rows, o.val_size, o.seed);
    train = rows_select(all, split.train);
    eval = rows_select(all, split.val);
    for (auto [rows, counts] : {std::pair{&train, &report.train}, std::pair{&eval, &report.eval}}) {
      counts->tokens = rows->rows * rows->seq_len;  // blocks hold no padding
      counts->samples = rows->rows;
      counts->packing_efficiency = 1.0;
    }
  } else if (o.val_size > 0) {
    // A seeded split of the samples before they become rows (LLaMA-Factory splits the
    // processed rows; with packing that differs in what val_size counts: samples here).
    const TrainValSplit split =
        split_train_val(static_cast<int64_t>(train_samples.size()), o.val_size, o.seed);
    std::vector<Sample> kept;
    for (const int64_t i : split.val) eval_samples.push_back(train_samples[i]);
    for (const int64_t i : split.train) kept.push_back(std::move(train_samples[i]));
    train_samples = std::move(kept);
    train = rows_of(train_samples, false, report.train);
    eval = rows_of(eval_samples, false, report.eval);
  } else {
    train = rows_of(train_samples, train_text_packing, report.train);
  }
  if (!o.dataset.empty() && train.rows == 0)
    throw std::invalid_argument(join(o.dataset) + ": no training rows (" +
                                std::to_string(report.train.rows_read) + " rows read, " +
                                std::to_string(report.train.skipped) + " skipped" +
                                (packing ? "; packed rows hold whole samples of at most "
                                           "data.cutoff_len - 1 tokens" : "") +
                                (o.val_size > 0 ? "; the rest held out by data.val_size" : "") +
                                ")");
  if (report.has_eval && eval.rows == 0)
    throw std::invalid_argument("no evaluation rows (data.eval_dataset is empty or data.val_size "
                                "holds out nothing)");

  template_tokens_check(setup, o.model_dir, {&train.input_ids, &eval.input_ids});

  const std::map<std::string, std::string> attrs = file_attrs(o, setup, formatting_used);
  auto write = [&](const std::string& path, const TokenRows& rows,
                   const std::vector<std::string>& sources, PrepareCounts& counts) {
    std::map<std::string, std::string> a = attrs;
    a["source_files"] = join(sources);
    token_rows_write(path, rows, template_tokenizer.vocab_size(), pad_id, a);
    counts.rows = rows.rows;
    counts.seq_len = rows.seq_len;
    counts.target_tokens = count_labels(rows.labels);
  };
  if (!o.dataset.empty()) write(train_out, train, o.dataset, report.train);
  if (report.has_eval)
    write(eval_out, eval, o.eval_dataset.empty() ? o.dataset : o.eval_dataset, report.eval);
  return report;
}

}  // namespace qlora::data
