// Where the model meets the sharding (DESIGN.md sections 1 and 3): the decoder turned into
// sharded units, the bytes of those units from a Hugging Face directory or from our HDF5 unit
// file, and gathered units bound into the decoder as views.
//   units:  [embed] [block.0] ... [block.L-1] [head]       base units, storage = compute dtype
//           [lora.0] ... [lora.L-1]                          LoRA A / B of each block, fp32
//   embed = model.embed_tokens.weight;  head = model.norm.weight + lm_head.weight (a copy of the
//   embedding when tied, so that the head is one unit like any other);  block.i = its norms
//   (model::block_norms: two, four for Gemma 3, plus q/k norms for Qwen3 and Gemma 3),
//   each linear's packed weight + absmax (+ nested absmax + offset) and bias (Qwen2).
// Embedding, norms, biases and lm_head are stored in the model's own dtype (config torch_dtype)
// and converted to the compute dtype when bound.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/sharded_unit.h"
#include "dist/unit_layout.h"
#include "io/safetensors.h"
#include "lora/adapter_slots.h"
#include "lora/lora_linear.h"
#include "model/decoder.h"
#include "model/model_config.h"
#include "quant/quantize.h"

namespace qlora::train {

struct UnitsSpec {
  model::ModelConfig config;
  quant::QuantizeOptions quant;  // quant_type, blocksize, double_quant (storage is not used)
  io::DType plain_dtype = io::DType::F32;
};

std::vector<dist::UnitLayout> base_units(const UnitsSpec& spec);
std::vector<dist::UnitLayout> lora_units(const model::ModelConfig& config, int64_t rank,
                                         const std::vector<std::string>& targets);

// A model to shard, read unit by unit. Opened from a Hugging Face directory through
// model::ModelReader (unquantized: block linears are quantized with `quant` as they are read;
// bitsandbytes 4-bit: read as stored, and only if every block linear is 4-bit with bitsandbytes'
// own code tables and one setting for all) or from an HDF5 unit file written by
// `qlora_dist quantize --format h5`.
class UnitSource {
 public:
  virtual ~UnitSource() = default;
  static std::unique_ptr<UnitSource> open(const std::string& path,
                                          const quant::QuantizeOptions& quant);
  const UnitsSpec& spec() const { return spec_; }
  const std::string& config_json() const { return config_json_; }  // config.json as text
  const std::string& path() const { return path_; }
  // Bytes [begin, end) of unit `unit` into `out` (zeros where no segment is).
  virtual void read(const dist::UnitLayout& unit, size_t begin, size_t end, uint8_t* out) = 0;
  virtual size_t bytes_read() const = 0;  // from files, so far

 protected:
  UnitsSpec spec_;
  std::string config_json_;
  std::string path_;
};

// Writes every base unit of `source` (and the layout, config and quantization settings) into
// the HDF5 file `out_path`, written beside it and renamed at the end. Returns bytes written.
size_t units_h5_write(UnitSource& source, const std::string& out_path);

// The fp32 nested offset (double quantization) of each linear of block unit `block`, in
// lora::block_linear_names() order (empty without double quantization), read through `read`
// from the unit's payload bytes [begin, end).
using PayloadReader = std::function<void(size_t begin, size_t end, uint8_t* out)>;
// The nested-offset segments (4 bytes, fp32) of a block unit in that order (empty without double
// quantization).
std::vector<const dist::Segment*> nested_offset_segments(const UnitsSpec& spec,
                                                        const dist::UnitLayout& block);
std::vector<float> block_nested_offsets(const UnitsSpec& spec, const dist::UnitLayout& block,
                                        const PayloadReader& read);

// Binding gathered units into the decoder (views into the buffers, converted to the compute
// dtype where the stored dtype differs). LoRA weights are bound as leaves that require grad.
void bind_embed(model::DecoderModel& m, const dist::ShardedUnit& unit, const at::Tensor& buffer);
void bind_head(model::DecoderModel& m, const dist::ShardedUnit& unit, const at::Tensor& buffer);
// `nested_offsets`: block_nested_offsets of the unit (read once at load, so that binding never
// reads device memory on the host).
// `late_bound` (a forward whose autograd graph outlives the buffers: no recompute): norms, biases
// and LoRA weights are bound as copies of their own (a graph may keep them; the buffers go back
// to their pool), and each linear's base product is late-bound to whatever linear block i binds
// at its backward (QLoraLinear::set_weight_source), so no graph keeps a view of the buffers.
void bind_block(model::DecoderModel& m, int64_t i, const UnitsSpec& spec,
                const dist::ShardedUnit& unit, const at::Tensor& buffer,
                const std::vector<float>& nested_offsets, const dist::ShardedUnit* lora_unit,
                const at::Tensor& lora_buffer, const lora::LoraConfig& lora_config,
                bool late_bound = false);
void unbind_block(model::DecoderModel& m, int64_t i);

// The whole decoder from an HDF5 unit file on one process, without MPI (generation): every base
// unit read whole on the CPU (storage = compute dtype, as the trainer stores it) and bound once;
// the bound views keep the unit buffers alive. No adapter bound (DecoderModel::adapters_load).
model::DecoderModel unit_file_model(const std::string& path, const model::LoadOptions& load);

// The fp32 view of LoRA segment `name` ("<module>.lora_A.weight" / "lora_B") in a LoRA buffer.
at::Tensor lora_view(const dist::UnitLayout& unit, const at::Tensor& buffer,
                     const std::string& name);
// The adapter slots of a LoRA unit (lora_view of each linear's A and B in `buffer`), in the
// unit's order: block_linear_names(), as lora::adapter_init needs them.
std::vector<lora::AdapterSlot> lora_slots(const dist::UnitLayout& unit, const at::Tensor& buffer);

}  // namespace qlora::train
