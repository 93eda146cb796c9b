"""LoRA over a frozen quantized base, through peft's custom-module dispatch.

Two modes (``LORA_MODES``), both plain peft LoRA layers registered for ``QuantLinear`` with
``LoraConfig._register_custom_module`` so ``get_peft_model``, adapter saving / loading,
``merge_and_unload`` and the Trainer work unchanged:

* ``qlora`` (:class:`QLoraLinear`): the base QuantLinear is **packed** (int32 words + scales) and
  frozen; y = base(x) + s * B A x in float beside it (QLoRA, Dettmers et al. 2023, with qft's
  integer grid instead of NF4). Least memory. Merging adds s * B A to the dequantized weight and
  requantizes it, which rounds again: the merged model differs from the trained one (measured in
  the export report).
* ``lora-in-quantizer`` (:class:`QuantizerLoraLinear`): the frozen base weight W0 stays in float;
  the forward uses Q(W0 + s * B A) with a straight-through estimator, so training sees exactly the
  integers that are exported (exact merge: the merge writes W0 + s B A and the very quantization
  parameters the forward used). Quantization parameters (``qparams``):
  ``dynamic`` min-max of the current W0 + s B A each step (times the per-group clip ratios found by
  the clipping search, if any: BitDistiller's setting); ``fixed`` the base's scale / zero;
  ``lwc`` learnable clip factors sigmoid(gamma), sigmoid(beta) per group (OmniQuant's LWC), trained
  with the adapters and saved with them (they live under ``lora_clip`` so peft treats them as
  adapter weights).

Activation fake quant (``spec.act_bits``) applies to the input of both branches, so the merged
layer computes what was trained. LoRA dropout is applied in ``qlora`` only (the weight-space
formulation of lora-in-quantizer has no per-input dropout). The bitsandbytes NF4 baseline
(``bnb-nf4``, peft's own QLoRA path over ``bitsandbytes.nn.Linear4bit``) lives in :mod:`qft.train.bnb`.
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from qft import kernels
from qft.nn import QuantLinear, quant_linears
from qft.nn import quant as Q

LORA_MODES = ("qlora", "lora-in-quantizer", "bnb-nf4", "full")
QPARAM_MODES = ("dynamic", "fixed", "lwc")


def _clip_ratios(base: QuantLinear):
    """Per-group clip ratios (max, min) left on the layer by the clipping search, or (1.0, 1.0)."""
    r = getattr(base, "qft_clip", None)
    return (1.0, 1.0) if r is None else r


def _act(base: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    sp = base.spec
    return Q.fake_quant_act(x, sp.act_bits, sp.act_granularity, sp.act_symmetric) if sp.act_bits else x


class _QuantLoraMixin:
    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _delta(self) -> torch.Tensor | None:
        """Sum of s * B A over the active adapters, float32 [N, K] (None if no adapter is active)."""
        delta = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            d = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float() * self.scaling[name]
            delta = d if delta is None else delta + d
        return delta

    def unmerge(self) -> None:
        raise NotImplementedError("a LoRA merged into a low-bit grid cannot be unmerged exactly; "
                                  "reload the adapter onto the original quantized base instead")


@torch.no_grad()
def merge_qparams(w: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor, bits: int, gs: int, symmetric: bool):
    """Per-group qparams for re-rounding a qlora merge W = W_q + s B A: the base's own grid (s0, z0),
    where the few codes the adapter pushed across a boundary move and nothing else, or fresh min-max
    of W (clip 1: W_q is already clipped), where the adapter pushed weights past the grid's range;
    whichever has the lower squared error in that group."""
    s1, z1 = Q.minmax_qparams(w, bits, gs, symmetric)
    err = [(Q.group_view(Q.fake_quant(w, s, z, bits, gs) - w, gs) ** 2).sum(-1) for s, z in ((s0, z0), (s1, z1))]
    keep = err[0] <= err[1]
    return torch.where(keep, s0, s1), torch.where(keep, z0, z1)


class QLoraLinear(_QuantLoraMixin, PeftLoraLinear):
    """peft LoRA beside a frozen (packed) QuantLinear."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        result = base(x)
        if self.disable_adapters or self.merged:
            return result
        xa = _act(base, x)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(self.lora_dropout[name](xa), a.weight.dtype)
            result = result + (b(a(h)) * self.scaling[name]).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        base = self.get_base_layer()
        delta = self._delta()
        if delta is None or self.merged:
            return
        w = base.dequantize(torch.float32) + delta
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"{base.layer_name}: NaN/inf in the merged weight; the adapter is broken")
        if base.scheme == "int":
            packed = base.state == "packed"
            s0, z0 = (base.scales, base.zeros) if packed else (base.scale, base.zero)
            s, z = merge_qparams(w, s0.float(), z0.float(), base.bits, base.group_size, base.symmetric)
            base.requantize(w.to(base.scales.dtype if packed else base.weight.dtype), scale=s, zero=z)
        else:
            base.requantize(w)
        self.merged_adapters.extend(a for a in self.active_adapters if a in self.lora_A)


