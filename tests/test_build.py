"""The build: without OpenMP the kernels still compile, run single-threaded, and say so."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import REPO_ROOT, llama2c_model


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_build_without_openmp(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "bench", "*.so", "*.c", "__pycache__", "*.egg-info"))
    env = dict(os.environ, PECCA_NO_OPENMP="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WITHOUT OpenMP" in r.stderr
    code = ("import pecca; from pecca._kernels import runtime; from pecca.threads import resolve_threads;"
            "assert not runtime.openmp_enabled(); assert resolve_threads(4) == 1;"
            f"m = pecca.load({str(llama2c_model())!r}, threads=2);"
            "assert m.threads == 1 and m.info()['openmp'] is False;"
            "print(m.generate('Once upon a time', max_tokens=20, temperature=0))")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(src)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(", there was a little girl named Lily.")
    r = subprocess.run([sys.executable, "-m", "pecca", "info", str(llama2c_model())], cwd=src,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(src)))
    assert "built without OpenMP" in r.stdout
