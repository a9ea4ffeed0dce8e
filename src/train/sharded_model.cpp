// Units of the decoder, their sources (Hugging Face directory, HDF5 unit file) and binding.
#include "train/sharded_model.h"
#include "io/atomic_write.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "dist/communicator.h"
#include "dist/device_context.h"
#include "io/h5_file.h"
#include "io/hf_config.h"
#include "model/model_reader.h"
#include "quant/tensor_io.h"

namespace fs = std::filesystem;

namespace qlora::train {

namespace {

constexpr const char* kH5Format = "qlora_dist.units";
constexpr int64_t kH5FormatVersion = 1;

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

io::DType plain_dtype_from(const model::ModelConfig& c) {
  if (c.torch_dtype == "bfloat16") return io::DType::BF16;
  if (c.torch_dtype == "float16") return io::DType::F16;
  return io::DType::F32;  // "float32" and a config without torch_dtype
}

// Every quantization method a sharded run cannot take, with the reason users know from the
// Python tools (DESIGN.md section 5).
void check_sharded_method(const io::HfConfig& hf) {
  using io::QuantMethod;
  const QuantMethod m = hf.quantization.method;
  const std::string what = hf.path + ": quant_method '" + hf.quantization.quant_method + "'";
  switch (m) {
    case QuantMethod::none:
    case QuantMethod::bnb_4bit:
    case QuantMethod::fp8:    // dequantized on load (model::ModelReader), then quantized to 4-bit
    case QuantMethod::mxfp4: return;
    case QuantMethod::bnb_8bit:
      throw std::invalid_argument(what + " (bitsandbytes 8-bit): only 4-bit quantized models can "
                                  "be sharded; use a 4-bit (or unquantized) model");
    case QuantMethod::gptq:
    case QuantMethod::awq:
    case QuantMethod::aqlm:
      throw std::invalid_argument(what + ": PTQ-quantized models (GPTQ, AWQ, AQLM) are "
                                  "incompatible with ZeRO-3/FSDP sharding");
    case QuantMethod::hqq:
      throw std::invalid_argument(what + ": HQQ-quantized models are incompatible with "
                                  "ZeRO-3/FSDP sharding");
    case QuantMethod::eetq:
      throw std::invalid_argument(what + ": EETQ-quantized models are incompatible with "
                                  "ZeRO-3/FSDP sharding");
    case QuantMethod::other:
      throw std::invalid_argument(what + " is not a quantization method qlora_dist knows");
  }
  throw std::invalid_argument(what + ": unknown method");
}

// A tensor's bytes as uint8 (contiguous CPU).
at::Tensor as_bytes(const at::Tensor& t) {
  return t.contiguous().view({-1}).view(at::kByte);
}

// ------------------------------------------------------------------------------------------
// Hugging Face directory

class HfUnitSource final : public UnitSource {
 public:
  HfUnitSource(const std::string& dir, const quant::QuantizeOptions& quant) : reader_(dir) {
    path_ = dir;
    const io::HfConfig& hf = reader_.hf_config();
    check_sharded_method(hf);
    nlohmann::json config = hf.raw;
    if (reader_.dequantizes()) config.erase("quantization_config");  // the units hold 4-bit weights
    config_json_ = config.dump();
    spec_.config = reader_.config();
    spec_.plain_dtype = plain_dtype_from(spec_.config);
    spec_.quant = quant;
    reader_.weights_open();  // every tensor and its shape against the config, before heavy work
    if (reader_.prequantized()) {
      for (const auto& [name, shape] : model::expected_weight_shapes(spec_.config))
        if (model::is_block_linear_weight(name) && !reader_.linear_is_quantized(name))
          throw std::invalid_argument(path_ + ": '" + name +
                                      "' is not 4-bit quantized in this bitsandbytes checkpoint; "
                                      "sharding needs every block linear quantized");
      // The checkpoint decides: read the first linear's state and require every other to match.
      const std::string first = model::block_linear_module(0, "q_proj") + ".weight";
      const quant::Quantized q = reader_.linear(first, spec_.quant);
      tables_check(first, q);
      spec_.quant.quant_type = q.state.quant_type;
      spec_.quant.blocksize = q.state.blocksize;
      spec_.quant.double_quant = q.state.is_nested();
    }
  }