class ClipFactors(nn.Module):
    """Learnable per-group clip factors (OmniQuant LWC): forward() -> (sigmoid(gamma), sigmoid(beta)).

    A module (not bare parameters) so DeepSpeed ZeRO-3 gathers them through its forward hooks."""

    def __init__(self, out_features: int, groups: int, init_max=1.0, init_min=1.0, device=None):
        super().__init__()

        def logit(c):
            c = torch.as_tensor(c, dtype=torch.float32).clamp(0.01, 0.999)
            return torch.logit(c.expand(out_features, groups).clone()).to(device)
        self.gamma, self.beta = nn.Parameter(logit(init_max)), nn.Parameter(logit(init_min))

    def forward(self):
        return torch.sigmoid(self.gamma), torch.sigmoid(self.beta)


def _gathered(*params):
    """All-gather ZeRO-3-partitioned (frozen) parameters for direct access; a no-op otherwise."""
    ps = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if ps:
        # a parameter ZeRO-3 already fetched for the active module must not be gathered (and freed) again
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        ps = [p for p in ps if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    if not ps:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(ps, modifier_rank=None)


def _fp32(device: torch.device):
    """Autocast off: the adapter delta s B A and the quantizer run in fp32 under bf16/fp16 mixed
    precision too, so the integers trained are the integers the (fp32) merge exports."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def _adapted_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + s B A in float32: one GEMM with the scale and the add in its epilogue (addmm). The fused
    forward, its backward and the merge all build the weight here, so they agree bit for bit."""
    return torch.addmm(w0.float(), b.float(), a.float(), alpha=scaling)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in here: the autocast dtype when autocast is on."""
    dt = x.device.type
    return torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype


class _LoraInQuantizerFn(torch.autograd.Function):
    """y = x @ Q(W0 + s B A)^T + bias with the STE, saving only x, W0, A, B and the per-group
    (scale, zero) for backward.

    Q is :func:`qft.kernels.fake_quant_weight` (one Triton kernel on a GPU: min-max, round, clamp,
    dequantize, cast to the compute dtype in one pass; the torch reference elsewhere), and the
    backward's quantized weight and clamp mask are recomputed from the saved qparams by
    :func:`qft.kernels.fake_quant_weight_grad` (one more pass, which also masks grad_W). Memory per
    layer is that of plain LoRA plus transient [N, K] buffers; a GPU step launches ~4 kernels per
    layer forward and ~8 backward instead of ~50 (the launches, not the bytes, bound a small model)."""

    @staticmethod
    def forward(ctx, x, w0, a, b, bias, scaling, qcfg):
        bits, gs, symmetric, cmax, cmin, s0, z0 = qcfg
        cdt = _compute_dtype(x)
        with torch.no_grad(), _fp32(x.device):
            w = _adapted_weight(w0, a, b, scaling)
            wq, s, z = kernels.fake_quant_weight(w, bits, gs, symmetric, cmax, cmin, s0, z0, out_dtype=cdt)
        ctx.save_for_backward(x, w0, a, b, s, z)
        ctx.cfg = (scaling, bits, gs)
        return nn.functional.linear(x.to(cdt), wq, None if bias is None else bias.to(cdt))

    @staticmethod
    def backward(ctx, g):
        x, w0, a, b, s, z = ctx.saved_tensors
        scaling, bits, gs = ctx.cfg
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)  # GEMM in g's dtype
        with _fp32(x.device):
            wq, gw = kernels.fake_quant_weight_grad(_adapted_weight(w0, a, b, scaling), s, z, gw, bits, gs, g.dtype)
        gx = g @ wq
        del wq
        ga = torch.mm(b.float().t(), gw).mul_(scaling).to(a.dtype)
        gb = torch.mm(gw, a.float().t()).mul_(scaling).to(b.dtype)
        return gx, None, ga, gb, None, None, None


class QuantizerLoraLinear(_QuantLoraMixin, PeftLoraLinear):
    """peft LoRA inside the quantizer: y = x_q @ Q(W0 + s B A)^T (+ bias), STE through Q.

    Trainable tensors are only reached through module calls (B A is computed as lora_B(lora_A(I)),
    clip factors through :class:`ClipFactors`), so DeepSpeed ZeRO-3 gathers and reduces them; the
    frozen W0 / bias are all-gathered explicitly when partitioned.
    """

    adapter_layer_names = PeftLoraLinear.adapter_layer_names + ("lora_clip",)
    qparams_mode = "dynamic"
    use_fused = True  # memory-lean autograd.Function when possible (see _fused_adapter)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        base = self.get_base_layer()
        if base.state != "fake":
            raise ValueError(f"{base.layer_name}: lora-in-quantizer needs the base in the fake (float) state; "
                             f"got {base.state!r}")
        if "lora_clip" not in self._modules:
            self.lora_clip = nn.ModuleDict()
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        if self.qparams_mode == "lwc":
            if base.scheme != "int":
                raise ValueError(f"qparams='lwc' needs scheme='int'; layer {base.layer_name} has {base.scheme!r}")
            cmax, cmin = _clip_ratios(base)
            self.lora_clip[adapter_name] = ClipFactors(base.out_features, base.in_features // base.group_size,
                                                       cmax, cmin, device=base.scale.device)
        self.set_adapter(self.active_adapters)

    def _fused_adapter(self) -> str | None:
        """The adapter name when the fused function applies: one active adapter, integer grid,
        dynamic/fixed qparams, nothing partitioned by ZeRO-3. None otherwise."""
        base = self.get_base_layer()
        names = [a for a in self.active_adapters if a in self.lora_A]
        if not self.use_fused or len(names) != 1 or self.qparams_mode == "lwc" or base.scheme != "int":
            return None
        a, b = self.lora_A[names[0]].weight, self.lora_B[names[0]].weight
        if any(hasattr(p, "ds_id") for p in (base.weight, a, b)):
            return None
        return names[0]

    def _delta(self) -> torch.Tensor | None:
        """Sum of s * B A through the adapter modules (the non-fused path; see ``_weight``)."""
        delta = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            eye = torch.eye(self.in_features, dtype=a.weight.dtype, device=a.weight.device)
            with _fp32(a.weight.device):
                d = b(a(eye)).t().float() * self.scaling[name]  # (B A) through the modules (ZeRO-3 safe)
            delta = d if delta is None else delta + d
        return delta

    def qparams(self, w: torch.Tensor):
        """(scale, zero) the forward uses for weight ``w`` [N, K] (float32)."""
        base = self.get_base_layer()
        name = next((a for a in self.active_adapters if a in self.lora_clip), None)
        if self.qparams_mode == "lwc" and name is not None:
            cmax, cmin = self.lora_clip[name]()
            return Q.minmax_qparams(w.detach(), base.bits, base.group_size, base.symmetric, cmax, cmin)
        if self.qparams_mode == "fixed":
            return base.scale, base.zero
        cmax, cmin = _clip_ratios(base)
        with torch.no_grad():
            if base.scheme == "int":
                return Q.minmax_qparams(w, base.bits, base.group_size, base.symmetric, cmax, cmin)
            return Q.codebook_qparams(w, base.scheme, base.bits, base.group_size)

    def _qcfg(self) -> tuple:
        """The fused function's quantizer: (bits, group_size, symmetric, clip_max, clip_min, scale, zero);
        scale / zero given only for ``fixed`` qparams."""
        base = self.get_base_layer()
        if self.qparams_mode == "fixed":
            return base.bits, base.group_size, base.symmetric, 1.0, 1.0, base.scale, base.zero
        return (base.bits, base.group_size, base.symmetric, *_clip_ratios(base), None, None)

    def _weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        fused = None if (self.disable_adapters or self.merged) else self._fused_adapter()
        if fused is not None:  # the fused forward's own arithmetic, so the merge is bit-exact
            with _fp32(base.weight.device):
                return _adapted_weight(base.weight, self.lora_A[fused].weight, self.lora_B[fused].weight,
                                       self.scaling[fused])
        with _gathered(base.weight):
            w = base.weight.float().clone()
        delta = None if (self.disable_adapters or self.merged) else self._delta()
        return w if delta is None else w + delta

    def quantized_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        w = self._weight()
        s, z = self.qparams(w)
        if base.scheme == "int":
            return Q.fake_quant(w, s, z, base.bits, base.group_size)
        return Q.fake_quant_codebook(w, s, base.scheme, base.bits, base.group_size)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            return base(x)
        fused = self._fused_adapter()
        if fused is not None:
            return _LoraInQuantizerFn.apply(_act(base, x), base.weight, self.lora_A[fused].weight,
                                            self.lora_B[fused].weight, base.bias, self.scaling[fused], self._qcfg())
        wq = self.quantized_weight().to(x.dtype)
        with _gathered(base.bias):
            bias = None if base.bias is None else base.bias.to(x.dtype).clone()
        return nn.functional.linear(_act(base, x), wq, bias)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Write W0 + s B A and the forward's own scale / zero into the base: exact."""
        if self.merged:
            return
        base = self.get_base_layer()
        w = self._weight()
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"{base.layer_name}: NaN/inf in the merged weight; the adapter is broken")
        s, z = self.qparams(w)
        base.requantize(w.to(base.weight.dtype), scale=s.detach(), zero=z.detach())
        base.qft_clip = None
        self.merged_adapters.extend(a for a in self.active_adapters if a in self.lora_A)


