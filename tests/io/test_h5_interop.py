"""H5File and h5py read each other's files.

h5_probe (tests/io/h5_probe.cpp, path in $QLORA_H5_PROBE) writes a known file through H5File,
which h5py must read with the right dtypes, shapes and values, and string attributes as str; and
it reads files h5py wrote (uint8 bytes, int32 and int64 token rows, str and bytes attributes),
rejecting float tokens and int64 values past int32 with one line on stderr.
"""
import json
import os
import subprocess

import h5py
import numpy as np
import pytest

PROBE = os.environ.get("QLORA_H5_PROBE", "")


def probe(*args, ok=True):
    if not os.path.exists(PROBE):
        pytest.fail(f"h5_probe not built (QLORA_H5_PROBE={PROBE!r})")
    res = subprocess.run([PROBE, *map(str, args)], capture_output=True, text=True, timeout=60)
    context = (f"h5_probe {args}: exit {res.returncode}\n"
               f"stdout: {res.stdout!r}\nstderr: {res.stderr!r}")
    if ok:
        assert res.returncode == 0 and res.stderr == "", context
    else:
        assert res.returncode == 1, context
        assert res.stderr.startswith("h5_probe: error: "), context
        assert res.stderr.count("\n") == 1 and res.stderr.endswith("\n"), context
        assert "HDF5-DIAG" not in res.stderr, context
    return res


# What `h5_probe write` writes (kept in step with write_known_file in h5_probe.cpp).
KNOWN_BYTES = ((np.arange(1003) * 31 + 7) % 256).astype(np.uint8)
KNOWN_TOKENS = (np.arange(35, dtype=np.int64) ** 2 - 17).astype(np.int32).reshape(5, 7)
KNOWN_TOKENS[0, 0] = np.iinfo(np.int32).min
KNOWN_TOKENS[-1, -1] = np.iinfo(np.int32).max


def test_h5py_reads_what_h5file_wrote(tmp_path):
    path = tmp_path / "probe.h5"
    probe("write", path)
    with h5py.File(path, "r") as f:
        block = f["units/block.3"]
        assert block.dtype == np.uint8 and block.shape == (1003,)
        np.testing.assert_array_equal(block[...], KNOWN_BYTES)
        np.testing.assert_array_equal(block[500:517], KNOWN_BYTES[500:517])
        tokens = f["data/tokens"]
        assert tokens.dtype == np.int32 and tokens.shape == (5, 7)
        np.testing.assert_array_equal(tokens[...], KNOWN_TOKENS)
        config = f.attrs["config"]
        assert isinstance(config, str), type(config)
        config = json.loads(config)
        assert config["name"] == "h\u00e9llo"
        assert len(config) == 5001 and config["key_4999"] == 4999
        step = f.attrs["step"]
        assert step.dtype == np.int64 and int(step) == 1234567890123
        assert isinstance(block.attrs["kind"], str) and block.attrs["kind"] == "nf4"
        assert int(block.attrs["numel"]) == 2006
    # and H5File reads its own file back through the probe
    tail = probe("bytes", path, "units/block.3", 1000, 3).stdout.strip()
    assert tail == KNOWN_BYTES[1000:].tobytes().hex()


def write_h5py_file(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("units/block.0", data=np.arange(517, dtype=np.int64).astype(np.uint8) * 3)
        f.create_dataset("tokens32", data=np.arange(-20, 13, dtype=np.int32).reshape(3, 11))
        f.create_dataset("tokens64", data=np.arange(4 * 5).reshape(4, 5))  # numpy's default int64
        f.create_dataset("floats", data=np.ones((2, 3), dtype=np.float32))
        f.create_dataset("big64", data=np.array([[1, 2], [3, 2**31]], dtype=np.int64))
        f.attrs["config"] = json.dumps({"a": 1, "s": "x" * 100000})
        f.attrs["fixed"] = np.bytes_(b"fixed-length")
        f.attrs["step"] = 77
        f.attrs["uint"] = np.uint32(4000000000)
        f["units/block.0"].attrs["kind"] = "fp4"


def test_h5file_reads_what_h5py_wrote(tmp_path):
    path = tmp_path / "h5py.h5"
    write_h5py_file(path)
    expected = (np.arange(517, dtype=np.int64).astype(np.uint8) * 3).tobytes()
    assert probe("bytes", path, "units/block.0").stdout.strip() == expected.hex()
    for offset, nbytes in [(0, 1), (1, 7), (256, 255), (516, 1), (517, 0)]:
        got = probe("bytes", path, "units/block.0", offset, nbytes).stdout.strip()
        assert got == expected[offset:offset + nbytes].hex(), (offset, nbytes)
    rows = json.loads(probe("rows", path, "tokens32", 1, 2).stdout)
    assert rows == {"shape": [3, 11], "rows": np.arange(-20, 13).reshape(3, 11)[1:3].tolist()}
    rows = json.loads(probe("rows", path, "tokens64", 3, 1).stdout)
    assert rows == {"shape": [4, 5], "rows": [[15, 16, 17, 18, 19]]}
    config = json.loads(probe("attr-string", path, "/", "config").stdout[:-1])
    assert config == {"a": 1, "s": "x" * 100000}
    assert probe("attr-string", path, "/", "fixed").stdout == "fixed-length\n"
    assert probe("attr-string", path, "units/block.0", "kind").stdout == "fp4\n"
    assert probe("attr-int", path, "/", "step").stdout == "77\n"
    assert probe("attr-int", path, "/", "uint").stdout == "4000000000\n"
    assert probe("has", path, "tokens64").stdout == "true\n"
    assert probe("has", path, "units").stdout == "false\n"


def test_h5file_rejects_bad_h5py_datasets(tmp_path):
    path = tmp_path / "h5py.h5"
    write_h5py_file(path)
    err = probe("rows", path, "floats", 0, 1, ok=False).stderr
    assert str(path) in err and "'floats'" in err and "float32" in err, err
    err = probe("rows", path, "big64", 0, 2, ok=False).stderr
    assert "'big64'" in err and "int32 range" in err, err
    assert json.loads(probe("rows", path, "big64", 0, 1).stdout)["rows"] == [[1, 2]]
    err = probe("bytes", path, "units/block.0", 500, 18, ok=False).stderr
    assert "'units/block.0'" in err and "[500, 518)" in err and "517 bytes" in err, err
    err = probe("bytes", path, "units/block.7", ok=False).stderr
    assert "'units/block.7'" in err and "block.0" in err, err


def test_bad_files_give_one_line(tmp_path):
    missing = tmp_path / "missing.h5"
    assert str(missing) in probe("bytes", missing, "x", ok=False).stderr
    text = tmp_path / "text.h5"
    text.write_text("not hdf5 at all\n")
    assert "not an HDF5 file" in probe("bytes", text, "x", ok=False).stderr
    whole = tmp_path / "whole.h5"
    write_h5py_file(whole)
    cut = tmp_path / "cut.h5"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    err = probe("bytes", cut, "units/block.0", ok=False).stderr
    assert str(cut) in err and "truncated" in err, err
