"""Failure injection: a crash or a full disk loses nothing written before it, and a damaged
checkpoint is never resumed. Real mpirun jobs (2 ranks) on the tiny model, real HDF5, real tmpfs.

- kill -9 of the whole job (mpirun and every rank) at 20 random moments during checkpoint writes
  (save_steps = 1, save_total_limit = 3, so saves and removals are most of the run): the kill waits
  for a save to start (its .checkpoint-<step>.tmp appears), then a random part of a measured
  save's duration. After each kill every checkpoint-<step> directory is complete (the sizes
  trainer_state.json records, the adapter and every optimizer shard readable), the metrics lines
  written equal the uninterrupted run's, and the next run resumes from the newest one; one
  run resumed 20 times ends with losses, gradient norms and adapter bit for bit equal to a run
  that was never killed.
- a full disk (a small tmpfs; skipped with the reason when mounting is not permitted) during
  checkpoints of train, during quantize (h5 and safetensors), prep and export: one line naming
  the path and the cause, exit status 1, nothing half-written left, and what was there before
  untouched (the earlier checkpoints resume bit for bit on a disk with room).
- damaged checkpoints (a truncated optimizer shard, an adapter with a transposed tensor, an
  edited trainer_state.json): resume_from_checkpoint = <path> refuses each naming the file;
  auto passes over it with one line and resumes the previous complete checkpoint bit for bit;
  none usable is refused.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import MPI_ENV, MPIRUN, QLORA, ROOT, job_kill, make_tiny_job, metrics  # noqa: E402

ENV = MPI_ENV
NP = 2
KILLS = 20
STEPS = 40  # the kill chain advanced 10-12 steps in 20 runs here; the last run finishes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("failures")
    (d / "job.ini").write_text(make_tiny_job(QLORA, d, train_rows=64) + f"""[train]
per_device_train_batch_size = 2
learning_rate = 3e-3
lr_scheduler_type = cosine
warmup_steps = 2
max_steps = {STEPS}
seed = 11
[output]
logging_steps = 1
save_steps = 1
save_total_limit = 3
""")
    return d


def train_cmd(data, out, *extra):
    return [MPIRUN, "--oversubscribe", "-np", str(NP), QLORA, "train", str(data / "job.ini"),
            f"--output.output_dir={out}", *map(str, extra)]


def train(data, out, *extra, timeout=300):
    return subprocess.run(train_cmd(data, out, *extra), capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def hidden(out):
    return sorted(n for n in os.listdir(out) if n.startswith(".checkpoint-"))


def checkpoint_steps(out):
    return sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))


def assert_complete(ckpt):
    """A checkpoint as a reader finds it: trainer_state.json names its step and the size of every
    other file, the adapter loads, every optimizer shard opens and reads."""
    st = json.load(open(ckpt / "trainer_state.json"))
    assert st["step"] == int(ckpt.name.split("-")[1]), ckpt
    assert sorted(st["files"]) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "config.ini"] +
        [f"optimizer/rank{q}.h5" for q in range(st["world_size"])]), st["files"]
    for rel, n in st["files"].items():
        assert (ckpt / rel).stat().st_size == n, (ckpt, rel)
    assert load_file(str(ckpt / "adapter_model.safetensors"))
    for q in range(st["world_size"]):
        with h5py.File(ckpt / "optimizer" / f"rank{q}.h5", "r") as f:
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)


def complete_lines(out):
    """metrics.jsonl lines that end in a newline (a kill may cut the last one)."""
    p = out / "metrics.jsonl"
    if not p.exists():
        return []
    text = p.read_text()
    return [json.loads(l) for l in text[:text.rfind("\n") + 1].splitlines() if l]


def assert_same_steps(got, want, steps, keys=("loss", "grad_norm", "learning_rate")):
    got = {m["step"]: m for m in got if "loss" in m}
    want = {m["step"]: m for m in want if "loss" in m}
    for step in steps:
        for k in keys:
            assert got[step][k] == want[step][k], (step, k, got[step][k], want[step][k])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run, watched: how long each save's temporary directory lives."""
    out = tmp_path_factory.mktemp("ref") / "o"
    proc = subprocess.Popen(train_cmd(data, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first, last, t0 = {}, {}, time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        if out.exists():
            for n in hidden(out):
                first.setdefault(n, now)
                last[n] = now
        assert now - t0 < 300
        time.sleep(0.0005)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout
    lifetimes = [last[n] - first[n] for n in first if n.endswith(".tmp")]
    assert len(lifetimes) > STEPS // 2, f"only {len(lifetimes)} saves seen"
    return out, float(np.median(lifetimes))


def test_kill_9_during_checkpoint_writes_resumes_bit_for_bit(data, reference, tmp_path):
    ref, save_s = reference
    want = complete_lines(ref)
    rng = np.random.default_rng(12)
    out = tmp_path / "o"
    inside, resumed_from = 0, []
    t_start = time.monotonic()
    for trial in range(KILLS):
        newest = checkpoint_steps(out)[-1] if out.exists() and checkpoint_steps(out) else 0
        log = open(tmp_path / f"run{trial}.log", "w+")
        proc = subprocess.Popen(train_cmd(data, out), env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            # The m-th save of this run to start, then a random part of a save's duration (and
            # now and then a little past it, into the next step).
            # What the last kill left is tidied away at the start: not a save of this run.
            m, seen, t0 = int(rng.integers(1, 3)), set(), time.monotonic()
            stale = set(hidden(out)) if out.exists() else set()
            while len(seen) < m:
                assert proc.poll() is None, f"trial {trial}: the run ended before its save {m}"
                assert time.monotonic() - t0 < 120, f"trial {trial}: no save"
                if out.exists():
                    now = {n for n in hidden(out) if n.endswith(".tmp")}
                    stale &= now
                    seen |= now - stale
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 1.3 * save_s))
            job_kill(proc)
        finally:
            if proc.poll() is None:
                job_kill(proc)
        log.seek(0)
        text = log.read()
        if newest:
            assert f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in text, text
            resumed_from.append(newest)
        else:
            assert "resumed from" not in text, text
        left = hidden(out)
        inside += bool(left)
        # Every checkpoint directory is complete; what the kill cut is hidden (.tmp/.removing).
        assert all(n.endswith((".tmp", ".removing", ".replaced")) for n in left), left
        for step in checkpoint_steps(out):
            assert_complete(out / f"checkpoint-{step}")
        lines = complete_lines(out)
        assert_same_steps(lines, want, [m["step"] for m in lines if "loss" in m])
    print(f"\n{KILLS} kills: {inside} left a save half-done (hidden .checkpoint-* entries); "
          f"resumed from steps {resumed_from}; {time.monotonic() - t_start:.1f} s")
    assert inside >= KILLS // 4, f"only {inside} of {KILLS} kills landed inside a save"
    newest = checkpoint_steps(out)[-1]
    res = train(data, out)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in res.stdout
    assert hidden(out) == []
    got = complete_lines(out)
    assert [m["step"] for m in got if "loss" in m] == list(range(1, STEPS + 1))
    assert_same_steps(got, want, range(1, STEPS + 1))
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in b)