  void read(const dist::UnitLayout& unit, size_t begin, size_t end, uint8_t* out) override {
    std::memset(out, 0, end - begin);
    for (const dist::Segment& s : unit.segments) {
      const size_t lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.nbytes);
      if (lo >= hi) continue;
      const at::Tensor bytes = segment_bytes(s);
      if (static_cast<size_t>(bytes.numel()) < s.nbytes)
        throw std::logic_error("segment '" + s.name + "' produced too few bytes");
      std::memcpy(out + (lo - begin), bytes.data_ptr<uint8_t>() + (lo - s.offset), hi - lo);
    }
  }
  size_t bytes_read() const override { return reader_.bytes_read(); }

 private:
  // Units hold no code tables: sharding takes bitsandbytes' own only.
  void tables_check(const std::string& weight_name, const quant::Quantized& q) const {
    if (!at::equal(q.state.code, quant::code_table(q.state.quant_type)) ||
        (q.state.is_nested() && !at::equal(q.state.nested->code, quant::nested_code_table())))
      throw std::invalid_argument(path_ + ": '" + weight_name +
                                  "' has a quant_map or nested_quant_map other than bitsandbytes' "
                                  "own tables; only those can be sharded");
  }

  // The quantized weight of `name`, quantized (or read) once for its consecutive segments. Its
  // shape was checked against the config when the reader opened the weights.
  const quant::Quantized& quantized(const std::string& name) {
    if (cached_name_ == name) return cached_;
    cached_ = reader_.linear(name, spec_.quant);
    if (reader_.prequantized()) {
      tables_check(name, cached_);
      const quant::QuantState& st = cached_.state;
      if (st.quant_type != spec_.quant.quant_type || st.blocksize != spec_.quant.blocksize ||
          st.is_nested() != spec_.quant.double_quant)
        throw std::invalid_argument(
            path_ + ": '" + name + "' is quantized as " + quant::quant_type_name(st.quant_type) +
            " blocksize " + std::to_string(st.blocksize) + (st.is_nested() ? " nested" : "") +
            "; the model's first linear says " + quant::quant_type_name(spec_.quant.quant_type) +
            " blocksize " + std::to_string(spec_.quant.blocksize) +
            (spec_.quant.double_quant ? " nested" : "") + " (sharding needs one setting for all)");
    }
    cached_name_ = name;
    return cached_;
  }

  at::Tensor segment_bytes(const dist::Segment& s) {
    using dist::SegmentKind;
    const std::string base = s.kind == SegmentKind::packed ? s.name
                                                           : s.name.substr(0, s.name.rfind('.'));
    switch (s.kind) {
      case SegmentKind::packed: return quant::packed_bytes(quantized(base).packed);
      case SegmentKind::absmax: return as_bytes(quantized(base).state.absmax);
      case SegmentKind::nested_absmax: return as_bytes(quantized(base).state.nested->absmax);
      case SegmentKind::nested_offset: {
        const float offset = quantized(base).state.nested->offset;
        return as_bytes(at::full({1}, offset, at::TensorOptions().dtype(at::kFloat)));
      }
      case SegmentKind::tensor:  // the head's lm_head of a tied model is the embedding
        return as_bytes(reader_.tensor(s.name).to(quant::scalar_type_from(s.dtype)));
    }
    throw std::invalid_argument("unknown segment kind of '" + s.name + "'");
  }

