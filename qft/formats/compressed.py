"""compressed-tensors ``pack-quantized`` conversion.

qft's canonical words are bit-identical to compressed-tensors' ``pack_to_int32`` (dense
little-endian stream of ``u = q + 2**(bits-1)``), so ``weight_packed`` is ``qweight`` as is.
compressed-tensors keeps signed zero points q_z = z - 2**(bits-1) and, for group/channel
strategies, packs them along the output dimension; symmetric schemes store no zero point.
"""

from __future__ import annotations

import torch

from qft import kernels


def to_pack_quantized(qweight, scales, zeros, bits: int, symmetric: bool, in_features: int) -> dict:
    n = qweight.shape[0]
    out = {"weight_packed": qweight.contiguous(), "weight_scale": scales.contiguous(),
           "weight_shape": torch.tensor([n, in_features], dtype=torch.int64)}
    if not symmetric:
        # zero points u_z in [0, 2**bits) -> packed along dim 0 (N): pack the transpose along its last dim
        out["weight_zero_point"] = kernels.pack_int32(zeros.t().contiguous(), bits).t().contiguous()
    return out


def from_pack_quantized(t: dict, bits: int, symmetric: bool, group_size: int, name: str = "") -> tuple:
    """-> (qweight, scales, zeros uint8, in_features). Raises ValueError naming bad tensors."""
    for k in ("weight_packed", "weight_scale", "weight_shape"):
        if k not in t:
            raise ValueError(f"{name}: missing tensor {k!r}")
    n, k_in = (int(v) for v in t["weight_shape"].tolist())
    qweight, scales = t["weight_packed"], t["weight_scale"]
    g = k_in // group_size
    if tuple(qweight.shape) != (n, kernels.packed_cols(k_in, bits)):
        raise ValueError(f"{name}.weight_packed has shape {tuple(qweight.shape)}, expected "
                         f"{(n, kernels.packed_cols(k_in, bits))} for a {n}x{k_in} {bits}-bit weight")
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"{name}.weight_scale has shape {tuple(scales.shape)}, expected {(n, g)}")
    if symmetric:
        zeros = torch.full((n, g), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        if "weight_zero_point" not in t:
            raise ValueError(f"{name}: asymmetric scheme but no 'weight_zero_point' tensor")
        zp = t["weight_zero_point"]
        if zp.dtype != torch.int32 or zp.shape[1] != g:
            raise ValueError(f"{name}.weight_zero_point has shape {tuple(zp.shape)} / {zp.dtype}, "
                             f"expected int32 [{kernels.packed_cols(n, bits)}, {g}]")
        zeros = kernels.unpack_int32(zp.t().contiguous(), bits, n).t().contiguous()
    return qweight.contiguous(), scales.contiguous(), zeros, k_in


def pack_quantized_config(spec, ignore: list[str]) -> dict:
    """The ``quantization_config`` block compressed-tensors expects."""
    strategy = "channel" if spec.group_size is None else "group"
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
               "group_size": spec.group_size, "dynamic": False, "observer": "minmax"}
    acts = None
    if spec.act_bits:
        acts = {"num_bits": spec.act_bits, "type": "int", "symmetric": spec.act_symmetric,
                "strategy": "token" if spec.act_granularity == "token" else "tensor", "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
