"""N ranks train like one: the sharded trainer under real mpirun at world sizes 1-4.

train_probe (tests/dist/train_probe.cpp) trains the LoRA (rank 8, all seven linears) of the tiny
preset (LLaMA, 4 layers, hidden 256, NF4 with double quantization, fp32 compute) on a synthetic
copy task with a global batch of 12 rows x 32 tokens for 20 AdamW steps (lr 2e-3, clip 1.0).
The global batch of each step is the same whatever the world size (tests/dist/test_unit_layout
checks the sampler), so every configuration must reproduce the single-rank, unsharded run.

Tolerances (float32 compute; the world size changes the matmul row counts and the order of
gradient sums, so results differ in the last bits):
  - per-step loss: relative 1e-6 (observed <= 7e-8);
  - final adapter: max |difference| <= 0.1 x lr = 2e-4. AdamW normalizes each gradient element by
    its running RMS, so an element whose gradient sits at rounding level can move by a different
    fraction of lr per step; observed max 4.7e-5 with weights up to ~0.1.
Communication and load accounting: the bytes each rank read at load and gathered / reduced per
step (counted at the communicator) must equal the formulas in src/train/trainer.h (gathered /
reduced) and src/dist/unit_layout.h (bytes read per rank: its owned ranges) to the byte, and the
trainer's own count of gathered bytes must equal the communicator's.
"""
import json
import os
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")
PROBE = os.environ.get("TRAIN_PROBE") or os.path.join(BUILD, "tests", "dist", "train_probe")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMP_NUM_THREADS="1")
STEPS = 20
LR = 2e-3
LOSS_RTOL = 1e-6
ADAPTER_ATOL = 0.1 * LR


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    subprocess.run([QLORA, "init-model", "--preset", "tiny", "--out", d / "tiny"], check=True,
                   capture_output=True)
    subprocess.run([QLORA, "quantize", "--model", d / "tiny", "--out", d / "tiny.h5", "--format",
                    "h5"], check=True, capture_output=True)
    # The same settings (nf4, blocksize 64, double quantization) as a bitsandbytes checkpoint.
    subprocess.run([QLORA, "quantize", "--model", d / "tiny", "--out", d / "tinybnb"], check=True,
                   capture_output=True)
    return d


def probe(np_, out, *args, timeout=300):
    os.makedirs(out, exist_ok=True)
    cmd = [MPIRUN, "--oversubscribe", "-np", str(np_), PROBE, "--out", str(out),
           "--steps", str(STEPS), "--lr", str(LR), *map(str, args)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    res.seconds = time.monotonic() - t0
    return res


def results(out, np_):
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(np_)]
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    return ranks, adapter


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = probe(1, out, "--model", models / "tiny.h5", "--sharding", "none", "--prefetch", "0")
    assert res.returncode == 0, res.stderr
    return results(out, 1)


CONFIGS = [(n, s, p) for n in (1, 2, 3, 4) for s in ("full", "none") for p in (0, 1)]


