"""KIVI quantized KV cache for one attention layer (torch buffers; kernels via the dispatcher).

Tokens first land in a full-precision window of ``residual`` slots. When it fills up the whole
window is quantized at once (``residual`` is a multiple of ``group``; keys per channel over
``group`` tokens, values per token over ``group`` channels) and appended to the packed part:
the most recent ``0 .. residual-1`` tokens are always exact, as in KIVI.

``KiviCache.attention(q)`` runs one decode step (``q`` [B, Hq, D]) over packed + window.
A transformers ``Cache`` subclass (in ``qft.nn``) can hold one ``KiviCache`` per layer.
"""

from __future__ import annotations

import torch


class KiviCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_tokens: int, bits: int = 2,
                 group: int = 32, residual: int = 128, dtype=torch.bfloat16, device=None):
        if bits not in (2, 4):
            raise ValueError(f"KIVI bits={bits} is not supported; allowed: 2, 4")
        if residual % group or head_dim % group:
            raise ValueError(f"residual={residual} and head_dim={head_dim} must be multiples of group={group}")
        self.bits, self.group, self.residual, self.head_dim = bits, group, residual, head_dim
        cap = -(-max_tokens // residual) * residual
        dw = head_dim * bits // 32
        shape = (batch, kv_heads)
        kw = dict(device=device)
        self.kq = torch.zeros(*shape, cap, dw, dtype=torch.int32, **kw)
        self.vq = torch.zeros(*shape, cap, dw, dtype=torch.int32, **kw)
        self.k_scale = torch.zeros(*shape, cap // group, head_dim, dtype=dtype, **kw)
        self.k_min = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(*shape, cap, head_dim // group, dtype=dtype, **kw)
        self.v_min = torch.zeros_like(self.v_scale)
        self.k_res = torch.zeros(*shape, residual, head_dim, dtype=dtype, **kw)
        self.v_res = torch.zeros_like(self.k_res)
        self.n_q = 0
        self.n_res = 0

    @property
    def seq_len(self) -> int:
        return self.n_q + self.n_res

    def _flush(self) -> None:
        from . import kv_quantize_into

        if self.n_q + self.residual > self.kq.shape[2]:
            raise RuntimeError(f"KiviCache is full ({self.kq.shape[2]} tokens)")
        kv_quantize_into(self.k_res, self.v_res, self.kq, self.k_scale, self.k_min, self.vq,
                         self.v_scale, self.v_min, self.n_q, self.bits, self.group)
        self.n_q += self.residual
        self.n_res = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, Hkv, T, D] (any T: prefill or one decode token)."""
        t, i = k.shape[2], 0
        while i < t:
            take = min(self.residual - self.n_res, t - i)
            self.k_res[:, :, self.n_res:self.n_res + take] = k[:, :, i:i + take]
            self.v_res[:, :, self.n_res:self.n_res + take] = v[:, :, i:i + take]
            self.n_res += take
            i += take
            if self.n_res == self.residual:
                self._flush()

    def tensors(self):
        """(kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res) views of the filled part."""
        n, g = self.n_q, self.group
        return (self.kq[:, :, :n], self.k_scale[:, :, :n // g], self.k_min[:, :, :n // g],
                self.vq[:, :, :n], self.v_scale[:, :, :n], self.v_min[:, :, :n],
                self.k_res[:, :, :self.n_res], self.v_res[:, :, :self.n_res])

    def attention(self, q: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        from . import kv_decode_attention

        return kv_decode_attention(q, *self.tensors(), self.bits, self.group, sm_scale)