  model::ModelReader reader_;
  std::string cached_name_;
  quant::Quantized cached_;
};

// ------------------------------------------------------------------------------------------
// HDF5 unit file

class H5UnitSource final : public UnitSource {
 public:
  explicit H5UnitSource(const std::string& path) : file_(io::H5File::open_read(path)) {
    path_ = path;
    const auto attr = [&](const char* name) {
      if (!file_.has_attr("/", name))
        throw std::invalid_argument(path + ": not a qlora_dist unit file (attribute '" +
                                    std::string(name) + "' is missing; write one with "
                                    "qlora_dist quantize --format h5)");
      return file_.attr_string("/", name);
    };
    if (attr("format") != kH5Format)
      throw std::invalid_argument(path + ": format '" + attr("format") + "', expected '" +
                                  kH5Format + "'");
    const int64_t version = file_.attr_int64("/", "format_version");
    if (version != kH5FormatVersion)
      throw std::invalid_argument(path + ": format_version " + std::to_string(version) +
                                  " (this build reads " + std::to_string(kH5FormatVersion) + ")");
    config_json_ = attr("config_json");
    nlohmann::json raw;
    try {
      raw = nlohmann::json::parse(config_json_);
    } catch (const nlohmann::json::exception& e) {
      throw std::invalid_argument(path + ": config_json attribute is not valid JSON: " + e.what());
    }
    spec_.config = model::model_config_from_json(raw, path + ":config_json");
    spec_.quant.quant_type = quant::quant_type_from_name(attr("quant_type"));
    spec_.quant.blocksize = static_cast<int32_t>(file_.attr_int64("/", "blocksize"));
    spec_.quant.double_quant = file_.attr_int64("/", "double_quant") != 0;
    spec_.plain_dtype = io::dtype_from_name(attr("plain_dtype"));
    // The stored table must be the one this build computes from the config: a file from another
    // layout version would be read as garbage otherwise.
    const std::vector<dist::UnitLayout> stored = dist::units_from_json(attr("layout_json"), path);
    const std::vector<dist::UnitLayout> expected = base_units(spec_);
    if (stored != expected)
      throw std::invalid_argument(path + ": its unit layout table differs from the one this build "
                                  "computes from its config; re-run qlora_dist quantize --format h5");
    for (const dist::UnitLayout& u : expected)
      if (file_.nbytes("units/" + u.name) != u.nbytes)
        throw std::invalid_argument(path + ": dataset units/" + u.name + " has " +
                                    std::to_string(file_.nbytes("units/" + u.name)) +
                                    " bytes, the layout says " + std::to_string(u.nbytes));
  }

  void read(const dist::UnitLayout& unit, size_t begin, size_t end, uint8_t* out) override {
    if (end > begin) file_.read_bytes("units/" + unit.name, begin, end - begin, out);
  }
  size_t bytes_read() const override { return file_.bytes_read(); }

 private:
  io::H5File file_;
};

bool is_hdf5_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char sig[8] = {};
  f.read(sig, 8);
  return f.gcount() == 8 && std::memcmp(sig, "\x89HDF\r\n\x1a\n", 8) == 0;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Units

std::vector<dist::UnitLayout> base_units(const UnitsSpec& spec) {
  const model::ModelConfig& c = spec.config;
  const int64_t h = c.hidden_size;
  const io::DType pd = spec.plain_dtype;
  std::vector<dist::UnitLayout> units;
  const auto shapes = model::expected_weight_shapes(c);

  dist::UnitLayout embed;
  embed.name = "embed";
  embed.add("model.embed_tokens.weight", dist::SegmentKind::tensor, pd, {c.vocab_size, h});
  units.push_back(std::move(embed));

  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    dist::UnitLayout b;
    b.name = "block." + std::to_string(i);
    const std::string p = layer_prefix(i);
    for (const auto& [norm, size] : model::block_norms(c))
      b.add(p + norm + ".weight", dist::SegmentKind::tensor, pd, {size});
    for (const std::string& short_name : lora::block_linear_names()) {
      const std::string module = model::block_linear_module(i, short_name);
      const std::vector<int64_t>& shape = shapes.at(module + ".weight");
      dist::unit_add_quantized(b, module + ".weight", shape, spec.quant.blocksize,
                               spec.quant.double_quant);
      if (c.linear_has_bias(short_name))
        b.add(module + ".bias", dist::SegmentKind::tensor, pd, {shape[0]});
    }
    units.push_back(std::move(b));
  }

  dist::UnitLayout head;
  head.name = "head";
  head.add("model.norm.weight", dist::SegmentKind::tensor, pd, {h});
  head.add("lm_head.weight", dist::SegmentKind::tensor, pd, {c.vocab_size, h});
  units.push_back(std::move(head));
  return units;
}

