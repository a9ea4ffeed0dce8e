"""The include-order check on the real tree, and proof that it fails on an upward include."""
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = pathlib.Path(os.environ.get("QLORA_SOURCE_DIR", HERE.parents[1]))
CHECK = HERE / "check_includes.py"


def run_check(root):
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True)


def test_tree_keeps_the_order():
    r = run_check(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def copy_sources(tmp_path):
    for d in ("src", "kernels"):
        shutil.copytree(ROOT / d, tmp_path / d)
    return tmp_path


def test_upward_include_fails_naming_file_and_line(tmp_path):
    root = copy_sources(tmp_path)
    adamw = root / "src" / "dist" / "adamw.cpp"
    lines = adamw.read_text().splitlines()
    lines.insert(3, '#include "train/trainer.h"')  # dist may not use train
    adamw.write_text("\n".join(lines) + "\n")
    r = run_check(root)
    assert r.returncode == 1, r.stdout
    assert 'src/dist/adamw.cpp:4: includes "train/trainer.h" (train/)' in r.stdout, r.stdout


def test_sideways_and_flat_includes(tmp_path):
    root = copy_sources(tmp_path)
    # data/ may not use model/ (a sibling, not below it), kernels/ may not use io/.
    (root / "src" / "data" / "x.cpp").write_text('#include "model/decoder.h"\n')
    (root / "kernels" / "y.cpp").write_text('#include <vector>\n#include "io/safetensors.h"\n')
    # A flat kernels header from quant/ is allowed; the same from io/ is not.
    (root / "src" / "quant" / "z.cpp").write_text('#include "quant4_format.h"\n')
    (root / "src" / "io" / "w.cpp").write_text('#include "quant4_format.h"\n')
    r = run_check(root)
    assert r.returncode == 1
    out = r.stdout
    assert "src/data/x.cpp:1:" in out and "kernels/y.cpp:2:" in out and "src/io/w.cpp:1:" in out, out
    assert "src/quant/z.cpp" not in out, out
