"""Modules for equivalent transformations folded into the model, and static activation quantization.

* :class:`FoldedRMSNorm`: a Llama RMSNorm whose output may be **reordered** (RPTQ: the channel
  permutation is fused into the norm, which writes its output in cluster order) and **shifted**
  (OS+: a per-channel bias after the norm weight; Llama's RMSNorm has none, so the shift needs a
  new one). ``y = (rmsnorm(x) * w_orig)[..., perm] / s - z / s`` is stored as a permuted weight and
  a bias, so the forward is one gather, one multiply and one add.
* :class:`ClusterQuantLinear`: a linear whose weight is an inner :class:`QuantLinear` (integer or
  FP codebook, any group size) and whose input is quantized **statically**, one (scale, zero) per
  channel cluster from calibration: RPTQ's per-cluster activation quantization (clusters are
  contiguous after reordering), or a single cluster with an FP format (LLM-FP4's per-tensor FP
  activations with a searched maximum).

Both implement the native-format hooks (``qft_type``, ``export_tensors``, ``export_config``,
``from_export`` which accepts ``tensors=None`` for transformers loading, ``bits_per_weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from qft.nn.mixed import ExportMixin
from qft.nn.qlinear import QuantLinear
from qft.nn.quant import codebook
from qft.spec import QuantSpec

__all__ = ["FoldedRMSNorm", "ClusterQuantLinear", "static_act_qdq", "fp_round"]


def fp_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest value of the FP format (4 bits: e2m1, max 6; 8 bits: e4m3fn, max 448), saturating."""
    if bits == 8:
        return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    if bits == 4:
        lv = torch.unique(codebook("fp", 4, x.device))  # sorted, one zero
        mids = (lv[1:] + lv[:-1]) / 2
        return lv[torch.bucketize(x.float().contiguous(), mids)]
    raise ValueError(f"FP activations: bits={bits} is not valid; allowed: 4 (e2m1), 8 (e4m3)")


def static_act_qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cluster: torch.Tensor, bits: int,
                   scheme: str = "int") -> torch.Tensor:
    """Static fake quant of x [..., K] with per-cluster parameters (scale/zero [C], cluster [K] ids).

    int: asymmetric, u = clamp(round(x / s) + z, 0, 2**bits - 1), x^ = (u - z) * s.
    fp: x^ = fp_round(x / s) * s (symmetric, zero unused). Straight-through gradient for x.
    """
    s = scale.float()[cluster]
    xf = x.float()
    if scheme == "int":
        z = zero.float()[cluster]
        q = torch.clamp(torch.round(xf / s) + z, 0, 2 ** bits - 1)
        out = (q - z) * s
    elif scheme == "fp":
        out = fp_round(xf / s, bits) * s
    else:
        raise ValueError(f"activation scheme={scheme!r} is not valid; allowed: int, fp")
    out = out.to(x.dtype)
    return (out - x).detach() + x if x.requires_grad else out


