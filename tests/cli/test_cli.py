"""The qlora_dist binary on bad and good input.

Every bad input must end with:
  - exit status 1 (an error in what the user handed us) or 2 (a usage error: the command line
    itself does not parse: unknown command or option, missing required option, a value of the
    wrong kind);
  - exactly one line on stderr, "qlora_dist <command>: error: ...", naming what is wrong (the
    path, key, tensor, option or value), and nothing on stdout;
  - nothing written: --out does not exist afterwards (or, if it existed, is byte-for-byte as it
    was) and no hidden temporary directory is left beside it.
Models come from `qlora_dist init-model --preset tiny` (LLaMA, 4 layers, hidden 256, fp32).
"""
import filecmp
import json
import os
import re
import shutil
import struct
import subprocess

import pytest

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")

SUPPORTED = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
             "Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its language model)")
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"  # [256, 256] in the tiny preset

# Every option of each command, as its --help lists them.
QUANTIZE_OPTIONS = {"help", "model", "out", "format", "quantization_type", "quantization_blocksize",
                    "double_quantization", "quant_storage"}
INIT_MODEL_OPTIONS = {"help", "preset", "out", "seed"}


def run(*args):
    if not os.path.exists(QLORA):
        pytest.fail(f"qlora_dist not built in {BUILD}")
    return subprocess.run([QLORA, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_error(res, command, status, *names):
    """One line on stderr, prefixed with the command, naming every one of `names`."""
    context = f"exit {res.returncode}\nstdout: {res.stdout!r}\nstderr: {res.stderr!r}"
    assert res.returncode == status, context
    assert res.stderr.endswith("\n") and res.stderr.count("\n") == 1, context
    assert res.stderr.startswith(f"qlora_dist {command}: error: "), context
    for name in names:
        assert str(name) in res.stderr, f"expected {str(name)!r} in the message\n{context}"
    assert res.stdout == "", context


def tree_snapshot(path):
    """{relative path: bytes} of every file under path, and every directory as None."""
    snap = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            snap[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                snap[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return snap


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "tiny"
    res = run("init-model", "--preset", "tiny", "--out", d, "--seed", "11")
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny model, free to break."""
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    return d


@pytest.fixture
def out(tmp_path):
    """An --out path that does not exist yet, in a parent that must stay empty on failure."""
    parent = tmp_path / "outs"
    parent.mkdir()
    target = parent / "q"
    yield target
    # Checked after every test that used it; the good-path tests remove what they check.


def assert_nothing_written(out_path):
    assert not os.path.exists(out_path), f"{out_path} was created"
    leftovers = os.listdir(os.path.dirname(out_path))
    assert leftovers == [], f"left beside --out: {leftovers}"


def quantize_error(model_dir, out_path, status, *names, extra=()):
    res = run("quantize", "--model", model_dir, "--out", out_path, *extra)
    assert_error(res, "quantize", status, *names)
    assert_nothing_written(out_path)


def safetensors_rewrite(path, edit):
    """Loads model.safetensors, lets `edit` change the dict of tensors, writes it back."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# quantize: bad model directories


def test_missing_model_dir(tmp_path, out):
    quantize_error(tmp_path / "no_such_model", out, 1, tmp_path / "no_such_model", "does not exist")


def test_model_dir_without_config(tmp_path, out):
    d = tmp_path / "empty_model"
    d.mkdir()
    quantize_error(d, out, 1, d / "config.json")


def test_config_not_json(model, out):
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": ')
    quantize_error(model, out, 1, model / "config.json", "JSON")


def test_config_top_level_not_object(model, out):
    (model / "config.json").write_text("[1, 2, 3]\n")
    quantize_error(model, out, 1, model / "config.json")


def test_config_unsupported_architecture(model, out):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    quantize_error(model, out, 1, model / "config.json", "GPT2LMHeadModel", SUPPORTED)


def test_config_missing_key(model, out):
    cfg = json.loads((model / "config.json").read_text())
    del cfg["intermediate_size"]
    (model / "config.json").write_text(json.dumps(cfg))
    quantize_error(model, out, 1, model / "config.json", "'intermediate_size'")


def test_config_heads_not_multiple_of_kv_heads(model, out):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (model / "config.json").write_text(json.dumps(cfg))
    quantize_error(model, out, 1, model / "config.json", "num_key_value_heads 3")


def test_no_weights(model, out):
    os.remove(model / "model.safetensors")
    quantize_error(model, out, 1, model, "model.safetensors")


def test_safetensors_truncated(model, out):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:1000])  # the header alone is longer than this
    quantize_error(model, out, 1, path)


def test_safetensors_truncated_data(model, out):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 4096])  # header intact, the last tensor cut short
    quantize_error(model, out, 1, path)


