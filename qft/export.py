"""Export and load packed checkpoints.

``save`` packs every quantized module (in place), writes ``model.safetensors`` + ``config.json``
(with ``quantization_config``) + tokenizer into a temporary directory beside the target, then
renames it into place: an interrupted export never leaves a half-written checkpoint under the
final name. ``load`` rebuilds the model skeleton from config.json without initializing weights,
swaps in packed modules and loads the tensors, checking every name and shape.

config.json carries two blocks: ``quantization_config`` (what transformers / vLLM read; for
``pack-quantized`` it is a compressed-tensors config) and ``qft`` (format version, the QuantSpec,
and every quantized module's settings) which ``qft.load`` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from qft import kernels
from qft.formats import MODULE_TYPES, from_pack_quantized, pack_quantized_config, to_pack_quantized
from qft.nn.qlinear import QuantLinear
from qft.nn.swap import set_module
from qft.spec import FORMATS, QuantSpec

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or inconsistent; the message names the file."""


# --- save --------------------------------------------------------------------------------------

def _quantized_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) or type(m).__name__ in {c.__name__ for c in MODULE_TYPES.values()}:
            yield name, m


def _module_entry(m) -> dict:
    if isinstance(m, QuantLinear):
        return {"type": "QuantLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bits": m.bits, "group_size": m.group_size, "scheme": m.scheme, "symmetric": m.symmetric,
                "bias": m.bias is not None, "spec": m.spec.to_dict()}
    return {"type": m.qft_type, **m.export_config()}


def state_for_export(model: nn.Module, fmt: str) -> tuple[dict, dict]:
    """(tensors, modules) for ``fmt``; packs quantized modules in place."""
    modules, sd = {}, {}
    qnames = {}
    for name, m in _quantized_modules(model):
        qnames[name] = m
    for name, m in qnames.items():
        if isinstance(m, QuantLinear):
            m.pack()
            if fmt == "pack-quantized":
                if m.scheme != "int":
                    raise ValueError(f"format 'pack-quantized' holds integer schemes only; layer '{name}' uses "
                                     f"scheme={m.scheme!r}: export with format='qft'")
                t = to_pack_quantized(m.qweight, m.scales, m.zeros, m.bits, m.symmetric, m.in_features)
            elif fmt == "gptq":
                if m.scheme != "int":
                    raise ValueError(f"format 'gptq' holds integer schemes only; layer '{name}' uses {m.scheme!r}")
                from qft.formats.gptq import to_gptq_v1
                t = to_gptq_v1(m.qweight, m.scales, m.zeros, m.bits, m.group_size, m.in_features,
                               getattr(m, "g_idx", None))
            else:
                t = {"qweight": m.qweight, "scales": m.scales, "zeros": m.zeros}
            if m.bias is not None:
                t["bias"] = m.bias.data
        else:
            if fmt != "qft":
                raise ValueError(f"layer '{name}' ({m.qft_type}) can only be exported with format='qft'")
            t = m.export_tensors()
        modules[name] = _module_entry(m)
        for k, v in t.items():
            sd[f"{name}.{k}"] = v
    skip = tuple(f"{n}." for n in qnames)
    for k, v in model.state_dict().items():
        if not k.startswith(skip):
            sd[k] = v
    # tied embeddings: keep one copy
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in sd and "lm_head" not in qnames:
        sd.pop("lm_head.weight")
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    return sd, modules