class FoldedRMSNorm(ExportMixin, nn.Module):
    """RMSNorm with an optional output permutation (RPTQ) and an optional bias (OS+ shift)."""

    qft_type = "folded_rmsnorm"

    def __init__(self, hidden_size: int, eps: float = 1e-6, permuted: bool = False, bias: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.hidden_size, self.variance_epsilon = hidden_size, float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("perm", torch.arange(hidden_size, device=device) if permuted else None)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_norm(cls, norm: nn.Module, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """``(norm(x) + bias)[..., perm]`` as one FoldedRMSNorm. ``norm`` is a Llama-style RMSNorm
        (``weight``, ``variance_epsilon`` or ``eps``) or a FoldedRMSNorm (its permutation and bias compose)."""
        w = norm.weight.detach()
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        old_perm, old_bias = getattr(norm, "perm", None), getattr(norm, "bias", None)
        if old_bias is not None:
            bias = old_bias.detach() + (0 if bias is None else bias.to(old_bias))
        if old_perm is not None:
            perm = old_perm if perm is None else old_perm[perm.to(old_perm.device)]
        m = cls(w.numel(), eps, perm is not None, bias is not None, w.dtype, w.device)
        rel = None if perm is None else _rel(perm.to(w.device), old_perm)  # in the norm's output order
        with torch.no_grad():
            m.weight.copy_(w if rel is None else w[rel])
            if perm is not None:
                m.perm.copy_(perm)
            if bias is not None:
                m.bias.copy_(bias if rel is None else bias[rel.to(bias.device)])
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = h.to(dt)
        if self.perm is not None:
            h = h.index_select(-1, self.perm)
        h = self.weight * h
        return h if self.bias is None else h + self.bias

    @classmethod
    def _from_config(cls, c: dict, dtype) -> "FoldedRMSNorm":
        return cls(c["hidden_size"], c["eps"], c["permuted"], c["has_bias"], dtype=dtype)

    def export_config(self) -> dict:
        return {"hidden_size": self.hidden_size, "eps": self.variance_epsilon, "permuted": self.perm is not None,
                "has_bias": self.bias is not None}

    def bits_per_weight(self) -> float:
        return float(8 * self.weight.element_size())

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}, permuted={self.perm is not None}, bias={self.bias is not None}"


def _rel(perm: torch.Tensor, old_perm: torch.Tensor | None) -> torch.Tensor:
    """The permutation relative to the norm's current output order (perm = old_perm[rel])."""
    if old_perm is None:
        return perm
    inv = torch.empty_like(old_perm)
    inv[old_perm] = torch.arange(old_perm.numel(), device=old_perm.device)
    return inv[perm]


def _fill(m: nn.Module, tensors: dict) -> None:
    own = dict(m.named_parameters())
    own.update(dict(m.named_buffers()))
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"tensors do not match {type(m).__name__}: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for k, v in tensors.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))


class ClusterQuantLinear(nn.Module):
    """Quantized weight (inner QuantLinear) x statically quantized input, one scale/zero per cluster."""

    qft_type = "cluster_act_linear"

    def __init__(self, inner: QuantLinear, n_clusters: int, act_bits: int, act_scheme: str = "int"):
        super().__init__()
        if inner.spec.act_bits:
            raise ValueError("ClusterQuantLinear: the inner QuantLinear must not quantize activations itself "
                             f"(its spec has act_bits={inner.spec.act_bits})")
        if act_scheme not in ("int", "fp"):
            raise ValueError(f"act_scheme={act_scheme!r} is not valid; allowed: int, fp")
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.act_bits, self.act_scheme, self.n_clusters = int(act_bits), act_scheme, int(n_clusters)
        dev = inner.scale.device if inner.state == "fake" else inner.scales.device
        self.register_buffer("act_scale", torch.ones(n_clusters, device=dev))
        self.register_buffer("act_zero", torch.zeros(n_clusters, device=dev))
        self.register_buffer("act_cluster", torch.zeros(self.in_features, dtype=torch.long, device=dev))

    @classmethod
    def build(cls, inner: QuantLinear, scale: torch.Tensor, zero: torch.Tensor, cluster: torch.Tensor,
              act_bits: int, act_scheme: str = "int") -> "ClusterQuantLinear":
        m = cls(inner, scale.numel(), act_bits, act_scheme)
        with torch.no_grad():
            m.act_scale.copy_(scale.float().clamp_min(1e-8))
            m.act_zero.copy_(zero.float())
            m.act_cluster.copy_(cluster.long())
        return m

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return static_act_qdq(x, self.act_scale, self.act_zero, self.act_cluster, self.act_bits, self.act_scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.quantize_input(x))

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.inner.dequantize(dtype)

    # --- native export hooks -------------------------------------------------------------------
    def export_tensors(self) -> dict:
        self.inner.pack()
        t = {"inner.qweight": self.inner.qweight, "inner.scales": self.inner.scales, "inner.zeros": self.inner.zeros,
             "act_scale": self.act_scale, "act_zero": self.act_zero, "act_cluster": self.act_cluster}
        if self.inner.bias is not None:
            t["inner.bias"] = self.inner.bias.data
        return t

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.inner.bias is not None, "spec": self.inner.spec.to_dict(), "n_clusters": self.n_clusters,
                "act_bits": self.act_bits, "act_scheme": self.act_scheme}

    @classmethod
    def from_export(cls, config: dict, tensors: dict | None, dtype=torch.float32) -> "ClusterQuantLinear":
        spec = QuantSpec.from_dict(config["spec"])
        inner = QuantLinear.packed_empty(config["in_features"], config["out_features"], config["bias"], spec,
                                         dtype=dtype)
        m = cls(inner, config["n_clusters"], config["act_bits"], config.get("act_scheme", "int"))
        if tensors is not None:
            _fill(m, tensors)
        return m

    def bits_per_weight(self) -> float:
        g = self.inner.group_size
        stats = 16 if self.inner.scheme != "int" or self.inner.symmetric else 16 + 8
        return self.inner.bits + stats / g

    def extra_repr(self) -> str:
        return f"act: {self.act_bits}-bit {self.act_scheme}, static, {self.n_clusters} cluster(s)"


def _register():
    try:
        from qft.formats import register_module_type
    except ImportError:  # pragma: no cover
        return
    for cls in (FoldedRMSNorm, ClusterQuantLinear):
        register_module_type(cls)


_register()