std::vector<dist::UnitLayout> lora_units(const model::ModelConfig& c, int64_t rank,
                                         const std::vector<std::string>& targets) {
  const auto shapes = model::expected_weight_shapes(c);
  std::vector<dist::UnitLayout> units;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    dist::UnitLayout u;
    u.name = "lora." + std::to_string(i);
    for (const std::string& short_name : lora::block_linear_names()) {
      if (std::find(targets.begin(), targets.end(), short_name) == targets.end()) continue;
      const std::string module = model::block_linear_module(i, short_name);
      const std::vector<int64_t>& shape = shapes.at(module + ".weight");  // [out, in]
      u.add(module + ".lora_A.weight", dist::SegmentKind::tensor, io::DType::F32,
            {rank, shape[1]});
      u.add(module + ".lora_B.weight", dist::SegmentKind::tensor, io::DType::F32,
            {shape[0], rank});
    }
    units.push_back(std::move(u));
  }
  return units;
}

std::unique_ptr<UnitSource> UnitSource::open(const std::string& path,
                                             const quant::QuantizeOptions& quant) {
  if (fs::is_directory(path)) return std::make_unique<HfUnitSource>(path, quant);
  if (!fs::exists(path))
    throw std::invalid_argument(path + ": model path does not exist (expected a Hugging Face "
                                "model directory or an HDF5 unit file)");
  if (!is_hdf5_file(path))
    throw std::invalid_argument(path + ": not a directory and not an HDF5 file (expected a "
                                "Hugging Face model directory or an HDF5 unit file from "
                                "qlora_dist quantize --format h5)");
  return std::make_unique<H5UnitSource>(path);
}

size_t units_h5_write(UnitSource& source, const std::string& out_path) {
  const fs::path out(out_path);
  if (fs::exists(out))
    throw std::invalid_argument(out_path + ": exists; quantize never overwrites (remove it or "
                                "choose another --out)");
  if (!out.parent_path().empty() && !fs::is_directory(out.parent_path()))
    throw std::invalid_argument(out_path + ": directory " + out.parent_path().string() +
                                " does not exist");
  const std::vector<dist::UnitLayout> units = base_units(source.spec());
  size_t written = 0;
  io::commit_atomic(out, /*directory=*/false, [&](const fs::path& tmp) {
    io::H5File f = io::H5File::create(tmp.string());
    const UnitsSpec& spec = source.spec();
    f.set_attr_string("/", "format", kH5Format);
    f.set_attr_int64("/", "format_version", kH5FormatVersion);
    f.set_attr_string("/", "config_json", source.config_json());
    f.set_attr_string("/", "quant_type", quant::quant_type_name(spec.quant.quant_type));
    f.set_attr_int64("/", "blocksize", spec.quant.blocksize);
    f.set_attr_int64("/", "double_quant", spec.quant.double_quant ? 1 : 0);
    f.set_attr_string("/", "plain_dtype", io::dtype_name(spec.plain_dtype));
    f.set_attr_string("/", "layout_json", dist::units_to_json(units));
    for (const dist::UnitLayout& u : units) {
      std::vector<uint8_t> bytes(u.nbytes);
      source.read(u, 0, u.nbytes, bytes.data());
      f.write_bytes("units/" + u.name, bytes.data(), bytes.size());
      written += bytes.size();
    }
    f.close();
  });
  return written;
}

// ------------------------------------------------------------------------------------------
// Binding

void bind_embed(model::DecoderModel& m, const dist::ShardedUnit& unit, const at::Tensor& buffer) {
  if (!buffer.defined()) {
    m.set_embedding(at::Tensor());
    return;
  }
  // As stored: embed() converts only the rows it looks up (a 32000 x 2048 table in fp32 would
  // be a 250 MiB copy of a 125 MiB bf16 unit).
  m.set_embedding(unit.segment_view(buffer, "model.embed_tokens.weight"));
}

void bind_head(model::DecoderModel& m, const dist::ShardedUnit& unit, const at::Tensor& buffer) {
  if (!buffer.defined()) {
    m.set_head(at::Tensor(), at::Tensor());
    return;
  }
  m.set_head(unit.segment_view(buffer, "model.norm.weight").to(m.norm_dtype()),
             unit.segment_view(buffer, "lm_head.weight").to(m.compute_dtype()));
}

