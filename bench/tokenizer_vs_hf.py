#!/usr/bin/env python3
"""Side by side: encode throughput of our tokenizer (build/tests/reference/tokenize_probe) and of
the `tokenizers` package on one thread (RAYON_NUM_THREADS=1), same tokenizer.json, same ~5 MB
corpus (tests/reference/tokenizer_corpus.py), ids checked equal before the rates are printed.
Issue 13's target is ~100 MB of text per minute per core (1.7 MB/s).

    .venv/bin/python bench/tokenizer_vs_hf.py [TOKENIZER_JSON] [--mb 5]
Default tokenizer: $QLORA_SMOLLM2_DIR or .models/smollm2. Build dir: $QLORA_BUILD_DIR or build.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
from tokenizer_corpus import corpus_texts  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer", nargs="?", default=os.path.join(
        os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(ROOT, ".models", "smollm2"), "tokenizer.json"))
    ap.add_argument("--mb", type=float, default=5.0)
    args = ap.parse_args()
    build = os.environ.get("QLORA_BUILD_DIR") or os.path.join(ROOT, "build")
    probe = os.path.join(build, "tests", "reference", "tokenize_probe")
    texts = corpus_texts(int(args.mb * 1e6))
    nbytes = sum(map(len, texts))

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "in.bin"), "wb") as f:
            for t in texts:
                f.write(struct.pack("<I", len(t)) + t)
        out = subprocess.run([probe, "encode", args.tokenizer, os.path.join(d, "in.bin"),
                              os.path.join(d, "out.bin")], check=True, capture_output=True, text=True)
        ours_s = json.loads(out.stdout)["seconds"]
        data, mine, pos = open(os.path.join(d, "out.bin"), "rb").read(), [], 0
        while pos < len(data):
            (n,) = struct.unpack_from("<I", data, pos)
            mine.append(list(struct.unpack_from(f"<{n}i", data, pos + 4)))
            pos += 4 + 4 * n

    tok = Tokenizer.from_file(args.tokenizer)
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    t0 = time.perf_counter()
    ref = [tok.encode(s).ids for s in strings]
    hf_s = time.perf_counter() - t0
    # The package's fastest path: one batch call, no offsets (encode_batch_fast), same one thread.
    t0 = time.perf_counter()
    fast = [e.ids for e in tok.encode_batch_fast(strings)]
    hf_fast_s = time.perf_counter() - t0
    assert fast == ref
    if mine != ref:
        bad = next(i for i, (a, b) in enumerate(zip(mine, ref)) if a != b)
        sys.exit(f"ids differ from tokenizers at text {bad}: {texts[bad][:80]!r}")
    ntok = sum(map(len, ref))
    print(f"corpus: {len(texts)} texts, {nbytes / 1e6:.2f} MB, {ntok} tokens (ids identical)")
    print(f"ours (tokenize_probe, 1 thread, cold cache): {nbytes / ours_s / 1e6:7.2f} MB/s  "
          f"{ntok / ours_s / 1e6:5.2f} M tokens/s")
    print(f"tokenizers {sys.modules['tokenizers'].__version__} encode() per text (1 thread):  "
          f"{nbytes / hf_s / 1e6:7.2f} MB/s  {ntok / hf_s / 1e6:5.2f} M tokens/s")
    print(f"tokenizers encode_batch_fast (RAYON_NUM_THREADS=1): "
          f"{nbytes / hf_fast_s / 1e6:7.2f} MB/s  {ntok / hf_fast_s / 1e6:5.2f} M tokens/s")
    print("target (issue 13): 1.70 MB/s per core")


if __name__ == "__main__":
    main()