def _atomic_dir(path: Path, overwrite: bool):
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export path {str(path)!r} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory {str(path)!r} exists and is not empty; "
                              f"pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, format: str | None = None,
         overwrite: bool = False, report: dict | None = None) -> Path:
    """Pack and write ``model`` to ``path`` atomically. Returns the final path."""
    from safetensors.torch import save_file
    spec: QuantSpec | None = getattr(model, "qft_spec", None)
    fmt = format or (spec.format if spec else "qft")
    if format is None and fmt != "qft" and not _fits_format(model, fmt):
        import warnings
        warnings.warn(f"the model holds layers that format {fmt!r} cannot store (non-integer schemes or custom "
                      f"module types); exporting in the native 'qft' format instead", stacklevel=2)
        fmt = "qft"
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not valid; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    tmp = _atomic_dir(path, overwrite)
    sd, modules = state_for_export(model, fmt)
    if not modules:
        raise ValueError("the model has no quantized modules: quantize it first (qft.quantize_model / qft ptq)")
    try:
        tmp.mkdir()
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "qft_format": fmt})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        qblock = {"version": FORMAT_VERSION, "format": fmt, "spec": spec.to_dict() if spec else None,
                  "modules": modules}
        if fmt == "pack-quantized":
            linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                            and not isinstance(m, QuantLinear) and n not in modules]
            cfg["quantization_config"] = pack_quantized_config(spec or _spec_of(modules), linear_names)
        elif fmt == "gptq":
            s = spec or _spec_of(modules)
            cfg["quantization_config"] = {"quant_method": "gptq", "bits": s.bits, "group_size": s.group_size or -1,
                                          "desc_act": False, "sym": s.symmetric, "checkpoint_format": "gptq"}
        else:
            cfg["quantization_config"] = {"quant_method": "qft", "format": "qft", "version": FORMAT_VERSION,
                                          "modules": modules}
        cfg["qft"] = qblock
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # generation config is optional
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report:
            (tmp / "qft_report.json").write_text(json.dumps(report, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fits_format(model: nn.Module, fmt: str) -> bool:
    """True if every quantized module can be written in ``fmt`` (pack-quantized / gptq: int QuantLinear)."""
    return all(isinstance(m, QuantLinear) and m.scheme == "int" for _, m in _quantized_modules(model))


def _spec_of(modules: dict) -> QuantSpec:
    first = next(v for v in modules.values() if v["type"] == "QuantLinear")
    return QuantSpec.from_dict(first["spec"])


# --- load --------------------------------------------------------------------------------------

def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{f} not found: {str(path)!r} is not a model checkpoint")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON (corrupted or truncated): {e}") from None
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{f} has no 'quantization_config': not a quantized checkpoint "
                              f"(load full-precision models with transformers or qft.load_model)")
    if "qft" not in cfg or not isinstance(cfg["qft"], dict) or "modules" not in cfg["qft"]:
        raise CheckpointError(f"{f} has no 'qft' block: this checkpoint was not written by qft")
    if cfg["qft"].get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{f}: qft format version {cfg['qft']['version']} is newer than this qft "
                              f"({FORMAT_VERSION}); upgrade qft")
    return cfg


