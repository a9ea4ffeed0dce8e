"""Bad input across commands, one table: every case makes its inputs (files that are empty,
truncated, of the wrong kind, with hostile sizes; configurations that contradict themselves or
their files; adapters for another model; datasets with out-of-range or wrong-typed columns),
runs one command and requires what every bad input must give:
  - a non-zero exit (1: an error in what the user handed us) on every rank: train and eval run
    under `mpirun -np 2`, each rank's own exit status is recorded by a wrapper shell;
  - exactly one line "qlora_dist <command>: error: ..." on stderr (once, not once per rank),
    naming what is wrong and where (the fragments of the case), valid UTF-8, nothing on stdout
    but what mpirun and the resolved configuration print before the check;
  - no hang: each run has a time limit (TIMEOUT_S);
  - nothing written: every file under the case's folder (inputs, the output's parent) has the
    same bytes afterwards and nothing was added.
README.md "Bad input" lists every case id with its command, input and message fragment; a test
below keeps that list equal to this table.
Inputs come from our own commands: init-model (tiny LLaMA, vocab 2048, hidden 256, 4 layers),
quantize (a bitsandbytes directory and an HDF5 unit file), synth-data (a token file, vocab 64,
64 rows x 32 tokens) and SmolLM2's tokenizer files (scripts/setup.sh).
"""
import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(HERE, "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
# `qlora_dist --version` names cuda among the devices in a CUDA build.
BUILD_HAS_CUDA = "cuda (" in subprocess.run([QLORA, "--version"], capture_output=True,
                                            text=True).stdout
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMP_NUM_THREADS="1")
# Per command; sanitizer builds (QLORA_TIMEOUT_SCALE 4) run several times slower: the header of a
# million tensors takes ~3 min under ASan.
TIMEOUT_S = 120 * float(os.environ.get("QLORA_TIMEOUT_SCALE", "1"))
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"  # [256, 256] in the tiny preset


