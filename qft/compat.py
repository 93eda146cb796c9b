"""Fixes for peer libraries, installed by ``import qft``.

compressed-tensors (0.20, with transformers 5.x): when transformers builds the skeleton of a
``pack-quantized`` checkpoint on the meta device, ``PackedQuantizationCompressor.compress`` packs
the weight but leaves an asymmetric zero point at its unpacked shape [N, G], while the file holds
it packed along N ([ceil(N * bits / 32), G] int32, as compressed-tensors itself writes it). Loading
any asymmetric pack-quantized checkpoint then fails with a size mismatch. The patch gives the
meta zero point its packed shape; real (non-meta) compression is untouched. Symmetric checkpoints
load in plain transformers without it.
"""

from __future__ import annotations

import importlib.util
import math


_TARGET = "compressed_tensors.compressors.pack_quantized.base"
_HF_TARGET = "transformers.quantizers.auto"


class _PatchOnImport:
    """A meta-path finder that applies the fix right after compressed-tensors' module loads, so
    ``import qft`` stays cheap (importing compressed-tensors takes seconds)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in (_TARGET, _HF_TARGET):
            return None
        import sys
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if fullname == _TARGET:
                _patch(module.PackedQuantizationCompressor)
            else:
                from qft.hf_quantizer import register
                register()

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch now if compressed-tensors is already imported, else as soon as it is."""
    import sys
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET].PackedQuantizationCompressor)
    if _HF_TARGET in sys.modules:
        from qft.hf_quantizer import register
        register()
    if not (_TARGET in sys.modules and _HF_TARGET in sys.modules) and \
            not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def patch_compressed_tensors() -> bool:
    """Apply the meta zero-point fix if compressed-tensors is installed. Returns True if applied."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return False
    try:
        import torch
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as P
    except Exception:  # an incompatible compressed-tensors: nothing to fix here
        return False
    _patch(P)
    return True


def _patch(P) -> None:
    import torch
    if getattr(P, "_qft_patched", False):
        return
    orig = P.compress.__func__

    def compress(cls, state_dict, scheme):
        out = orig(cls, state_dict, scheme)
        zp, w = out.get("weight_zero_point"), scheme.weights
        if (zp is not None and zp.device.type == "meta" and w is not None and not w.symmetric
                and str(getattr(w.strategy, "value", w.strategy)) in ("group", "channel") and zp.dtype != torch.int32):
            rows = math.ceil(zp.shape[0] * w.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, *zp.shape[1:]), dtype=torch.int32, device="meta")
        return out

    P.compress = classmethod(compress)
    P._qft_patched = True