at::Tensor lora_view(const dist::UnitLayout& unit, const at::Tensor& buffer,
                     const std::string& name) {
  const dist::Segment& s = unit.segment(name);
  // fp32 elements: narrow + view keep autograd (a dtype view would not).
  return buffer.narrow(0, static_cast<int64_t>(s.offset / 4), static_cast<int64_t>(s.nbytes / 4))
      .view(s.shape);
}

std::vector<lora::AdapterSlot> lora_slots(const dist::UnitLayout& unit, const at::Tensor& buffer) {
  static const std::string kA = ".lora_A.weight";  // lora_units: A then B of each linear
  std::vector<lora::AdapterSlot> slots;
  for (const dist::Segment& s : unit.segments) {
    if (s.name.size() <= kA.size() || s.name.compare(s.name.size() - kA.size(), kA.size(), kA) != 0)
      continue;
    const std::string module = s.name.substr(0, s.name.size() - kA.size());
    slots.push_back({module, lora_view(unit, buffer, s.name),
                     lora_view(unit, buffer, module + ".lora_B.weight")});
  }
  return slots;
}

std::vector<const dist::Segment*> nested_offset_segments(const UnitsSpec& spec,
                                                        const dist::UnitLayout& block) {
  std::vector<const dist::Segment*> out;
  if (!spec.quant.double_quant) return out;
  const int64_t i = std::stoll(block.name.substr(block.name.find('.') + 1));
  for (const std::string& short_name : lora::block_linear_names())
    out.push_back(
        &block.segment(model::block_linear_module(i, short_name) + ".weight.nested_offset"));
  return out;
}

std::vector<float> block_nested_offsets(const UnitsSpec& spec, const dist::UnitLayout& block,
                                        const PayloadReader& read) {
  std::vector<float> out;
  for (const dist::Segment* s : nested_offset_segments(spec, block)) {
    float offset = 0.0f;
    read(s->offset, s->offset + sizeof offset, reinterpret_cast<uint8_t*>(&offset));
    out.push_back(offset);
  }
  return out;
}

void bind_block(model::DecoderModel& m, int64_t i, const UnitsSpec& spec,
                const dist::ShardedUnit& unit, const at::Tensor& buffer,
                const std::vector<float>& nested_offsets, const dist::ShardedUnit* lora_unit,
                const at::Tensor& lora_buffer, const lora::LoraConfig& lora_config,
                bool late_bound) {
  if (spec.quant.double_quant && nested_offsets.size() != lora::block_linear_names().size())
    throw std::logic_error("bind_block: " + std::to_string(nested_offsets.size()) +
                           " nested offsets for block " + std::to_string(i) + ", expected " +
                           std::to_string(lora::block_linear_names().size()));
  static const at::Tensor code_nf4 = quant::code_table(quant::QuantType::nf4);
  static const at::Tensor code_fp4 = quant::code_table(quant::QuantType::fp4);
  static const at::Tensor nested_code = quant::nested_code_table();
  const std::string p = layer_prefix(i);
  model::DecoderBlock b;
  const auto own = [late_bound](const at::Tensor& t) { return late_bound ? t.clone() : t; };
  for (const auto& [norm, size] : model::block_norms(m.config()))
    b.norm(norm) = own(unit.segment_view(buffer, p + norm + ".weight").to(m.norm_dtype()));
  const dist::UnitLayout& layout = unit.layout();
  const std::vector<std::string>& names = lora::block_linear_names();
  for (size_t k = 0; k < names.size(); ++k) {
    const std::string module = model::block_linear_module(i, names[k]);
    const std::string w = module + ".weight";
    const dist::Segment& packed = layout.segment(w);
    quant::Quantized q;
    q.packed = unit.segment_view(buffer, packed);
    q.state.shape = packed.shape;
    q.state.blocksize = spec.quant.blocksize;
    q.state.quant_type = spec.quant.quant_type;
    q.state.dtype = quant::scalar_type_from(spec.plain_dtype);
    q.state.absmax = unit.segment_view(buffer, w + ".absmax");
    q.state.code = spec.quant.quant_type == quant::QuantType::nf4 ? code_nf4 : code_fp4;
    if (spec.quant.double_quant) {
      quant::NestedState nested;
      nested.absmax = unit.segment_view(buffer, w + ".nested_absmax");
      nested.code = nested_code;
      nested.offset = nested_offsets[k];
      q.state.nested = nested;
    }
    at::Tensor bias;
    if (layout.has(module + ".bias"))
      bias = own(unit.segment_view(buffer, module + ".bias").to(m.compute_dtype()));
    b.linears.emplace_back(module, std::move(q), std::move(bias));
    if (late_bound)
      b.linears.back().set_weight_source([&m, i, k]() -> const quant::Quantized* {
        const model::DecoderBlock& bound = m.block(i);
        return k < bound.linears.size() ? &bound.linears[k].base() : nullptr;
      });
    if (lora_unit != nullptr && lora_unit->layout().has(module + ".lora_A.weight")) {
      const dist::UnitLayout& ll = lora_unit->layout();
      b.linears.back().adapter_set(lora_config,
                                   own(lora_view(ll, lora_buffer, module + ".lora_A.weight")),
                                   own(lora_view(ll, lora_buffer, module + ".lora_B.weight")));
    }
  }
  m.block(i) = std::move(b);
}