def qlora(*args):
    res = subprocess.run([QLORA, *map(str, args)], capture_output=True, env=ENV, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The good inputs every case copies and breaks."""
    if not os.path.exists(QLORA):
        pytest.fail(f"qlora_dist not built in {BUILD}")
    d = tmp_path_factory.mktemp("base")
    qlora("init-model", "--preset", "tiny", "--out", d / "tiny", "--seed", 3)
    qlora("quantize", "--model", d / "tiny", "--out", d / "tiny.h5", "--format", "h5")
    qlora("quantize", "--model", d / "tiny", "--out", d / "q4")
    qlora("synth-data", "--out", d / "train.h5", "--vocab", 64, "--seq-len", 32, "--rows", 64,
          "--seed", 1)
    src = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(HERE, "..", "..", ".models", "smollm2")
    (d / "tok").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if not os.path.isfile(os.path.join(src, f)):
            pytest.fail(f"{src} has no {f}: run scripts/setup.sh (or set QLORA_SMOLLM2_DIR)")
        shutil.copy(os.path.join(src, f), d / "tok" / f)
    return d


class Inputs:
    """A case's folder: copies of the good inputs, helpers that break them."""

    def __init__(self, base, root):
        self.base, self.root = base, root
        self.out = root / "out"  # --out / output.output_dir: must not exist afterwards

    def copy(self, name):
        src, dst = self.base / name, self.root / name
        if not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return dst

    def model_file(self, name, data):
        """The model directory with `name` replaced by data (bytes, or a function of the good
        file's bytes)."""
        d = self.model()
        if callable(data):
            data = data((self.base / "tiny" / name).read_bytes())
        (d / name).write_bytes(data)
        return d

    def write(self, name, data):
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    # --- a Hugging Face model directory
    def model(self):
        return self.copy("tiny")

    def config(self, edit):
        p = self.model() / "config.json"
        c = json.loads(p.read_text())
        edit(c)
        p.write_text(json.dumps(c))
        return self.model()

    def header(self, edit, name="tiny/model.safetensors"):
        """Rewrites the safetensors header (a dict) of a copied file; the data stays."""
        p = self.root / name
        if not p.exists():
            self.copy(name.split("/")[0])
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        h, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        edit(h)
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
        return p.parent

    # --- the tiny model as an FP8 or MXFP4 checkpoint, then edited
    def fp8(self, edit=None, name="fp8"):
        """FP8 (block 128x128, fp32 scales; one scale value for every block, enough here);
        edit(config, tensors, torch) may break it."""
        import torch
        from safetensors.torch import load_file, save_file
        t = load_file(str(self.base / "tiny" / "model.safetensors"))
        for n in [n for n in t if n.endswith("_proj.weight")]:
            w = t[n]
            s = w.abs().amax() / 448
            t[n] = (w / s).to(torch.float8_e4m3fn)
            t[n[:-len("weight")] + "weight_scale_inv"] = s.expand(
                -(-w.shape[0] // 128), -(-w.shape[1] // 128)).contiguous()
        quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        return self._quantized_dir(name, t, quant, edit, save_file, torch)

    def mxfp4(self, edit=None, name="mxfp4", intermediate=672):
        """MXFP4 (zero blocks, scale 127): every linear's weight_blocks [out, ceil(in/32), 16] and
        weight_scales, the MLP sliced to `intermediate` first (the tiny model's 688 is not a
        multiple of 32)."""
        import torch
        from safetensors.torch import load_file, save_file
        t = load_file(str(self.base / "tiny" / "model.safetensors"))
        for n in [n for n in t if n.endswith("_proj.weight")]:
            w = t.pop(n)
            if n.endswith(("gate_proj.weight", "up_proj.weight")):
                w = w[:intermediate]
            elif n.endswith("down_proj.weight"):
                w = w[:, :intermediate]
            g = -(-w.shape[1] // 32)
            t[n[:-len(".weight")] + ".weight_blocks"] = torch.zeros(w.shape[0], g, 16, dtype=torch.uint8)
            t[n[:-len(".weight")] + ".weight_scales"] = torch.full((w.shape[0], g), 127, dtype=torch.uint8)
        quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
        return self._quantized_dir(name, t, quant, edit, save_file, torch,
                                   {"intermediate_size": intermediate})

    def _quantized_dir(self, name, tensors, quant, edit, save_file, torch, extra=None):
        d = self.root / name
        d.mkdir()
        cfg = json.loads((self.base / "tiny" / "config.json").read_text())
        cfg.update(extra or {})
        cfg["quantization_config"] = quant
        if edit:
            edit(cfg, tensors, torch)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    # --- a training job: config.ini on the unit file and the token file
    def ini(self, extra=""):
        return self.write("job.ini", f"[model]\nmodel_name_or_path = {self.copy('tiny.h5')}\n"
                          f"[data]\ntrain_file = {self.copy('train.h5')}\ncutoff_len = 32\n"
                          "[train]\nper_device_train_batch_size = 4\nmax_steps = 2\n" + extra)

    def train(self, *overrides, command="train"):
        return [command, self.ini(), f"--output.output_dir={self.out}", *overrides]

    def tokens(self, edit, name="d.h5"):
        """A copy of the token file edited with h5py (edit(f, np))."""
        import h5py
        import numpy as np
        p = self.root / name
        shutil.copy(self.base / "train.h5", p)
        with h5py.File(p, "r+") as f:
            edit(f, np)
        return p

    @staticmethod
    def replace(f, key, array):
        del f[key]
        f[key] = array

    def units(self, edit, name="u.h5"):
        """A copy of the unit file; edit(attrs, layout, config) may change all three."""
        import h5py
        p = self.root / name
        shutil.copy(self.base / "tiny.h5", p)
        with h5py.File(p, "r+") as f:
            layout, config = json.loads(f.attrs["layout_json"]), json.loads(f.attrs["config_json"])
            edit(f.attrs, layout, config)
            f.attrs["layout_json"] = json.dumps(layout)
            f.attrs["config_json"] = json.dumps(config)
        return p

    # --- a PEFT adapter for the tiny model's q_proj (r = 4), then edited
    def adapter(self, edit=None, name="adapter"):
        import torch
        from safetensors.torch import save_file
        d = self.root / name
        d.mkdir()
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
               "target_modules": ["q_proj"], "bias": "none", "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "tiny", "use_rslora": False}
        t = {}
        for i in range(4):
            p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
            t[p + ".lora_A.weight"] = torch.zeros(4, 256)
            t[p + ".lora_B.weight"] = torch.zeros(256, 4)
        if edit:
            edit(cfg, t, torch)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(t, str(d / "adapter_model.safetensors"))
        return d

    # --- prep: a JSON dataset with SmolLM2's tokenizer
    def prep(self, rows, *overrides, name="ds.jsonl"):
        ds = self.write(name, rows)
        self.out = self.root / "p.h5"
        ini = self.write("prep.ini", f"[model]\nmodel_name_or_path = {self.copy('tok')}\n"
                         f"[data]\ndataset = {ds}\ntemplate = smollm2\n[output]\noutput_dir = /o\n")
        return ["prep", ini, "--out", self.out, *overrides]


@dataclass
class Case:
    id: str
    command: str
    input: str  # what is bad, in words (the README table's "input" column)
    args: object  # Inputs -> argv after qlora_dist
    expect: tuple  # fragments the one error line must hold
    ranks: int = 1
    status: int = 1
    # Found while the job runs (token rows are checked when a rank reads them): the rank that
    # reads the bad row prints the line as "[rank R] qlora_dist ..." and ends the job with
    # MPI_Abort, which kills the other ranks (no status of their own, never 0).
    mid_run: bool = False
    env: dict = field(default_factory=dict)  # added to the environment of every rank


def bytes_of(name, data):
    return lambda w: w.write(name, data)


def set_key(key, value):
    def edit(c):
        c[key] = value
    return edit


def q(edit_model):
    """quantize on a model directory that edit_model(w) broke."""
    return lambda w: ["quantize", "--model", edit_model(w), "--out", w.out]


def fp8_quant(key, value):
    def edit(c, t, torch):
        c["quantization_config"][key] = value
    return edit


def fp8_tensors(edit_tensors):
    return lambda c, t, torch: edit_tensors(t, torch)


def unit_case(edit):
    return lambda w: w.train(f"--model.model_name_or_path={w.units(edit)}")


def token_case(edit):
    """train on an edited token file; 2 ranks x 32 rows read all 64 rows in the first step."""
    return lambda w: w.train(f"--data.train_file={w.tokens(edit)}",
                             "--train.per_device_train_batch_size=32")


def set_ids(key, row, col, value):
    def edit(f, np):
        x = f[key][()]
        x[row, col] = value
        f[key][...] = x
    return edit


def million_tensors(h):
    for i in range(1_000_000):
        h[f"t{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    h["t999999"]["dtype"] = "Q9"


def export(adapter_edit=None, adapter=None):
    def make(w):
        a = adapter(w) if adapter else w.adapter(adapter_edit)
        return ["export", "--model", w.copy("q4"), "--adapter", a, "--out", w.out]
    return make


def train_adapter(edit):
    return lambda w: w.train(f"--model.adapter_name_or_path={w.adapter(edit)}")


def adapter_file(name, data):
    def make(w):
        a = w.adapter()
        (a / name).write_bytes(data)
        return a
    return make


def layout_entry(i, key, value):
    def edit(attrs, layout, config):
        layout[1]["segments"][0][key] = value
    return edit


CASES = [
    # ---- quantize: config.json
    Case("quantize-config-empty", "quantize", "config.json of 0 bytes",
         q(lambda w: w.model_file("config.json", b"")),
         ("config.json", "invalid JSON", "expected a JSON object")),
    Case("quantize-config-png", "quantize", "a PNG image as config.json",
         q(lambda w: w.model_file("config.json", PNG)),
         ("config.json", "invalid JSON", "\\x89")),
    Case("quantize-config-truncated", "quantize", "config.json cut after 200 bytes",
         q(lambda w: w.model_file("config.json", lambda b: b[:200])),
         ("config.json", "invalid JSON")),
    Case("quantize-config-hidden-string", "quantize", 'hidden_size "256" (a string)',
         q(lambda w: w.config(set_key("hidden_size", "256"))),
         ("config.json", "'hidden_size'", "positive integer")),
    Case("quantize-config-eps-string", "quantize", 'rms_norm_eps "tiny" (a string)',
         q(lambda w: w.config(set_key("rms_norm_eps", "tiny"))),
         ("config.json", "'rms_norm_eps'", "a number")),
    Case("quantize-config-tie-string", "quantize", 'tie_word_embeddings "yes" (a string)',
         q(lambda w: w.config(set_key("tie_word_embeddings", "yes"))),
         ("config.json", "'tie_word_embeddings'", "true or false")),
    Case("quantize-config-10M-layers", "quantize", "num_hidden_layers 10000000 (hostile size)",
         q(lambda w: w.config(set_key("num_hidden_layers", 10_000_000))),
         ("config.json", "'num_hidden_layers' is 10000000", "at most")),
    Case("quantize-config-head-dim", "quantize", "head_dim 64 where the weights have 32",
         q(lambda w: w.config(set_key("head_dim", 64))),
         ("self_attn.k_proj.weight", "[128, 256]", "config.json implies [256, 256]")),
    Case("quantize-config-gptq", "quantize", "quantization_config of a GPTQ model",
         q(lambda w: w.config(set_key("quantization_config", {"quant_method": "gptq", "bits": 4}))),
         ("config.json", "already quantized", "'gptq'")),
    Case("quantize-model-is-a-file", "quantize", "--model names config.json, not its directory",
         lambda w: ["quantize", "--model", w.model() / "config.json", "--out", w.out],
         ("config.json", "not a directory")),
    # ---- quantize: model.safetensors
    Case("quantize-st-empty", "quantize", "model.safetensors of 0 bytes",
         q(lambda w: w.model_file("model.safetensors", b"")),
         ("model.safetensors", "0 bytes", "at least 8 bytes")),
    Case("quantize-st-header-2^63", "quantize", "header length 2^63",
         q(lambda w: w.model_file("model.safetensors",
                                lambda b: struct.pack("<Q", 1 << 63) + b[8:])),
         ("model.safetensors", "header length 9223372036854775808", "expected at most")),
    Case("quantize-st-is-hdf5", "quantize", "an HDF5 token file as model.safetensors",
         q(lambda w: w.model_file("model.safetensors", (w.base / "train.h5").read_bytes())),
         ("model.safetensors", "header length", "is larger than the file allows")),
    Case("quantize-st-shape-overflow", "quantize", "shape [2^62, 2^62] (product leaves 64 bits)",
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(shape=[1 << 62, 1 << 62]))),
         ("model.safetensors", Q_PROJ, "more elements than fit in 64 bits")),
    Case("quantize-st-shape-negative", "quantize", "shape [-1, 256]",
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(shape=[-1, 256]))),
         ("model.safetensors", Q_PROJ, "entry -1", "non-negative")),
    Case("quantize-st-shape-string", "quantize", 'shape [256, "x"]',
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(shape=[256, "x"]))),
         ("model.safetensors", Q_PROJ, 'entry "x"')),
    Case("quantize-st-dtype-unknown", "quantize", 'dtype "Q9"',
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(dtype="Q9"))),
         ("model.safetensors", Q_PROJ, '"Q9"', "F32")),
    Case("quantize-st-offsets-beyond", "quantize", "data_offsets [0, 2^40] past the file",
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(data_offsets=[0, 1 << 40]))),
         ("model.safetensors", Q_PROJ, "end beyond the data section")),
    Case("quantize-st-offsets-vs-shape", "quantize", "data_offsets of 4 bytes for [256, 256] F32",
         q(lambda w: w.header(lambda h: h[Q_PROJ].update(data_offsets=[0, 4]))),
         ("model.safetensors", Q_PROJ, "expected 262144 bytes")),
    Case("quantize-st-metadata-int", "quantize", "__metadata__ value 5 (not a string)",
         q(lambda w: w.header(lambda h: h.update(__metadata__={"format": 5}))),
         ("model.safetensors", "__metadata__", "'format'", "string")),
    Case("quantize-st-name-newline", "quantize", "a tensor name with a newline in it",
         q(lambda w: w.header(lambda h: h.update({"model.norm.weight\nx": h.pop("model.norm.weight")}))),
         ("'model.norm.weight' is missing",)),
    Case("quantize-st-1M-tensors", "quantize", "a header of 1,000,000 empty tensors (80 MB), the last of dtype Q9",
         q(lambda w: w.header(million_tensors)),
         ("model.safetensors", "'t999999'", '"Q9"')),
    # ---- quantize (and train, inspect): FP8 / MXFP4 checkpoints that cannot be dequantized
    Case("quantize-fp8-block-triple", "quantize", "fp8 weight_block_size [128, 128, 1]",
         q(lambda w: w.fp8(fp8_quant("weight_block_size", [128, 128, 1]))),
         ("config.json", "quantization_config.weight_block_size [128,128,1]",
          "two positive integers")),
    Case("quantize-fp8-block-zero", "quantize", "fp8 weight_block_size [0, 128]",
         q(lambda w: w.fp8(fp8_quant("weight_block_size", [0, 128]))),
         ("config.json", "weight_block_size [0,128]", "two positive integers")),
    Case("train-fp8-block-zero", "train", "fp8 weight_block_size [0, 128], under train",
         lambda w: w.train(f"--model.model_name_or_path={w.fp8(fp8_quant('weight_block_size', [0, 128]))}"),
         ("config.json", "weight_block_size [0,128]", "two positive integers"), ranks=2),
    Case("quantize-fp8-fmt-e5m2", "quantize", 'fp8 fmt "e5m2"',
         q(lambda w: w.fp8(fp8_quant("fmt", "e5m2"))),
         ("config.json", 'quantization_config.fmt "e5m2"', "float8_e4m3fn")),
    Case("quantize-fp8-modules-to-convert", "quantize", "fp8 modules_to_convert [embed_tokens]",
         q(lambda w: w.fp8(fp8_quant("modules_to_convert", ["model.embed_tokens"]))),
         ("config.json", "modules_to_convert", "FP8 embeddings are not supported")),
    Case("quantize-fp8-unknown-key", "quantize", "fp8 quantization_config with kv_cache_scheme",
         q(lambda w: w.fp8(fp8_quant("kv_cache_scheme", "fp8"))),
         ("config.json", "'kv_cache_scheme'", "cannot honour", "known keys")),
    Case("quantize-fp8-e5m2-weights", "quantize", "fp8 weights stored as float8_e5m2",
         q(lambda w: w.fp8(fp8_tensors(lambda t, torch: t.update(
             {n: v.float().to(torch.float8_e5m2) for n, v in t.items() if v.dtype == torch.float8_e4m3fn})))),
         ("model.layers.0.mlp.down_proj.weight", "F8_E5M2", "expected F8_E4M3")),
    Case("quantize-fp8-e4m3fnuz-weights", "quantize", "fp8 weights stored as float8_e4m3fnuz",
         q(lambda w: w.fp8(fp8_tensors(lambda t, torch: t.update(
             {n: v.float().to(torch.float8_e4m3fnuz) for n, v in t.items() if v.dtype == torch.float8_e4m3fn})))),
         ("model.layers.0.mlp.down_proj.weight", "F8_E4M3FNUZ", "expected F8_E4M3")),
    Case("quantize-fp8-scale-grid", "quantize", "fp8 weight_block_size [64, 64] over scales of 128x128 blocks",
         q(lambda w: w.fp8(fp8_quant("weight_block_size", [64, 64]))),
         ("model.layers.0.mlp.down_proj.weight_scale_inv", "[2, 6]", "expected [4, 11]",
          "weight_block_size [64, 64]")),
    Case("quantize-fp8-scale-missing", "quantize", "an fp8 weight without its weight_scale_inv",
         q(lambda w: w.fp8(fp8_tensors(lambda t, torch: t.pop(
             "model.layers.2.mlp.up_proj.weight_scale_inv")))),
         ("model.layers.2.mlp.up_proj.weight", "F8_E4M3", "weight_scale_inv' is missing")),
    Case("inspect-fp8-scale-dtype", "inspect", "fp8 scales stored as int32",
         lambda w: ["inspect", "--model", w.fp8(fp8_tensors(lambda t, torch: t.update(
             {n: v.to(torch.int32) for n, v in t.items() if n.endswith("scale_inv")})))],
         ("weight_scale_inv", "dtype I32", "F32, BF16 or F16")),
    Case("quantize-mxfp4-in-not-32", "quantize", "mxfp4 down_proj with in_features 200",
         q(lambda w: w.mxfp4(intermediate=200)),
         ("model.layers.0.mlp.down_proj.weight_blocks", "multiple of 32", "has 200")),
    Case("quantize-mxfp4-blocks-shape", "quantize", "mxfp4 weight_blocks [256, 8, 8]",
         q(lambda w: w.mxfp4(fp8_tensors(lambda t, torch: t.update(
             {"model.layers.1.self_attn.q_proj.weight_blocks": torch.zeros(256, 8, 8, dtype=torch.uint8)})))),
         ("model.layers.1.self_attn.q_proj.weight_blocks", "[256, 8, 8]", "expected [256, 8, 16]")),
    Case("inspect-st-truncated", "inspect", "model.safetensors cut to 1000 bytes",
         lambda w: ["inspect", "--model", w.model_file("model.safetensors", lambda b: b[:1000])],
         ("model.safetensors",)),
    # ---- export: adapters for another model, broken adapter files
    Case("export-adapter-r-contradiction", "export", "adapter_config r 8, tensors of rank 4",
         export(lambda c, t, torch: c.update(r=8)),
         ("adapter_model.safetensors", "lora_A.weight", "[4, 256]", "r = 8")),
    Case("export-adapter-other-targets", "export", "target_modules [c_attn] (GPT-2's)",
         export(lambda c, t, torch: c.update(target_modules=["c_attn"])),
         ("adapter_config.json", "'target_modules'", "model.layers.0.self_attn.q_proj")),
    Case("export-adapter-ia3", "export", 'peft_type "IA3"',
         export(lambda c, t, torch: c.update(peft_type="IA3")),
         ("adapter_config.json", '"IA3"', '"LORA"')),
    Case("export-adapter-no-lora-b", "export", "lora_B of layer 0 missing",
         export(lambda c, t, torch: t.pop(
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")),
         ("adapter_model.safetensors", "layers.0.self_attn.q_proj.lora_B.weight is missing")),
    Case("export-adapter-png", "export", "a PNG image as adapter_model.safetensors",
         export(adapter=adapter_file("adapter_model.safetensors", PNG)),
         ("adapter_model.safetensors", "header length")),
    Case("export-adapter-config-empty", "export", "adapter_config.json of 0 bytes",
         export(adapter=adapter_file("adapter_config.json", b"")),
         ("adapter_config.json", "JSON")),
    # ---- train (2 ranks): the model file
    Case("train-model-token-file", "train", "model_name_or_path = an HDF5 token file",
         lambda w: w.train(f"--model.model_name_or_path={w.copy('train.h5')}"),
         ("train.h5", "format 'qlora_dist.tokens'", "'qlora_dist.units'"), ranks=2),
    Case("train-model-png", "train", "model_name_or_path = a PNG image",
         lambda w: w.train(f"--model.model_name_or_path={w.write('m.png', PNG)}"),
         ("m.png", "not a directory and not an HDF5 file"), ranks=2),
    Case("train-activations-exceed-memory", "train",
         "gradient_checkpointing = false with 10^6 rows per micro-batch",
         lambda w: w.train("--train.gradient_checkpointing=false",
                           "--train.per_device_train_batch_size=1000000"),
         ("train.gradient_checkpointing = false", "1000000 rows x 32 tokens", "estimated at",
          "more than half of this node's", "set train.gradient_checkpointing = true"), ranks=2),
    # No GPU is visible (CUDA_VISIBLE_DEVICES empty, also on a GPU machine): every rank refuses.
    Case("train-cuda-no-gpu", "train", "model.device = cuda where no GPU is visible",
         lambda w: w.train("--model.device=cuda"),
         ("model.device = cuda: no GPU visible on this node", "CUDA_VISIBLE_DEVICES=",
          "use model.device = cpu") if BUILD_HAS_CUDA else
         ("model.device = cuda: this build has no CUDA",),
         ranks=2, env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("train-units-truncated", "train", "the unit file cut in half",
         lambda w: w.train("--model.model_name_or_path=" + str(w.write(
             "cut.h5", (w.base / "tiny.h5").read_bytes()[:(w.base / "tiny.h5").stat().st_size // 2]))),
         ("cut.h5", "truncated"), ranks=2),
    Case("train-units-shape-overflow", "train", "layout segment shape [2^40, 2^40]",
         unit_case(layout_entry(1, "shape", [1 << 40, 1 << 40])),
         ("u.h5", "unit layout table", "model.layers.0.input_layernorm.weight",
          "more elements than a unit can hold"), ranks=2),
    Case("train-units-nbytes-2^62", "train", "layout segment nbytes 2^62",
         unit_case(layout_entry(1, "nbytes", 1 << 62)),
         ("u.h5", "unit layout table", "4611686018427387904", "0/1024"), ranks=2),
    Case("train-units-10M-layers", "train", "config_json num_hidden_layers 10000000",
         unit_case(lambda a, l, c: c.update(num_hidden_layers=10_000_000)),
         ("u.h5:config_json", "'num_hidden_layers' is 10000000", "at most"), ranks=2),
    Case("train-units-1M-units", "train", "layout_json with 1,000,000 empty units",
         unit_case(lambda a, l, c: l.__setitem__(
             slice(None), [{"name": "x", "nbytes": 0, "segments": []}] * 1_000_000)),
         ("u.h5", "unit layout table differs"), ranks=2),
    # ---- train (2 ranks): the token file
    Case("train-tokens-empty", "train", "train_file of 0 bytes",
         lambda w: w.train(f"--data.train_file={w.write('e.h5', b'')}"),
         ("e.h5", "not an HDF5 file", "0 bytes"), ranks=2),
    Case("train-tokens-unit-file", "train", "train_file = the HDF5 unit file",
         lambda w: w.train(f"--data.train_file={w.copy('tiny.h5')}"),
         ("tiny.h5", "no dataset 'input_ids'"), ranks=2),
    Case("train-label-negative", "train", "label -5 (only -100 may be negative)",
         token_case(set_ids("labels", 2, 3, -5)),
         ("d.h5", "labels row 2, column 3", "token id -5", "-100"), ranks=2, mid_run=True),
    Case("train-label-oov", "train", "label 2048 = the model's vocab_size",
         token_case(set_ids("labels", 2, 3, 2048)),
         ("d.h5", "labels row 2, column 3", "2048", "[0, 2048)"), ranks=2, mid_run=True),
    Case("train-ids-negative", "train", "input id -1",
         token_case(set_ids("input_ids", 5, 0, -1)),
         ("d.h5", "input_ids row 5, column 0", "token id -1"), ranks=2, mid_run=True),
    Case("train-ids-float", "train", "input_ids stored as float32",
         token_case(lambda f, np: Inputs.replace(f, "input_ids",
                                                 f["input_ids"][()].astype(np.float32))),
         ("d.h5", "'input_ids' holds float32", "integer token ids"), ranks=2),
    Case("train-ids-strings", "train", "input_ids stored as strings",
         token_case(lambda f, np: Inputs.replace(f, "input_ids",
                                                 f["input_ids"][()].astype("S4"))),
         ("d.h5", "'input_ids' holds string", "integer token ids"), ranks=2),
    Case("train-labels-shape", "train", "labels [64, 31] beside input_ids [64, 32]",
         token_case(lambda f, np: Inputs.replace(f, "labels", f["labels"][()][:, :31])),
         ("d.h5", "[64, 31]", "expected the same shape"), ranks=2),
    Case("train-tokens-zero-rows", "train", "input_ids and labels of 0 rows",
         token_case(lambda f, np: [Inputs.replace(f, k, f[k][()][:0])
                                   for k in ("input_ids", "labels")]),
         ("d.h5", "[0, 32]", "1 row or more"), ranks=2),
    Case("train-vocab-attr-string", "train", 'attribute vocab_size = "big"',
         token_case(lambda f, np: f.attrs.__setitem__("vocab_size", "big")),
         ("d.h5", "'vocab_size' holds string", "integer"), ranks=2),
    Case("train-vocab-attr-too-big", "train", "attribute vocab_size 5000 > the model's 2048",
         token_case(lambda f, np: f.attrs.__setitem__("vocab_size", np.int64(5000))),
         ("d.h5", "vocab_size 5000", "2048"), ranks=2),
    # ---- train (2 ranks): adapters for another model
    Case("train-adapter-r-contradiction", "train", "adapter_config r 8, tensors of rank 4",
         train_adapter(lambda c, t, torch: c.update(r=8)),
         ("adapter_model.safetensors", "[4, 256]", "r = 8"), ranks=2),
    Case("train-adapter-other-targets", "train", "tensors for k_proj, target_modules [q_proj]",
         train_adapter(lambda c, t, torch: [t.__setitem__(k.replace("q_proj", "k_proj"), t.pop(k))
                                            for k in list(t)]),
         ("adapter_config.json", "'target_modules'", "self_attn.k_proj"), ranks=2),
    Case("train-adapter-wider-model", "train", "lora_A [4, 512]: an adapter for hidden 512",
         train_adapter(lambda c, t, torch: [t.__setitem__(k, torch.zeros(4, 512))
                                            for k in list(t) if "lora_A" in k]),
         ("adapter_model.safetensors", "model.layers.0.self_attn.q_proj", "[4, 512]", "[4, 256]"),
         ranks=2),
    Case("train-adapter-r-string", "train", 'adapter_config r "four"',
         train_adapter(lambda c, t, torch: c.update(r="four")),
         ("adapter_config.json", "'r'", "integer"), ranks=2),
    # ---- train / eval (2 ranks): configurations that contradict themselves
    Case("train-ini-png", "train", "a PNG image as config.ini",
         lambda w: ["train", w.write("c.ini", PNG), f"--output.output_dir={w.out}"],
         ("c.ini:1", "malformed line", "[section]"), ranks=2),
    Case("train-ini-empty", "train", "config.ini of 0 bytes",
         lambda w: ["train", w.write("c.ini", b""), f"--output.output_dir={w.out}"],
         ("c.ini", "model.model_name_or_path is required"), ranks=2),
    Case("train-nothing-to-do", "train", "do_train = false and do_eval = false",
         lambda w: w.train("--train.do_train=false", "--train.do_eval=false"),
         ("do_train", "do_eval", "nothing to do"), ranks=2),
    Case("train-dataset-and-train-file", "train", "data.dataset beside data.train_file",
         lambda w: w.train(f"--data.dataset={w.write('ds.jsonl', '{}')}"),
         ("data.dataset and data.train_file are both set",), ranks=2),
    Case("train-dpo-on-sft-tokens", "train", "train.stage = dpo on an SFT token file",
         lambda w: w.train("--train.stage=dpo"),
         ("train.h5", "train.stage = dpo", "chosen_input_ids"), ranks=2),
    Case("eval-without-eval-data", "eval", "eval with no eval_file, eval_dataset or val_size",
         lambda w: w.train(command="eval"),
         ("data.eval_file is required",), ranks=2),
    Case("train-dataset-missing-column", "train", 'JSON rows without the "output" column',
         lambda w: ["train", w.write("c.ini", f"[model]\nmodel_name_or_path = {w.copy('tiny.h5')}\n"
                                     f"tokenizer_name_or_path = {w.copy('tok')}\n[data]\n"
                                     f"dataset = {w.write('ds.jsonl', json.dumps({'instruction': 'a', 'answer': 'b'}))}\n"
                                     "template = smollm2\n"), f"--output.output_dir={w.out}"],
         ("ds.jsonl:1", 'no "output"', "instruction, output"), ranks=2),
    # ---- prep: JSON datasets and tokenizer files
    Case("prep-dataset-empty", "prep", "a dataset file of 0 bytes",
         lambda w: w.prep(""), ("ds.jsonl", "empty file", "JSON Lines")),
    Case("prep-dataset-png", "prep", "a PNG image as the dataset",
         lambda w: w.prep(PNG), ("ds.jsonl", "not JSON", "\\x89")),
    Case("prep-output-int", "prep", '"output": 5 (an int where a string goes)',
         lambda w: w.prep('{"instruction": "a", "output": 5}\n'),
         ("ds.jsonl:1", '"output" must be a string', "5")),
    Case("prep-jsonl-truncated", "prep", "the last JSON line cut short",
         lambda w: w.prep('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp'),
         ("ds.jsonl:2", "not valid JSON")),
    Case("prep-sharegpt-value-int", "prep", 'a sharegpt message whose "value" is 7',
         lambda w: w.prep(json.dumps({"conversations": [{"from": "human", "value": "a"},
                                                        {"from": "gpt", "value": 7}]})),
         ("ds.jsonl:1", "message 2", '"value"')),
    Case("prep-messages-not-list", "prep", '"messages": "hello" (a string, not a list)',
         lambda w: w.prep('{"messages": "hello"}\n'), ("ds.jsonl:1", '"messages" must be a list')),
    Case("prep-array-of-numbers", "prep", "a JSON array of numbers",
         lambda w: w.prep("[1, 2, 3]", name="ds.json"), ("ds.json", "row 1", "JSON object")),
    Case("prep-tokenizer-truncated", "prep", "tokenizer.json cut at 5000 bytes",
         lambda w: (w.copy("tok"), w.write("tok/tokenizer.json", (
             w.base / "tok/tokenizer.json").read_bytes()[:5000]),
                    w.prep('{"instruction": "a", "output": "b"}\n'))[2],
         ("tokenizer.json", "not valid JSON")),
    Case("prep-tokenizer-png", "prep", "a PNG image as tokenizer.json",
         lambda w: (w.copy("tok"), w.write("tok/tokenizer.json", PNG),
                    w.prep('{"instruction": "a", "output": "b"}\n'))[2],
         ("tokenizer.json", "not valid JSON", "\\x89")),
    # ---- generate, synth-data, plot
    Case("generate-model-token-file", "generate", "--model = an HDF5 token file",
         lambda w: ["generate", "--model", w.copy("train.h5"), "--tokenizer", w.copy("tok"),
                    "--raw", "--prompt", "a"],
         ("train.h5", "format 'qlora_dist.tokens'", "'qlora_dist.units'")),
    Case("synth-data-rows-2^40", "synth-data", "--rows 2^40 (hostile size)",
         lambda w: ["synth-data", "--out", w.out, "--vocab", 64, "--seq-len", 32,
                    "--rows", 1 << 40],
         ("rows 1099511627776", "at most")),
    Case("synth-data-seq-len-2^40", "synth-data", "--seq-len 2^40 (hostile size)",
         lambda w: ["synth-data", "--out", w.out, "--vocab", 64, "--seq-len", 1 << 40,
                    "--rows", 4],
         ("seq_len 1099511627776", "at most")),
    Case("plot-metrics-png", "plot", "a PNG image as metrics.jsonl",
         lambda w: (w.write("run/metrics.jsonl", PNG), ["plot", w.root / "run", "--out", w.out])[1],
         ("metrics.jsonl:1", "not a JSON object")),
]


def snapshot(root):
    """{relative path: bytes, or None for a directory} of everything under root."""
    snap = {}
    for r, dirs, files in os.walk(root):
        for d in dirs:
            snap[os.path.relpath(os.path.join(r, d), root)] = None
        for f in files:
            p = os.path.join(r, f)
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, root)] = fh.read()
    return snap


def run_case(case, argv, status_dir):
    """(returncode, stdout, stderr, per-rank statuses or None)."""
    argv = [str(a) for a in argv]
    if case.ranks == 1:
        res = subprocess.run([QLORA, *argv], capture_output=True, env={**ENV, **case.env},
                             timeout=TIMEOUT_S)
        return res.returncode, res.stdout, res.stderr, None
    wrapper = f'"$0" "$@"; s=$?; echo $s > {status_dir}/rank.$OMPI_COMM_WORLD_RANK; exit $s'
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", str(case.ranks), "sh", "-c", wrapper,
                          QLORA, *argv], capture_output=True, env={**ENV, **case.env},
                         timeout=TIMEOUT_S)
    statuses = {}
    for r in range(case.ranks):
        p = os.path.join(status_dir, f"rank.{r}")
        statuses[r] = int(open(p).read()) if os.path.exists(p) else None
    return res.returncode, res.stdout, res.stderr, statuses


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(base, tmp_path, case):
    root = tmp_path / "case"
    root.mkdir()
    status_dir = tmp_path / "ranks"
    status_dir.mkdir()
    w = Inputs(base, root)
    argv = case.args(w)
    before = snapshot(root)
    code, out, err, ranks = run_case(case, argv, status_dir)
    text = err.decode("utf-8")  # raises on a message that is not UTF-8
    ctx = f"exit {code}\nstdout: {out[-1500:]!r}\nstderr: {text!r}"
    prefix = f"qlora_dist {case.command}: error: "
    lines = [l for l in text.splitlines() if "qlora_dist" in l]
    assert code != 0, ctx
    if case.mid_run:
        assert len(lines) == 1 and re.match(r"\[rank [0-9]+\] " + re.escape(prefix), lines[0]), ctx
        assert 0 not in ranks.values(), f"rank statuses {ranks}\n{ctx}"
    else:
        assert len(lines) == 1 and lines[0].startswith(prefix), ctx
    for fragment in case.expect:
        assert fragment in lines[0], f"expected {fragment!r} in the message\n{ctx}"
    if ranks is None:
        assert code == case.status, ctx
        assert text.count("\n") == 1 and text.endswith("\n"), ctx
        assert out == b"", ctx
    elif not case.mid_run:
        assert ranks == {r: case.status for r in range(case.ranks)}, f"rank statuses {ranks}\n{ctx}"
        assert text.startswith(prefix), ctx  # the message first, then only mpirun's own lines
    after = snapshot(root)
    if case.mid_run:  # the run had started: its new output_dir may hold what it began to write
        after = {p: b for p, b in after.items() if p != "out" and not p.startswith("out/")}
    else:
        assert not os.path.exists(w.out), f"{w.out} was created\n{ctx}"
    assert after == before, "files under the case's folder were changed or added"


def test_readme_lists_every_case():
    """README.md's bad-input table has a row per case: id, command, input, message fragment."""
    readme = open(os.path.join(HERE, "..", "..", "README.md")).read()
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", readme, re.M)
    table = {i: c for i, c in rows if i in {case.id for case in CASES}}
    assert table == {c.id: c.command for c in CASES}, sorted(set(c.id for c in CASES) - set(table))
    assert len(CASES) == len({c.id for c in CASES}), "duplicate case id"