def test_safetensors_absurd_header_length(model, out):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    quantize_error(model, out, 1, path, "header length")


def test_safetensors_header_not_json(model, out):
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the opening brace of the header
    path.write_bytes(bytes(data))
    quantize_error(model, out, 1, path, "JSON")


def test_tensor_missing(model, out):
    safetensors_rewrite(model / "model.safetensors", lambda t: t.pop(Q_PROJ))
    quantize_error(model, out, 1, model, f"'{Q_PROJ}'", "missing")


def test_tensor_wrong_shape(model, out):
    import torch

    def edit(t):
        t[Q_PROJ] = torch.zeros(256, 255)
    safetensors_rewrite(model / "model.safetensors", edit)
    quantize_error(model, out, 1, f"'{Q_PROJ}'", "[256, 255]", "[256, 256]")


@pytest.mark.parametrize("dtype,name", [("int32", "I32"), ("float64", "F64"),
                                        ("float8_e4m3fn", "F8_E4M3")])
def test_tensor_wrong_dtype(model, out, dtype, name):
    import torch

    def edit(t):
        t[Q_PROJ] = torch.zeros(256, 256, dtype=getattr(torch, dtype))
    safetensors_rewrite(model / "model.safetensors", edit)
    quantize_error(model, out, 1, f"'{Q_PROJ}'", name, "F32, BF16 or F16")


def test_already_quantized(model, tmp_path, out):
    first = tmp_path / "first"
    res = run("quantize", "--model", model, "--out", first)
    assert res.returncode == 0, res.stderr
    quantize_error(first, out, 1, first / "config.json", "already quantized")


# ----------------------------------------------------------------------------------------------
# quantize: bad options. Exit statuses are those of today's main.cpp: values that the option
# parser itself rejects (a non-number where a number goes, a non-boolean) and values that parse
# but are not supported (blocksize, quant type, storage, preset, negative seed) are all usage
# errors (2); errors in the files and directories handed to us are 1.


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_unsupported_blocksize(model, out, blocksize):
    quantize_error(model, out, 2, f"--quantization_blocksize {blocksize} ",
                   extra=("--quantization_blocksize", blocksize))


def test_blocksize_not_a_number(model, out):
    quantize_error(model, out, 2, "'abc'", "--quantization_blocksize",
                   extra=("--quantization_blocksize", "abc"))


def test_unsupported_quant_type(model, out):
    quantize_error(model, out, 2, "'int4'", "nf4 or fp4", extra=("--quantization_type", "int4"))


def test_bad_double_quantization(model, out):
    quantize_error(model, out, 2, "--double_quantization", "'maybe'",
                   extra=("--double_quantization", "maybe"))


def test_bad_quant_storage(model, out):
    quantize_error(model, out, 2, "'int32'", "uint8, bf16, fp16 or fp32",
                   extra=("--quant_storage", "int32"))


def test_missing_model_option(out):
    res = run("quantize", "--out", out)
    assert_error(res, "quantize", 2, "'--model'")
    assert_nothing_written(out)


def test_missing_out_option(model):
    res = run("quantize", "--model", model)
    assert_error(res, "quantize", 2, "'--out'")


def test_unknown_option(model, out):
    quantize_error(model, out, 2, "'--bogus'", extra=("--bogus", "1"))


def test_unknown_command():
    assert_error(run("frobnicate", "--out", "x"), "frobnicate", 2, "'frobnicate'", "quantize",
                 "init-model")


def test_train_without_config_is_a_usage_error():
    assert_error(run("train"), "train", 2, "no configuration", "--help")


def test_no_command_prints_usage():
    res = run()
    assert res.returncode == 2
    assert "usage: qlora_dist <command>" in res.stdout