void unbind_block(model::DecoderModel& m, int64_t i) { m.block(i) = model::DecoderBlock(); }

namespace {

// The communicator of whole (unsharded) units on one process: ShardedUnit asks for one, and never
// uses it when it is not sharded. Any collective is a bug (std::logic_error).
class NoCommunicator final : public dist::Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string backend_name() const override { return "none"; }
  dist::Work all_gather_start(const at::Tensor&, const at::Tensor&) override { return fail(); }
  dist::Work reduce_scatter_start(const at::Tensor&, const at::Tensor&) override { return fail(); }
  dist::Work all_reduce_start(const at::Tensor&, dist::ReduceOp) override { return fail(); }
  dist::Work broadcast_start(const at::Tensor&, int) override { return fail(); }
  dist::Work barrier_start() override { return fail(); }

 private:
  [[noreturn]] static dist::Work fail() {
    throw std::logic_error("unit_file_model: a collective on the single-process communicator");
  }
};

}  // namespace

model::DecoderModel unit_file_model(const std::string& path, const model::LoadOptions& load) {
  const std::unique_ptr<train::UnitSource> source = train::UnitSource::open(path, load.quant);
  const train::UnitsSpec& spec = source->spec();
  model::DecoderModel m = model::DecoderModel::skeleton(spec.config, load);
  NoCommunicator comm;
  const dist::DeviceContext device(dist::Device::cpu, load.compute_dtype, comm);
  const std::vector<dist::UnitLayout> layouts = train::base_units(spec);
  const int64_t blocks = spec.config.num_hidden_layers;
  if (static_cast<int64_t>(layouts.size()) != blocks + 2)
    throw std::logic_error("unit_file_model: " + std::to_string(layouts.size()) + " base units for " +
                           std::to_string(blocks) + " blocks");
  for (size_t u = 0; u < layouts.size(); ++u) {
    dist::ShardedUnit unit(layouts[u], load.compute_dtype, device, /*sharded=*/false, nullptr,
                           /*is_base=*/true);
    const at::Tensor buffer = unit.shard();  // the whole unit
    source->read(unit.layout(), 0, unit.layout().nbytes, unit.shard_bytes().data_ptr<uint8_t>());
    if (u == 0) {
      train::bind_embed(m, unit, buffer);
    } else if (u + 1 == layouts.size()) {
      train::bind_head(m, unit, buffer);
    } else {
      const uint8_t* data = unit.shard_bytes().data_ptr<uint8_t>();
      const std::vector<float> offsets = train::block_nested_offsets(
          spec, unit.layout(),
          [&](size_t begin, size_t end, uint8_t* out) { std::memcpy(out, data + begin, end - begin); });
      train::bind_block(m, static_cast<int64_t>(u) - 1, spec, unit, buffer, offsets, nullptr,
                        at::Tensor(), lora::LoraConfig());
    }
  }
  return m;
}

}  // namespace qlora::train
