"""The bitsandbytes NF4 baseline (``lora.mode: bnb-nf4``): peft's own QLoRA path, driven by ``qft train``.

QLoRA (Dettmers et al., 2023) stores the frozen base in 4-bit NormalFloat (a 16-value codebook with
one absmax scale per block of weights) and trains LoRA adapters beside it in high precision. Here the
float student is a copy of the teacher whose targeted ``nn.Linear`` layers become
``bitsandbytes.nn.Linear4bit`` (NF4, block size = ``quant.group_size``), and peft wraps them with its
bitsandbytes LoRA layers, exactly as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
followed by ``get_peft_model`` would. It is the comparison point for qft's two LoRA modes on the same
recipe (same data, loss, schedule, evaluation): ``--override lora.mode=bnb-nf4``.

The merge is peft's: dequantize, add s·B·A, re-quantize to NF4 (so it rounds again, as ``qlora``
does). NF4 is not one of qft's export formats, so this mode evaluates before and after the merge and
does not export. bitsandbytes >= 0.46 runs NF4 (and its 8-bit optimizers) on CPU through its torch
backend, so the baseline is tested here on a tiny model; on a GPU it uses the CUDA kernels.

On CPU, bitsandbytes' eval-mode repacking of the weight into its AVX512-BF16 inference layout is
switched off per layer: training after an evaluation computed with the repacked words as if they
were the plain NF4 layout (the loss climbed, the model collapsed to ppl ~1e7; a test checks it).

Simplified: no double quantization of the absmax scales, no ``prepare_model_for_kbit_training``
(the teacher is already float; layer norms stay in the model's dtype).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def require_bnb() -> None:
    """Raise a clear error unless bitsandbytes (with its 4-bit layers) can be imported."""
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("lora mode 'bnb-nf4' needs bitsandbytes: pip install bitsandbytes==0.50.2 "
                           "(or pip install -e '.[bnb]')")


def check_spec(spec) -> None:
    """The quant block of a bnb-nf4 recipe: 4-bit weights, a block size bitsandbytes supports, no act / KV quant."""
    if spec.bits != 4:
        raise ValueError(f"lora.mode='bnb-nf4' stores the base in NF4 (4 bits); quant.bits={spec.bits} is not "
                         f"valid; allowed: 4")
    gs = spec.group_size if spec.group_size else 64
    if gs not in NF4_BLOCKSIZES:
        raise ValueError(f"lora.mode='bnb-nf4': quant.group_size={spec.group_size} is not a bitsandbytes block "
                         f"size; allowed: {', '.join(map(str, NF4_BLOCKSIZES))}")
    if spec.act_bits or spec.kv_bits:
        raise ValueError(f"lora.mode='bnb-nf4' is weight-only; quant.act_bits={spec.act_bits}, "
                         f"quant.kv_bits={spec.kv_bits} are not valid with it; allowed: 0 / null")


def nf4_student(teacher: nn.Module, spec, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``teacher`` with every targeted nn.Linear replaced by a bitsandbytes NF4 ``Linear4bit``."""
    require_bnb()
    check_spec(spec)
    import bitsandbytes as bnb
    from qft.nn import set_module, target_linears
    student = copy.deepcopy(teacher)
    layers = list(target_linears(student, spec))
    if not layers:
        raise ValueError(f"no nn.Linear in the model matches quant.targets={list(spec.targets)}")
    blocksize = spec.group_size or 64
    for name, lin in layers:
        dev = lin.weight.device
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                     quant_type="nf4", blocksize=blocksize, compress_statistics=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        q = q.to(dev)  # Params4bit quantizes when it is moved to a device
        # bitsandbytes repacks the weight in place into an inference-only layout the first time a CPU with
        # AVX512-BF16 runs it in eval mode without grad; a training step after such an eval (the pipeline
        # evaluates before it trains) then computes with garbage. Keep the one NF4 layout.
        q.support_avx512bf16_for_cpu = False
        set_module(student, name, q)
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def nf4_linears(model: nn.Module):
    """(name, module) of every bitsandbytes Linear4bit (peft-wrapped or not) in ``model``."""
    import bitsandbytes as bnb
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            yield name, m


def nf4_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight [N, K] an NF4 Linear4bit computes with."""
    import bitsandbytes.functional as F
    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def apply_bnb_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                   target_modules: list[str] | None = None):
    """peft LoRA over the NF4 layers of ``model`` (from :func:`nf4_student`); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r={r!r} is not valid; allowed: a positive integer")
    names = [n for n, _ in nf4_linears(model)]
    if target_modules is not None:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not names:
        raise ValueError(f"lora target_modules={target_modules!r} match no NF4 layer")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets: peft then picks its bnb LoRA layer
    pm = get_peft_model(model, cfg)
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraNF4
    assert any(isinstance(m, PeftLoraNF4) for m in pm.modules()), "peft did not dispatch its bitsandbytes LoRA layer"
    pm.qft_lora_mode = "bnb-nf4"
    return pm