@pytest.mark.parametrize("kind", ["non-empty dir", "file"])
def test_out_exists_and_is_not_empty(model, tmp_path, kind):
    target = tmp_path / "taken"
    if kind == "file":
        target.write_bytes(b"precious\x00bytes")
    else:
        (target / "sub").mkdir(parents=True)
        (target / "keep.txt").write_bytes(b"keep me\n")
        (target / "sub" / "model.safetensors").write_bytes(b"\x01\x02\x03")
    before = tree_snapshot(tmp_path / "taken") if kind != "file" else target.read_bytes()
    siblings = sorted(os.listdir(tmp_path))
    res = run("quantize", "--model", model, "--out", target)
    assert_error(res, "quantize", 1, target, "not empty")
    after = tree_snapshot(tmp_path / "taken") if kind != "file" else target.read_bytes()
    assert after == before, "the existing --out was changed"
    assert sorted(os.listdir(tmp_path)) == siblings, "something was left beside --out"


# ----------------------------------------------------------------------------------------------
# init-model: bad input


def test_init_model_unknown_preset(out):
    res = run("init-model", "--preset", "huge", "--out", out)
    assert_error(res, "init-model", 2, "'huge'", "tiny, small or 1b")
    assert_nothing_written(out)


def test_init_model_missing_preset(out):
    res = run("init-model", "--out", out)
    assert_error(res, "init-model", 2, "'--preset'")
    assert_nothing_written(out)


def test_init_model_bad_seed(out):
    res = run("init-model", "--preset", "tiny", "--out", out, "--seed", "abc")
    assert_error(res, "init-model", 2, "'abc'", "--seed")
    assert_nothing_written(out)


def test_init_model_negative_seed(out):
    res = run("init-model", "--preset", "tiny", "--out", out, "--seed", "-1")
    assert_error(res, "init-model", 2, "--seed -1", "0 or more")
    assert_nothing_written(out)


def test_inspect_missing_dir(tmp_path):
    res = run("inspect", "--model", str(tmp_path / "nope"))
    assert_error(res, "inspect", 1, str(tmp_path / "nope"), "does not exist")


def test_inspect_plain_model(tiny):
    res = run("inspect", "--model", str(tiny))
    assert res.returncode == 0, res.stderr
    assert "LlamaForCausalLM, 4 layers, hidden 256" in res.stdout
    assert "quantization: none" in res.stdout


def test_init_model_into_non_empty_dir(tiny, tmp_path):
    target = tmp_path / "taken"
    shutil.copytree(tiny, target)
    (target / "notes.txt").write_text("mine\n")
    before = tree_snapshot(target)
    res = run("init-model", "--preset", "tiny", "--out", target, "--seed", "99")
    assert_error(res, "init-model", 1, target, "not empty")
    assert tree_snapshot(target) == before


# ----------------------------------------------------------------------------------------------
# Good paths


