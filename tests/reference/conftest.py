"""Shared helpers for the reference tests: where the build is, how to run our binaries."""
import os
import subprocess

import pytest

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build")


def binary(name):
    for rel in (name, os.path.join("tests", "reference", name)):
        path = os.path.join(BUILD, rel)
        if os.path.exists(path):
            return path
    pytest.fail(f"{name} not built in {BUILD}")


def run(args, **kw):
    """Runs one of our binaries; a non-zero exit fails the test with its stderr."""
    res = subprocess.run(args, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr}")
    return res