def _quantizer_cls(qparams: str):
    if qparams not in QPARAM_MODES:
        raise ValueError(f"qparams={qparams!r} is not valid; allowed: {', '.join(QPARAM_MODES)}")
    return type(f"QuantizerLoraLinear_{qparams}", (QuantizerLoraLinear,), {"qparams_mode": qparams})


def apply_lora(model: nn.Module, mode: str = "lora-in-quantizer", r: int = 16, alpha: float = 32.0,
               dropout: float = 0.0, target_modules: list[str] | None = None, qparams: str = "dynamic",
               init: str | bool = True):
    """Wrap a model whose linears are QuantLinear (``qft.nn.quantize_model``) with peft LoRA.

    ``mode='qlora'`` packs the targeted bases first; ``mode='bnb-nf4'`` expects a model from
    :func:`qft.train.bnb.nf4_student` instead. Returns the ``PeftModel``; only adapter
    weights (and ``lwc`` clip factors) are trainable.
    """
    if mode not in LORA_MODES:
        raise ValueError(f"lora mode={mode!r} is not valid; allowed: {', '.join(LORA_MODES)}")
    if mode == "bnb-nf4":  # the base is bitsandbytes NF4 (qft.train.bnb.nf4_student), not QuantLinear
        from qft.train.bnb import apply_bnb_lora
        return apply_bnb_lora(model, r, alpha, dropout, target_modules)
    if mode == "full":
        from qft.train.full import apply_full_qat
        return apply_full_qat(model)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r={r!r} is not valid; allowed: a positive integer")
    layers = dict(quant_linears(model))
    if not layers:
        raise ValueError("the model has no QuantLinear; quantize it first (qft.nn.quantize_model or a PTQ method)")
    names = sorted(layers) if target_modules is None else [n for n in layers
                                                           if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not names:
        raise ValueError(f"lora target_modules={target_modules!r} match no QuantLinear; "
                         f"examples of names: {sorted(layers)[:4]}")
    if mode == "qlora":
        for n in names:
            layers[n].pack()
        cls = QLoraLinear
    else:
        cls = _quantizer_cls(qparams)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                     init_lora_weights=init)
    cfg._register_custom_module({QuantLinear: cls})
    peft_model = get_peft_model(model, cfg)
    peft_model.qft_lora_mode = mode
    return peft_model


def merge_lora(peft_model) -> nn.Module:
    """Merge every adapter into its quantized base and return the plain model (QuantLinear layers).

    Full QAT (``mode='full'``, no adapter) is returned as it is: its weights are already the trained ones.
    """
    if getattr(peft_model, "qft_lora_mode", None) == "full" and not hasattr(peft_model, "merge_and_unload"):
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for _, m in quant_linears(peft_model):  # store the qparams the dynamic forward used
            m.requantize()
            m.dynamic = False
        return peft_model
    return peft_model.merge_and_unload()


def lora_summary(model: nn.Module) -> dict:
    """Counts of trainable and frozen parameters (elements) and bytes of the frozen base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buf = sum(b.numel() * b.element_size() for b in model.buffers())
    fbytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) + buf
    return {"trainable": trainable, "frozen": frozen, "frozen_bytes": fbytes,
            "trainable_pct": 100.0 * trainable / max(1, trainable + frozen)}