# ---- full disk ----

@contextlib.contextmanager
def small_disk(path, nbytes):
    """A tmpfs of nbytes at path (root and mount permission needed; else the test is skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"a full disk needs a small file system: cannot mount a tmpfs at {path} "
                    f"({res.stderr.strip() or 'mount failed'}; run as root with mount permission)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def error_lines(stderr):
    return [l for l in stderr.splitlines() if "error" in l]


def assert_one_full_disk_line(res, command, where):
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"qlora_dist {command}: error: "), lines
    # The path written: the output itself or its hidden temporary sibling (.<name>.tmp-<pid>).
    assert str(where.parent) in lines[0] and where.name in lines[0], lines
    assert "No space left on device" in lines[0], lines


def dir_size(d):
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(data, reference, tmp_path):
    ref, _ = reference
    per_checkpoint = dir_size(ref / f"checkpoint-{checkpoint_steps(ref)[0]}")
    mnt = tmp_path / "disk"
    # Room for the configuration, some metrics lines and two and a half checkpoints.
    with small_disk(mnt, 64 * 1024 + int(2.5 * per_checkpoint)):
        out = mnt / "o"
        res = train(data, out, "--output.save_total_limit=0")
        assert_one_full_disk_line(res, "train", out)
        print("\n" + error_lines(res.stderr)[0])
        assert hidden(out) == [], hidden(out)
        steps = checkpoint_steps(out)
        assert steps and steps == list(range(1, len(steps) + 1)), steps
        for s in steps:
            assert_complete(out / f"checkpoint-{s}")
        kept = tmp_path / "o"
        shutil.copytree(out, kept, symlinks=True)
    assert_same_steps(complete_lines(kept), complete_lines(ref), steps)
    res = train(data, kept)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {kept / f'checkpoint-{steps[-1]}'} at step {steps[-1]}" in res.stdout
    assert_same_steps(complete_lines(kept), complete_lines(ref), range(1, STEPS + 1))


def test_full_disk_during_quantize_prep_and_export(data, reference, tmp_path):
    ref, _ = reference
    mnt = tmp_path / "disk"
    earlier = os.urandom(48 * 1024)
    with small_disk(mnt, 256 * 1024):
        (mnt / "earlier.bin").write_bytes(earlier)
        cases = [
            ("quantize", ["--model", data / "tiny", "--out", mnt / "q.h5", "--format", "h5"],
             mnt / "q.h5"),
            ("quantize", ["--model", data / "tiny", "--out", mnt / "q"], mnt / "q"),
            ("export", ["--model", data / "tiny", "--adapter", ref, "--out", mnt / "merged",
                        "--dtype", "fp32"], mnt / "merged"),
        ]
        tok = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(ROOT, ".models", "smollm2")
        if os.path.exists(os.path.join(tok, "tokenizer.json")):
            rows = tmp_path / "rows.jsonl"
            rng = np.random.default_rng(4)
            words = ["ls", "copy", "file", "the", "directory", "list", "prints", "man", "page"]
            rows.write_text("".join(json.dumps(
                {"instruction": " ".join(rng.choice(words, 40)),
                 "output": " ".join(rng.choice(words, 200))}) + "\n" for _ in range(300)))
            ini = tmp_path / "prep.ini"
            ini.write_text(f"[model]\nmodel_name_or_path = {tok}\n[data]\ndataset = {rows}\n"
                           "template = smollm2\ncutoff_len = 256\n[output]\noutput_dir = /o\n")
            cases.append(("prep", [ini, "--out", mnt / "rows.h5"], mnt / "rows.h5"))
        for command, args, where in cases:
            res = subprocess.run([QLORA, command, *map(str, args)], capture_output=True,
                                 text=True, env=ENV, timeout=300)
            assert_one_full_disk_line(res, command, where)
            print("\n" + res.stderr.strip())
            assert sorted(os.listdir(mnt)) == ["earlier.bin"], (command, os.listdir(mnt))
            assert (mnt / "earlier.bin").read_bytes() == earlier
        assert len(cases) == 4, "prep not tested: no SmolLM2 tokenizer (scripts/setup.sh)"


# ---- damaged checkpoints ----

@pytest.fixture(scope="module")
def two_checkpoints(data, reference, tmp_path_factory):
    """A run stopped after checkpoint-4 of a 6-step run (checkpoint-2 before it)."""
    ref, _ = reference
    out = tmp_path_factory.mktemp("two") / "o"
    res = train(data, out, "--train.max_steps=6", "--output.save_steps=2")
    assert res.returncode == 0, res.stderr
    shutil.rmtree(out / "checkpoint-6")
    for f in ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / f).unlink()
    want = complete_lines(out)
    return out, want


def truncate_shard(ckpt):
    p = ckpt / "optimizer" / "rank1.h5"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    return p


def transpose_a_tensor(ckpt):
    p = ckpt / "adapter_model.safetensors"
    t = load_file(str(p))
    k = sorted(k for k in t if "lora_A" in k)[0]
    t[k] = np.ascontiguousarray(t[k].T)  # same bytes, wrong shape
    save_file(t, str(p), metadata={"format": "pt"})
    return p


def edit_state(ckpt):
    p = ckpt / "trainer_state.json"
    st = json.load(open(p))
    st["step"] = 5
    p.write_text(json.dumps(st, indent=2) + "\n")
    return p


@pytest.mark.parametrize("damage", [truncate_shard, transpose_a_tensor, edit_state])
def test_damaged_checkpoint_refused_or_passed_over(data, two_checkpoints, tmp_path, damage):
    src, want = two_checkpoints
    out = tmp_path / "o"
    shutil.copytree(src, out)
    bad = damage(out / "checkpoint-4")
    # An explicit path: refused on every rank before training, naming the file.
    res = train(data, out, "--train.max_steps=6", "--output.save_steps=2",
                f"--output.resume_from_checkpoint={out / 'checkpoint-4'}")
    assert res.returncode == 1, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and str(bad) in lines[0], res.stderr
    print("\n" + lines[0])
    assert "resumed from" not in res.stdout and checkpoint_steps(out) == [2, 4]
    # auto: passed over with one line, checkpoint-2 resumed, the run ends like the original one.
    res = train(data, out, "--train.max_steps=6", "--output.save_steps=2")
    assert res.returncode == 0, res.stderr
    warnings = [l for l in res.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 1 and str(bad) in warnings[0], res.stderr
    assert "checkpoint-4 is not usable" in warnings[0]
    print(warnings[0])
    assert "resuming from the previous complete checkpoint, checkpoint-2" in warnings[0]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in res.stdout
    assert_same_steps(complete_lines(out), want, range(1, 7))
    assert_complete(out / "checkpoint-4")  # saved again over the damaged one
    assert hidden(out) == []


def test_no_usable_checkpoint_is_refused(data, two_checkpoints, tmp_path):
    src, _ = two_checkpoints
    out = tmp_path / "o"
    shutil.copytree(src, out)
    truncate_shard(out / "checkpoint-4")
    bad = edit_state(out / "checkpoint-2")
    res = train(data, out, "--train.max_steps=6", "--output.save_steps=2")
    assert res.returncode == 1, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "holds no usable checkpoint" in lines[0], res.stderr
    print("\n" + lines[0])
    assert str(bad) in lines[0] and "rank1.h5" in lines[0], lines
    assert checkpoint_steps(out) == [2, 4]