@pytest.mark.parametrize("np_,sharding,prefetch", CONFIGS)
def test_world_sizes_train_alike(models, reference, tmp_path, np_, sharding, prefetch):
    res = probe(np_, tmp_path, "--model", models / "tiny.h5", "--sharding", sharding,
                "--prefetch", prefetch)
    assert res.returncode == 0, res.stderr
    ranks, adapter = results(tmp_path, np_)
    (ref,), ref_adapter = reference
    where = f"np {np_} sharding {sharding} prefetch {prefetch}"
    # The loss falls on the copy task, and every rank reports the same global loss.
    assert ref["loss"][-1] < ref["loss"][0] - 0.1, ref["loss"]
    for r in ranks:
        assert r["loss"] == ranks[0]["loss"], where
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=LOSS_RTOL, atol=0, err_msg=where)
        np.testing.assert_allclose(r["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=where)
        assert r["num_targets"] == ref["num_targets"], where
    assert sorted(adapter) == sorted(ref_adapter)
    worst = max(float(np.abs(adapter[k] - ref_adapter[k]).max()) for k in ref_adapter)
    assert worst <= ADAPTER_ATOL, f"{where}: adapter differs by {worst}"

    sharded = sharding == "full" and np_ > 1
    for r in ranks:
        ctx = f"{where} rank {r['rank']}"
        # Bytes read at load: this rank's owned byte ranges (the formula of unit_layout.h).
        assert r["load_bytes_read"] == r["expected_load_bytes"], ctx
        if sharding == "full":
            # ~ total / N: the owned ranges differ from an exact 1/N only by the padding.
            assert r["load_bytes_read"] <= r["base_total_bytes"] / np_ + 64 * np_ * 8, ctx
        # Bytes communicated per step, counted at the communicator, against the formula.
        for got, want in ((r["comm_bytes_gathered"], r["expected_bytes_gathered"]),
                          (r["comm_bytes_reduced"], r["expected_bytes_reduced"])):
            assert all(g == want for g in got), f"{ctx}: {got[:3]} vs {want}"
        assert r["trainer_bytes_gathered"] == r["comm_bytes_gathered"], ctx
        # Base-weight memory: shards at rest + at most 1 + prefetch gathered units.
        assert r["resident_bytes"] <= r["base_total_bytes"] / (np_ if sharding == "full" else 1) + 64 * 8, ctx
        if sharded:
            assert r["peak_gathered_bytes"] <= (1 + prefetch) * r["base_max_unit_bytes"], ctx
            assert r["peak_gathered_bytes"] >= r["base_max_unit_bytes"], ctx
        print(f"{ctx}: resident {r['resident_bytes']} B, peak gathered "
              f"{r['peak_gathered_bytes']} B, max RSS {r['max_rss_bytes'] / 2**20:.1f} MiB, "
              f"wait share {sum(r['comm_wait_seconds']) / sum(r['seconds']):.3f}")


@pytest.mark.parametrize("source", ["tiny", "tinybnb"])
def test_hf_directory_source_equals_h5(models, tmp_path, source):
    """Each rank quantizing its part from the safetensors (tiny), or reading it from a
    bitsandbytes 4-bit checkpoint of the same settings (tinybnb), gives the bytes the h5 file
    holds: the same losses and adapter, bit for bit."""
    a, b = tmp_path / "h5", tmp_path / "hf"
    for out, model in ((a, models / "tiny.h5"), (b, models / source)):
        res = probe(2, out, "--model", model, "--steps", 3)
        assert res.returncode == 0, res.stderr
    (ra, _), ad_a = results(a, 2)
    (rb, _), ad_b = results(b, 2)
    assert ra["loss"] == rb["loss"]
    for k in ad_a:
        np.testing.assert_array_equal(ad_a[k], ad_b[k])


def transformers_model(arch, out):
    """A small random Qwen3 or Gemma 3 text model made and saved by transformers (fp32), with
    random norm weights: the families whose blocks carry q/k norms (and, for Gemma, four norms
    and local / global layers) in their units."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config
    torch.manual_seed(5)
    if arch == "qwen3":
        cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=136,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24, initializer_range=0.05, use_sliding_window=True,
                          sliding_window=8, max_window_layers=1)
    else:
        cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=136,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=24, query_pre_attn_scalar=24, initializer_range=0.05,
                               sliding_window=8, sliding_window_pattern=2)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for n, p in m.named_parameters():
        if n.endswith("norm.weight"):
            torch.nn.init.normal_(p, mean=0.0 if arch == "gemma3" else 1.0, std=0.1)
    m.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_architectures_train_alike(tmp_path, arch):
    """Qwen3 and Gemma 3 (sliding layers with a window of 8 < the 32 tokens of a row) train
    alike on one rank unsharded and on three ranks sharded with prefetch: the same per-step
    losses and adapter within the tolerances above."""
    model = transformers_model(arch, tmp_path / arch)
    ref_out, out = tmp_path / "ref", tmp_path / "np3"
    res = probe(1, ref_out, "--model", model, "--sharding", "none", "--prefetch", 0)
    assert res.returncode == 0, res.stderr
    res = probe(3, out, "--model", model, "--sharding", "full", "--prefetch", 1)
    assert res.returncode == 0, res.stderr
    (ref,), ref_adapter = results(ref_out, 1)
    ranks, adapter = results(out, 3)
    for r in ranks:
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=LOSS_RTOL, atol=0, err_msg=arch)
    assert sorted(adapter) == sorted(ref_adapter)
    worst = max(float(np.abs(adapter[k] - ref_adapter[k]).max()) for k in ref_adapter)
    assert worst <= ADAPTER_ATOL, f"{arch}: adapter differs by {worst}"
    # Training moved the adapter far beyond that bound (lora_B starts at zero).
    moved = max(float(np.abs(v).max()) for k, v in ref_adapter.items() if "lora_B" in k)
    assert moved > 20 * ADAPTER_ATOL, f"{arch}: lora_B reached only {moved}"
    print(f"\n{arch}: loss {ref['loss'][0]:.4f} -> {ref['loss'][-1]:.4f}, max |lora_B| "
          f"{moved:.3g}, np 3 adapter max diff {worst:.3g}")


def assert_job_failed(res, *parts, within=30.0):
    ctx = f"exit {res.returncode} after {res.seconds:.1f} s\nstderr: {res.stderr[-3000:]}"
    assert res.returncode != 0, ctx
    assert res.seconds < within, ctx
    for p in parts:
        assert p in res.stderr, f"expected {p!r}\n{ctx}"


def test_exception_mid_step_ends_the_job(models, tmp_path):
    res = probe(3, tmp_path, "--model", models / "tiny.h5", "--fail-rank", 1, "--fail-at-step", 2,
                timeout=120)
    assert_job_failed(res, "[rank 1] train_probe: error: injected failure in step 2")
    assert not os.path.exists(tmp_path / "adapter")


def test_bad_file_on_one_rank_ends_the_job(models, tmp_path):
    bad = tmp_path / "truncated.h5"
    data = open(models / "tiny.h5", "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    res = probe(3, tmp_path / "out", "--model", models / "tiny.h5", "--fail-rank", 2,
                "--fail-model", bad, timeout=120)
    assert_job_failed(res, "[rank 2] train_probe: error:", str(bad))


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True},
     "only 4-bit quantized models can be sharded"),
    ({"quant_method": "gptq", "bits": 4}, "incompatible with ZeRO-3/FSDP sharding"),
    ({"quant_method": "awq", "bits": 4}, "incompatible with ZeRO-3/FSDP sharding"),
    ({"quant_method": "aqlm"}, "incompatible with ZeRO-3/FSDP sharding"),
    ({"quant_method": "hqq"}, "HQQ-quantized models are incompatible"),
    ({"quant_method": "eetq"}, "EETQ-quantized models are incompatible"),
])
def test_sharding_guards(models, tmp_path, config, message):
    """A model the sharded trainer cannot take fails on every rank before any heavy work."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = json.load(open(models / "tiny" / "config.json"))
    cfg["quantization_config"] = config
    json.dump(cfg, open(d / "config.json", "w"))
    os.symlink(models / "tiny" / "model.safetensors", d / "model.safetensors")
    res = probe(2, tmp_path / "out", "--model", d, timeout=120)
    assert_job_failed(res, message, str(d / "config.json"))