def test_init_model_same_seed_same_bytes(tiny, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    assert run("init-model", "--preset", "tiny", "--out", again, "--seed", "11").returncode == 0
    assert run("init-model", "--preset", "tiny", "--out", other, "--seed", "12").returncode == 0
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(tiny / name, again / name, shallow=False), f"{name} differs for seed 11"
    assert filecmp.cmp(tiny / "config.json", other / "config.json", shallow=False)
    assert not filecmp.cmp(tiny / "model.safetensors", other / "model.safetensors", shallow=False)


def assert_quantized_checkpoint(out_path, res):
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "28 linear weights" in res.stdout, res.stdout
    assert sorted(os.listdir(out_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.loads((out_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert cfg["quantization_config"]["load_in_4bit"] is True
    from safetensors import safe_open
    with safe_open(out_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{Q_PROJ}.quant_state.bitsandbytes__nf4" in keys
    assert "model.embed_tokens.weight" in keys


def test_quantize_into_new_nested_path(model, tmp_path):
    (model / "tokenizer.json").write_text("{}\n")  # side files are copied, hidden ones are not
    (model / ".hidden").write_text("x\n")
    target = tmp_path / "a" / "b" / "q"
    res = run("quantize", "--model", model, "--out", target)
    assert_quantized_checkpoint(target, res)
    assert os.listdir(tmp_path / "a" / "b") == ["q"], "temporary directory left behind"


@pytest.mark.parametrize("slash", ["", "/"])
def test_quantize_into_existing_empty_dir(model, tmp_path, slash):
    (model / "tokenizer.json").write_text("{}\n")
    target = tmp_path / "empty"
    target.mkdir()
    res = run("quantize", "--model", model, "--out", str(target) + slash)
    assert_quantized_checkpoint(target, res)
    assert sorted(os.listdir(tmp_path)) == ["empty", "model"], "temporary directory left behind"


def test_quantize_out_with_trailing_slash(model, tmp_path):
    (model / "tokenizer.json").write_text("{}\n")
    res = run("quantize", "--model", model, "--out", str(tmp_path / "new") + "/")
    assert_quantized_checkpoint(tmp_path / "new", res)
    assert sorted(os.listdir(tmp_path)) == ["model", "new"], "temporary directory left behind"


@pytest.mark.parametrize("command,options", [("quantize", QUANTIZE_OPTIONS),
                                             ("init-model", INIT_MODEL_OPTIONS),
                                             ("inspect", {"help", "model"}),
                                             ("export", {"help", "model", "adapter", "out", "dtype"})])
def test_help_lists_every_option(command, options):
    res = run(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    listed = set(re.findall(r"^\s+--(\w+)", res.stdout, re.M))
    assert listed == options, res.stdout
    # The top-level usage names each command and all its options but --help.
    usage = run("--help")
    assert usage.returncode == 0
    assert command in usage.stdout
    for option in options - {"help"}:
        assert f"--{option}" in usage.stdout, f"--{option} missing from qlora_dist --help"


# ----------------------------------------------------------------------------------------------
# export: base + adapter -> merged checkpoint


def write_adapter(d, layers, r=4, in_features=256, out_features=256, b_value=0.0):
    """A PEFT LoRA adapter as peft names it: A [r, in] random, B [out, r] = b_value."""
    import torch
    from safetensors.torch import save_file
    d.mkdir(parents=True)
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
               "target_modules": sorted({l.rsplit(".", 1)[1] for l in layers}), "bias": "none", "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "tiny", "use_rslora": False},
              open(d / "adapter_config.json", "w"))
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in layers:
        p = f"base_model.model.{layer}"
        tensors[p + ".lora_A.weight"] = torch.randn(r, in_features, generator=g)
        tensors[p + ".lora_B.weight"] = torch.full((out_features, r), b_value)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@pytest.fixture(scope="module")
def tiny_q4(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("q4") / "q4"
    res = run("quantize", "--model", tiny, "--out", d)
    assert res.returncode == 0, res.stderr
    return d


def test_export_zero_adapter_gives_the_dequantized_base(tiny, tiny_q4, tmp_path):
    from safetensors.torch import load_file
    adapter = write_adapter(tmp_path / "a", ["model.layers.0.self_attn.q_proj"])
    res = run("export", "--model", tiny_q4, "--adapter", adapter, "--out", tmp_path / "m",
              "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert "1 layers merged" in res.stdout, res.stdout
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    merged = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(os.path.join(tiny_q4, "model.safetensors"))
    assert len(merged) == 39  # 28 linears + 11 other tensors, no quant-state tensors
    # B = 0: the merged q_proj is the dequantized 4-bit weight, close to the fp32 original.
    orig = load_file(os.path.join(tiny, "model.safetensors"))
    w = merged["model.layers.0.self_attn.q_proj.weight"]
    assert (w - orig["model.layers.0.self_attn.q_proj.weight"]).abs().max() < 0.05
    assert merged["model.embed_tokens.weight"].equal(base["model.embed_tokens.weight"])


def test_export_missing_adapter(tiny_q4, tmp_path, out):
    res = run("export", "--model", tiny_q4, "--adapter", tmp_path / "none", "--out", out)
    assert_error(res, "export", 1, str(tmp_path / "none"))
    assert_nothing_written(out)


def test_export_adapter_layer_not_in_model(tiny_q4, tmp_path, out):
    adapter = write_adapter(tmp_path / "a", ["model.layers.9.self_attn.q_proj"])
    res = run("export", "--model", tiny_q4, "--adapter", adapter, "--out", out)
    assert_error(res, "export", 1, "model.layers.9.self_attn.q_proj", "does not exist")
    assert_nothing_written(out)


def test_export_adapter_shape_mismatch(tiny_q4, tmp_path, out):
    adapter = write_adapter(tmp_path / "a", ["model.layers.0.self_attn.k_proj"])  # k_proj is [128, 256]
    res = run("export", "--model", tiny_q4, "--adapter", adapter, "--out", out)
    assert_error(res, "export", 1, "model.layers.0.self_attn.k_proj", "[256, 4]", "[128, 256]")
    assert_nothing_written(out)


def test_export_bad_dtype(tiny_q4, tmp_path, out):
    adapter = write_adapter(tmp_path / "a", ["model.layers.0.self_attn.q_proj"])
    res = run("export", "--model", tiny_q4, "--adapter", adapter, "--out", out, "--dtype", "int8")
    assert_error(res, "export", 2, "--dtype", "'int8'")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------
# quantize --format h5: the HDF5 unit file of the sharded trainer

def test_quantize_unknown_format(model, out):
    quantize_error(model, out, 2, "--format 'gguf'", "safetensors or h5", extra=("--format", "gguf"))


def test_quantize_h5_out_exists(model, tmp_path):
    target = tmp_path / "m.h5"
    target.write_bytes(b"precious")
    res = run("quantize", "--model", model, "--out", target, "--format", "h5")
    assert_error(res, "quantize", 1, target, "exists")
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["m.h5", "model"]


def test_quantize_h5_bad_model_leaves_nothing(model, out):
    safetensors_rewrite(model / "model.safetensors", lambda h: h.pop(Q_PROJ))
    quantize_error(model, out, 1, Q_PROJ, "missing", extra=("--format", "h5"))


def test_quantize_h5_file_is_what_h5py_reads(tiny, tmp_path):
    import h5py
    import numpy as np
    from safetensors.numpy import load_file
    target = tmp_path / "tiny.h5"
    res = run("quantize", "--model", tiny, "--out", target, "--format", "h5",
              "--double_quantization", "false")
    assert res.returncode == 0, res.stderr
    assert "HDF5 units" in res.stdout
    assert sorted(os.listdir(tmp_path)) == ["tiny.h5"], "a temporary file was left"
    weights = load_file(str(tiny / "model.safetensors"))
    with h5py.File(target, "r") as f:
        assert f.attrs["format"] == "qlora_dist.units"
        assert f.attrs["quant_type"] == "nf4" and f.attrs["blocksize"] == 64
        units = json.loads(f.attrs["layout_json"])
        assert [u["name"] for u in units] == ["embed"] + [f"block.{i}" for i in range(4)] + ["head"]
        assert json.loads(f.attrs["config_json"])["hidden_size"] == 256
        for u in units:
            data = f["units/" + u["name"]][()]
            assert data.dtype == np.uint8 and data.size == u["nbytes"]
            for s in u["segments"]:
                assert s["offset"] % 64 == 0
                if s["kind"] == "tensor":  # plain tensors: the safetensors bytes as they are
                    got = data[s["offset"]:s["offset"] + s["nbytes"]].view(np.float32)
                    np.testing.assert_array_equal(got.reshape(s["shape"]),
                                                  weights[s["name"]], err_msg=s["name"])
                elif s["kind"] == "absmax":  # no double quant: fp32 block absmax of the weight
                    w = weights[s["name"][: -len(".absmax")]].reshape(-1, 64)
                    got = data[s["offset"]:s["offset"] + s["nbytes"]].view(np.float32)
                    np.testing.assert_array_equal(got, np.abs(w).max(axis=1), err_msg=s["name"])


def test_readme_lists_every_config_key():
    """The README's configuration reference stays true: every key `train --help` lists is in it
    with the same default."""
    res = run("train", "--help")
    assert res.returncode == 0, res.stderr
    keys = re.findall(r"^  --(\S+) \(default: (.*)\)$", res.stdout, re.M)
    assert len(keys) > 40
    top = run("--help")  # the top-level help lists them too
    assert all(f"--{k} (default: {d})" in top.stdout for k, d in keys)
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                               "README.md")).read()
    for key, default in keys:
        assert f"| `{key}` | `{default}` |" in readme, f"{key} (default {default}) missing from README"


def test_prep_usage_and_file_errors(tmp_path):
    """prep's own command line: --out required, unknown options are usage errors (2); a missing
    configuration file or no data.dataset is an input error (1); nothing is written."""
    assert_error(run("prep"), "prep", 2, "no configuration")
    ini = tmp_path / "c.ini"
    ini.write_text("[model]\nmodel_name_or_path = /m\n[data]\ntrain_file = /t.h5\n"
                   "[output]\noutput_dir = /o\n")
    assert_error(run("prep", ini), "prep", 2, "--out FILE.h5 is required")
    assert_error(run("prep", ini, "--out", tmp_path / "x.h5", "--shuffle", "1"), "prep", 2,
                 "unknown option --shuffle")
    assert_error(run("prep", tmp_path / "missing.ini", "--out", tmp_path / "x.h5"), "prep", 1,
                 "missing.ini", "does not exist")
    assert_error(run("prep", ini, "--out", tmp_path / "x.h5"), "prep", 1,
                 "data.dataset is not set")
    assert_error(run("prep", ini, "--out", tmp_path / "x.h5", "--data.formating=text"), "prep", 1,
                 "data.formating", "data.formatting")
    assert not (tmp_path / "x.h5").exists()
    res = run("prep", "--help")
    assert res.returncode == 0 and "--out FILE.h5" in res.stdout


def smollm2_tokenizer_into(d):
    """SmolLM2's tokenizer files (env QLORA_SMOLLM2_DIR, else .models/smollm2) copied into d."""
    src = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", ".models", "smollm2")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if not os.path.isfile(os.path.join(src, f)):
            pytest.fail(f"{src} has no {f}: run scripts/setup.sh (or set QLORA_SMOLLM2_DIR)")
        shutil.copy(os.path.join(src, f), os.path.join(d, f))


def test_prep_dpo_writes_pair_files_and_refuses_the_other_stages_rows(tmp_path):
    """prep with --train.stage=dpo: preference rows become pair files (train and the val_size
    split), the summary counts pairs; SFT rows for dpo, preference rows for sft and packing with
    dpo are one line each (1) and write nothing."""
    import h5py
    tok = tmp_path / "tok"
    tok.mkdir()
    smollm2_tokenizer_into(tok)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": f"Name {n}.", "chosen": f"It is {n}.", "rejected": "No."}
        for n in ("one", "two", "three", "four")] + [
        {"conversations": [{"from": "human", "value": "Hi"}],
         "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go."}}]))
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    ini = tmp_path / "c.ini"
    ini.write_text(f"[model]\nmodel_name_or_path = {tok}\n[data]\ndataset = {pairs}\n"
                   "template = smollm2\n[output]\noutput_dir = /o\n")
    # Row 5 is sharegpt in a file the first row shows to be alpaca: a bad row, named.
    assert_error(run("prep", ini, "--out", tmp_path / "p.h5", "--train.stage=dpo"), "prep", 1,
                 "pairs.jsonl:5", '"chosen"')
    res = run("prep", ini, "--out", tmp_path / "p.h5", "--train.stage=dpo", "--data.max_samples=4",
              "--data.val_size=0.25")
    assert res.returncode == 0, res.stderr
    assert "train: 3 pairs" in res.stdout and "eval: 1 pairs" in res.stdout, res.stdout
    for name, n in (("p.h5", 3), ("p.eval.h5", 1)):
        with h5py.File(tmp_path / name) as f:
            assert sorted(f.keys()) == ["chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                        "rejected_labels"]
            assert f.attrs["format"] == "qlora_dist.pairs" and f["chosen_labels"].shape[0] == n
            assert f["chosen_input_ids"].dtype == "int32"
    assert_error(run("prep", ini, "--out", tmp_path / "s.h5"), "prep", 1,
                 "pairs.jsonl:1", "a preference row", "set train.stage = dpo")
    assert_error(run("prep", ini, "--out", tmp_path / "s.h5", "--train.stage=dpo",
                     f"--data.dataset={sft}"), "prep", 1,
                 "sft.jsonl:1", "train.stage = dpo needs preference rows")
    assert_error(run("prep", ini, "--out", tmp_path / "s.h5", "--train.stage=dpo",
                     "--data.packing=true"), "prep", 1, "data.packing", "train.stage = dpo")
    assert not (tmp_path / "s.h5").exists()
    assert sorted(os.listdir(tmp_path)) == ["c.ini", "p.eval.h5", "p.h5", "pairs.jsonl", "sft.jsonl", "tok"]


def test_generate_usage_and_file_errors(model, tmp_path):
    """generate's command line: a template or --raw, exactly one of --prompt / --prompts, values
    in range (usage, 2); missing or bad files (1). Then a run that works: the tiny model (vocab
    2048) with SmolLM2's tokenizer on a raw prompt whose ids fit, and its JSON Lines output."""
    assert_error(run("generate", "--model", model, "--prompt", "a"), "generate", 2,
                 "--template NAME is required", "--raw")
    assert_error(run("generate", "--model", model, "--raw"), "generate", 2, "--prompt", "--prompts")
    assert_error(run("generate", "--model", model, "--raw", "--prompt", "a", "--prompts", "f"),
                 "generate", 2, "--prompt TEXT or --prompts FILE.jsonl")
    assert_error(run("generate", "--model", model, "--template", "nope", "--prompt", "a"),
                 "generate", 2, "unknown chat template 'nope'")
    assert_error(run("generate", "--model", model, "--raw", "--prompt", "a", "--top_p", "0"),
                 "generate", 2, "--top_p")
    assert_error(run("generate", "--model", model, "--raw", "--prompt", "a", "--temperature", "-1"),
                 "generate", 2, "--temperature")
    assert_error(run("generate", "--model", model, "--raw", "--prompt", "a", "--colour", "x"),
                 "generate", 2, "colour")
    assert_error(run("generate", "--model", tmp_path / "none", "--raw", "--prompt", "a"),
                 "generate", 1, "none", "does not exist")
    assert_error(run("generate", "--model", model, "--raw", "--prompt", "a"), "generate", 1,
                 "no tokenizer.json")
    smollm2_tokenizer_into(model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert_error(run("generate", "--model", model, "--raw", "--prompts", bad), "generate", 1,
                 "bad.jsonl:2", '"prompt"')
    # chatml's <|im_start|> is id 1, "user" id 4093: outside the tiny model's 2048 ids.
    assert_error(run("generate", "--model", model, "--template", "chatml", "--prompt", "a"),
                 "generate", 1, "token id 4093 ('user')", "vocabulary of 2048")
    res = run("generate", "--model", model, "--raw", "--prompt", "a b", "--max_new_tokens", "3",
              "--print_ids")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["prompt"] == "a b" and row["tokens"] == 3 and len(row["ids"]) == 3
    assert all(0 <= i < 2048 for i in row["ids"])
    assert res.stderr.startswith("generate: 1 prompt(s)") and "decode 2 tokens" in res.stderr
    help_text = run("generate", "--help").stdout
    for option in ("--model", "--adapter", "--template", "--raw", "--prompts", "--max_new_tokens",
                   "--temperature", "--top_p", "--seed", "--system", "--print_ids",
                   "--quantization_type"):
        assert option in help_text, option
    assert "generate" in run("--help").stdout


def test_generate_h5_usage_and_file_errors(tiny, model, tmp_path):
    """generate --model FILE.h5 (quantize --format h5): --tokenizer DIR is required and the
    quantize-on-load options are refused (usage, 2); a missing tokenizer directory, one without
    tokenizer.json and a file that is not HDF5 (1). Then it runs (the reference test compares its
    ids with transformers)."""
    units = tmp_path / "q.h5"
    res = run("quantize", "--model", tiny, "--out", units, "--format", "h5")
    assert res.returncode == 0, res.stderr
    assert_error(run("generate", "--model", units, "--raw", "--prompt", "a"), "generate", 2,
                 "q.h5", "--tokenizer DIR")
    assert_error(run("generate", "--model", units, "--tokenizer", model, "--raw", "--prompt", "a",
                     "--quantization_type", "fp4"), "generate", 2, "--quantization_type", "q.h5")
    assert_error(run("generate", "--model", units, "--tokenizer", tmp_path / "none", "--raw",
                     "--prompt", "a"), "generate", 1, "none", "tokenizer directory does not exist")
    assert_error(run("generate", "--model", units, "--tokenizer", model, "--raw", "--prompt", "a"),
                 "generate", 1, "no tokenizer.json", "--tokenizer")
    smollm2_tokenizer_into(model)
    text = tmp_path / "model.txt"
    text.write_text("not HDF5\n")
    assert_error(run("generate", "--model", text, "--tokenizer", model, "--raw", "--prompt", "a"),
                 "generate", 1, "model.txt", "not an HDF5 file")
    res = run("generate", "--model", units, "--tokenizer", model, "--raw", "--prompt", "a b",
              "--max_new_tokens", "3", "--print_ids")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["tokens"] == 3 and all(0 <= i < 2048 for i in row["ids"])
    assert "--tokenizer" in run("generate", "--help").stdout