def read_tensors(path: Path) -> dict:
    from safetensors import safe_open
    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f} not found: the checkpoint has no weights")
    try:
        with safe_open(str(f), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{f} is corrupted or truncated: {e}") from None


def _build_module(name: str, entry: dict, t: dict, fmt: str, dtype, wfile) -> nn.Module:
    typ = entry.get("type")
    if typ == "QuantLinear":
        spec = QuantSpec.from_dict(entry["spec"])
        m = QuantLinear.packed_empty(entry["in_features"], entry["out_features"], entry["bias"], spec, name, dtype=dtype)
        if fmt == "pack-quantized":
            qw, sc, zr, k = from_pack_quantized(t, m.bits, m.symmetric, m.group_size, name)
            if k != m.in_features:
                raise CheckpointError(f"{wfile}: {name}.weight_shape says in_features={k}, config says {m.in_features}")
        elif fmt == "gptq":
            from qft.formats.gptq import from_gptq_v1
            qw, sc, zr, g_idx = from_gptq_v1(t, m.bits, m.group_size, m.in_features, m.out_features)
        else:
            missing = [k for k in ("qweight", "scales", "zeros") if k not in t]
            if missing:
                raise CheckpointError(f"{wfile}: layer '{name}' lacks tensors {missing}")
            qw, sc, zr = t["qweight"], t["scales"], t["zeros"]
        for key, val, ref in (("qweight", qw, m.qweight), ("scales", sc, m.scales), ("zeros", zr, m.zeros)):
            if tuple(val.shape) != tuple(ref.shape):
                raise CheckpointError(f"{wfile}: tensor '{name}.{key}' has shape {tuple(val.shape)}, "
                                      f"expected {tuple(ref.shape)}")
        m.qweight, m.scales, m.zeros = qw.to(torch.int32), sc.to(dtype), zr.to(torch.uint8)
        if entry["bias"]:
            if "bias" not in t:
                raise CheckpointError(f"{wfile}: layer '{name}' lacks its bias")
            m.bias = nn.Parameter(t["bias"].to(dtype), requires_grad=False)
        return m
    if typ not in MODULE_TYPES:
        _register_builtin_types()
    if typ not in MODULE_TYPES:
        raise CheckpointError(f"{wfile}: layer '{name}' has unknown module type {typ!r}; "
                              f"known: {', '.join(['QuantLinear', *MODULE_TYPES])}")
    try:
        return MODULE_TYPES[typ].from_export(entry, t, dtype)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{wfile}: cannot rebuild layer '{name}' ({typ}): {e}") from None


def build_empty_module(name: str, entry: dict, dtype) -> nn.Module:
    """An empty packed module of the right shapes for a native-format entry (transformers loading)."""
    if entry.get("type") == "QuantLinear":
        spec = QuantSpec.from_dict(entry["spec"])
        return QuantLinear.packed_empty(entry["in_features"], entry["out_features"], entry["bias"], spec, name,
                                        dtype=dtype)
    if entry.get("type") not in MODULE_TYPES:
        _register_builtin_types()
    if entry.get("type") not in MODULE_TYPES:
        raise CheckpointError(f"layer '{name}' has unknown module type {entry.get('type')!r}")
    return MODULE_TYPES[entry["type"]].from_export(entry, None, dtype)


def _register_builtin_types():
    import importlib
    for mod in ("qft.nn.onebit", "qft.nn.int8", "qft.nn.mixed", "qft.nn.lut", "qft.nn.hadamard", "qft.nn.reorder", "qft.nn.olive_codec",
                "qft.nn.wkv_cache"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Restore a qft checkpoint (any of its formats) as a model with packed modules, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    path = Path(path)
    cfg = read_config(path)
    tensors = read_tensors(path)
    wfile = path / WEIGHTS
    qblock, fmt = cfg["qft"], cfg["qft"].get("format", "qft")
    if dtype is None:
        floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    config = AutoConfig.from_pretrained(path)
    for attr in ("quantization_config", "qft"):
        if hasattr(config, attr):
            delattr(config, attr)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, entry in qblock["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path / 'config.json'}: quantized layer '{name}' does not exist in "
                                  f"the {config.model_type} architecture") from None
        prefix = f"{name}."
        t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        set_module(model, name, _build_module(name, entry, t, fmt, dtype, wfile))
    qprefixes = tuple(f"{n}." for n in qblock["modules"])
    rest = {k: v for k, v in tensors.items() if not k.startswith(qprefixes)}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{wfile}: tensors do not fit the model: {e}") from None
    missing = [k for k in missing if not k.startswith(qprefixes)]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected tensors {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if qblock.get("spec"):
        model.qft_spec = QuantSpec.from_dict(qblock["spec"])
    return model.to(device).eval()


# --- info --------------------------------------------------------------------------------------

def info(path: str | os.PathLike) -> dict:
    """Quantization settings, bits per weight and size on disk, read without loading the weights."""
    from safetensors import safe_open
    path = Path(path)
    cfg = read_config(path)
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"{wfile} not found: the checkpoint has no weights")
    sizes = {}
    try:
        with safe_open(str(wfile), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                itemsize = torch.empty(0, dtype=_DT[sl.get_dtype()]).element_size()
                sizes[k] = (n, n * itemsize)
    except Exception as e:
        raise CheckpointError(f"{wfile} is corrupted or truncated: {e}") from None
    modules = cfg["qft"]["modules"]
    qbytes, qweights = 0, 0
    for name, e in modules.items():
        pre = f"{name}."
        qbytes += sum(b for k, (_, b) in sizes.items() if k.startswith(pre) and not k.endswith(".bias"))
        qweights += e.get("in_features", 0) * e.get("out_features", 0)
    total_bytes = sum(b for _, b in sizes.values())
    total_params = sum(n for k, (n, _) in sizes.items()
                       if not any(k.startswith(f"{m}.") for m in modules)) + qweights
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"path": str(path), "format": cfg["qft"].get("format"), "spec": cfg["qft"].get("spec"),
            "quantized_layers": len(modules), "quantized_weights": qweights,
            "bits_per_weight": 8 * qbytes / max(qweights, 1),
            "bits_per_parameter_overall": 8 * total_bytes / max(total_params, 1),
            "tensor_bytes": total_bytes, "size_on_disk_bytes": disk,
            "quantization_config": cfg["quantization_config"]}


_DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64,
       "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F64": torch.float64, "BOOL": torch.bool,
       "F8_E4M3": torch.float8_e4m3fn}
