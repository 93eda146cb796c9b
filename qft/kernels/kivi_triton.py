"""KIVI quantized KV cache in Triton: quantize-on-append and split-K decode attention.

Layout (per layer; see ``reference.kivi_quantize_keys`` / ``kivi_quantize_values``):
keys and values are packed along head_dim, ``D*bits/32`` int32 words per token. Keys are
quantized per channel over groups of ``G`` tokens (scale/min ``[.., T/G, D]``), values per token
over groups of ``G`` channels (scale/min ``[.., T, D/G]``); dequant is ``q * scale + min``.

* ``_quant_kernel``: one program per (head, G-token block): min/max per channel (keys) and per
  channel group (values), scales rounded to the storage dtype first, integers, pack, store.
* ``_decode_kernel`` (flash-decoding): programs over (batch x query head, token split). Values
  are unpacked without int->float conversions (``wq_triton._unit_floats``: ``f = 1 + q/U``), so
  ``k = (U s) f + (min - U s)``. Per G-token tile: the key scale is folded into q once
  (``score_t = sum_d (q U s_k)[d] f[t, d] + const``), online softmax in base 2 with the
  accumulators rescaled only when the running max moves, and values accumulated per element
  (``acc[t, d] += p_t U s_v[t, g] f[t, d]``; the min terms per packed word) and reduced over
  tokens once at the end. The last split also covers the full-precision window. Partial
  (m, l, o) go to a small ``_combine_kernel``.

Simplifications: one program per query head (GQA heads re-read their KV head through L2);
the tile is exactly one key group (``G`` tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import alloc, next_pow2
from .wq_triton import _unit_floats


@triton.jit
def _quant_kernel(k_ptr, v_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr,
                  H, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                  sq_h, sks_h, svs_h, t_out,
                  BITS: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """Quantize G tokens of one head. Source k/v [B, H, T, D] (strided); destination buffers are
    [B*H, Tcap, *] contiguous per head, written at token t_out + blk*G."""
    ph = tl.program_id(0)
    blk = tl.program_id(1)
    b = ph // H
    h = ph % H
    VPW: tl.constexpr = 32 // BITS
    DW: tl.constexpr = D // VPW
    NG: tl.constexpr = D // G
    QMAX: tl.constexpr = (1 << BITS) - 1
    rt = tl.arange(0, G)
    rd = tl.arange(0, D)
    tok = blk * G + rt
    dt = ks_ptr.dtype.element_ty
    sh = (tl.arange(0, VPW) * BITS)[None, None, :]
    t_dst = t_out + blk * G + rt
    # ---- keys: per channel over the G tokens
    k = tl.load(k_ptr + b * sk_b + h * sk_h + tok[:, None] * sk_t + rd[None, :]).to(tl.float32)
    mn = tl.min(k, axis=0)
    s = tl.maximum((tl.max(k, axis=0) - mn) / QMAX, 1e-6)
    mn = mn.to(dt).to(tl.float32)
    s = s.to(dt).to(tl.float32)
    q = tl.floor((k - mn[None, :]) / s[None, :] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
    words = tl.sum(tl.reshape(q, (G, DW, VPW)) << sh, axis=2)
    rw = tl.arange(0, DW)
    tl.store(kq_ptr + ph * sq_h + t_dst[:, None] * DW + rw[None, :], words)
    g_out = t_out // G + blk
    tl.store(ks_ptr + ph * sks_h + g_out * D + rd, s.to(dt))
    tl.store(km_ptr + ph * sks_h + g_out * D + rd, mn.to(dt))
    # ---- values: per token over groups of G channels
    v = tl.load(v_ptr + b * sv_b + h * sv_h + tok[:, None] * sv_t + rd[None, :]).to(tl.float32)
    v3 = tl.reshape(v, (G, NG, G))
    vmn = tl.min(v3, axis=2)
    vs = tl.maximum((tl.max(v3, axis=2) - vmn) / QMAX, 1e-6)
    vmn = vmn.to(dt).to(tl.float32)
    vs = vs.to(dt).to(tl.float32)
    qv = tl.floor((v3 - vmn[:, :, None]) / vs[:, :, None] + 0.5)
    qv = tl.minimum(tl.maximum(qv, 0.0), QMAX).to(tl.int32)
    vwords = tl.sum(tl.reshape(qv, (G, DW, VPW)) << sh, axis=2)
    tl.store(vq_ptr + ph * sq_h + t_dst[:, None] * DW + rw[None, :], vwords)
    rg = tl.arange(0, NG)
    tl.store(vs_ptr + ph * svs_h + t_dst[:, None] * NG + rg[None, :], vs.to(dt))
    tl.store(vm_ptr + ph * svs_h + t_dst[:, None] * NG + rg[None, :], vmn.to(dt))


def quantize_into(k, v, kq, ks, km, vq, vs, vm, t_out: int, bits: int, group: int):
    """Quantize k, v [B, H, T, D] (T % group == 0) into per-head buffers at token t_out.

    Buffers: kq/vq [B, H, Tcap, D*bits/32], ks/km [B, H, Tcap/G, D], vs/vm [B, H, Tcap, D/G]
    (each contiguous)."""
    b, h, t, d = k.shape
    _quant_kernel[(b * h, t // group)](
        k, v, kq, ks, km, vq, vs, vm, h, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kq.stride(1), ks.stride(1), vs.stride(1), t_out,
        BITS=bits, D=d, G=group)


@triton.jit
def _decode_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, kr_ptr, vr_ptr,
                   o_ptr, ml_ptr,
                   Hq, HKV, REP, n_q, n_res, tps, S, sm_scale,
                   sq_b, sq_h, skq_b, skq_h, sks_b, sks_h, svs_b, svs_h, skr_b, skr_h, skr_t,
                   svr_b, svr_h, svr_t,
                   BITS: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """Tiles of G tokens (one key group). Head dims are kept in packed-word order: d = w*VPW + j
    (lo half, j < H) and w*VPW + H + j (hi half), so unpacked values never leave their thread.
    k = (U s) f + (min - U s) and v likewise, with f = 1 + q / U from ``_unit_floats``."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // Hq
    hq = pid % Hq
    hk = hq // REP
    VPW: tl.constexpr = 32 // BITS
    DW: tl.constexpr = D // VPW
    H: tl.constexpr = VPW // 2
    NG: tl.constexpr = D // G
    U: tl.constexpr = 1 << (7 + BITS)
    LOG2E: tl.constexpr = 1.4426950408889634
    rt = tl.arange(0, G)
    rw = tl.arange(0, DW)
    d_lo = rw[:, None] * VPW + tl.arange(0, H)[None, :]  # [DW, H]
    d_hi = d_lo + H
    gw = (rw * VPW) // G  # value channel group of each word
    qs = sm_scale * LOG2E
    q_lo = tl.load(q_ptr + b * sq_b + hq * sq_h + d_lo).to(tl.float32) * qs
    q_hi = tl.load(q_ptr + b * sq_b + hq * sq_h + d_hi).to(tl.float32) * qs
    m_i = tl.max(tl.full([G], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([G], tl.float32), axis=0)
    acc_lo = tl.zeros([G, DW, H], dtype=tl.float32)
    acc_hi = tl.zeros([G, DW, H], dtype=tl.float32)
    acc_b = tl.zeros([G, DW], dtype=tl.float32)
    kq_base = kq_ptr + b * skq_b + hk * skq_h
    vq_base = vq_ptr + b * skq_b + hk * skq_h
    ks_base = ks_ptr + b * sks_b + hk * sks_h
    km_base = km_ptr + b * sks_b + hk * sks_h
    vs_base = vs_ptr + b * svs_b + hk * svs_h
    vm_base = vm_ptr + b * svs_b + hk * svs_h
    t_lo = sid * tps
    t_hi = tl.minimum(t_lo + tps, n_q)
    t_last = t_lo + ((t_hi - t_lo - 1) // G) * G
    first = ((t_lo + rt) < t_hi)[:, None]
    kw_cur = tl.load(kq_base + (t_lo + rt)[:, None] * DW + rw[None, :], mask=first, other=0)
    vw_cur = tl.load(vq_base + (t_lo + rt)[:, None] * DW + rw[None, :], mask=first, other=0)
    for t0 in range(t_lo, t_hi, G):
        tok = t0 + rt
        tn = tl.minimum(t0 + G, t_last) + rt  # prefetch the next tile's packed words
        kw_nxt = tl.load(kq_base + tn[:, None] * DW + rw[None, :])
        vw_nxt = tl.load(vq_base + tn[:, None] * DW + rw[None, :])
        # ---- keys: per-channel scale of this token group folded into q
        f_lo, f_hi = _unit_floats(kw_cur, BITS)
        g = t0 // G
        a_lo = tl.load(ks_base + g * D + d_lo).to(tl.float32) * U
        a_hi = tl.load(ks_base + g * D + d_hi).to(tl.float32) * U
        c = tl.sum(tl.sum(q_lo * (tl.load(km_base + g * D + d_lo).to(tl.float32) - a_lo), axis=1), axis=0) + \
            tl.sum(tl.sum(q_hi * (tl.load(km_base + g * D + d_hi).to(tl.float32) - a_hi), axis=1), axis=0)
        scores = tl.sum(tl.sum(f_lo * (q_lo * a_lo)[None, :, :] + f_hi * (q_hi * a_hi)[None, :, :], axis=2),
                        axis=1) + c
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        if m_new > m_i:  # rescale only when the running max moves
            alpha = tl.exp2(m_i - m_new)
            acc_lo = acc_lo * alpha
            acc_hi = acc_hi * alpha
            acc_b = acc_b * alpha
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(scores - m_i)
        l_i += tl.sum(p, axis=0)
        # ---- values: per-token scale of each channel group
        fv_lo, fv_hi = _unit_floats(vw_cur, BITS)
        av = tl.load(vs_base + tok[:, None] * NG + gw[None, :]).to(tl.float32) * U  # [G, DW]
        bv = tl.load(vm_base + tok[:, None] * NG + gw[None, :]).to(tl.float32) - av
        pa = (p[:, None] * av)[:, :, None]
        acc_lo += pa * fv_lo
        acc_hi += pa * fv_hi
        acc_b += p[:, None] * bv
        kw_cur = kw_nxt
        vw_cur = vw_nxt
    if sid == S - 1:  # the full-precision window, G tokens at a time
        for r0 in range(0, n_res, G):
            tok = r0 + rt
            tm = (tok < n_res)[:, None, None]
            kr = kr_ptr + b * skr_b + hk * skr_h + tok[:, None, None] * skr_t
            k_lo = tl.load(kr + d_lo[None, :, :], mask=tm, other=0.0).to(tl.float32)
            k_hi = tl.load(kr + d_hi[None, :, :], mask=tm, other=0.0).to(tl.float32)
            scores = tl.sum(tl.sum(k_lo * q_lo[None, :, :] + k_hi * q_hi[None, :, :], axis=2), axis=1)
            scores = tl.where(tok < n_res, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp2(m_i - m_new)
            acc_lo = acc_lo * alpha
            acc_hi = acc_hi * alpha
            acc_b = acc_b * alpha
            l_i = l_i * alpha
            m_i = m_new
            p = tl.exp2(scores - m_i)
            l_i += tl.sum(p, axis=0)
            vr = vr_ptr + b * svr_b + hk * svr_h + tok[:, None, None] * svr_t
            acc_lo += p[:, None, None] * tl.load(vr + d_lo[None, :, :], mask=tm, other=0.0).to(tl.float32)
            acc_hi += p[:, None, None] * tl.load(vr + d_hi[None, :, :], mask=tm, other=0.0).to(tl.float32)
    ob = tl.sum(acc_b, axis=0)[:, None]
    out = o_ptr + (pid * S + sid) * D
    tl.store(out + d_lo, tl.sum(acc_lo, axis=0) + ob)
    tl.store(out + d_hi, tl.sum(acc_hi, axis=0) + ob)
    tl.store(ml_ptr + (pid * S + sid) * 2, m_i)
    tl.store(ml_ptr + (pid * S + sid) * 2 + 1, l_i)


@triton.jit
def _combine_kernel(o_ptr, ml_ptr, out_ptr, S, D: tl.constexpr, SP: tl.constexpr):
    pid = tl.program_id(0)
    rs = tl.arange(0, SP)
    sm = rs < S
    m = tl.load(ml_ptr + (pid * S + rs) * 2, mask=sm, other=float("-inf"))
    l = tl.load(ml_ptr + (pid * S + rs) * 2 + 1, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(sm & (m > float("-inf")), tl.exp2(m - mx), 0.0)
    rd = tl.arange(0, D)
    o = tl.load(o_ptr + (pid * S + rs[:, None]) * D + rd[None, :], mask=sm[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + pid * D + rd, res.to(out_ptr.dtype.element_ty))


OVERRIDE: dict = {}


def decode_attention(q, kq, ks, km, vq, vs, vm, k_res, v_res, bits: int, group: int, sm_scale=None):
    """Same contract as ``reference.kv_decode_attention``; inner dims must be contiguous."""
    bsz, hq, d = q.shape
    hkv = kq.shape[1]
    n_q = kq.shape[2]
    n_res = k_res.shape[2]
    sm_scale = float(sm_scale if sm_scale is not None else d ** -0.5)
    if n_q % group:
        raise ValueError(f"quantized part holds {n_q} tokens, not a multiple of group={group}")
    for name, t in (("kq", kq), ("vq", vq), ("ks", ks), ("km", km), ("vs", vs), ("vm", vm)):
        if t.stride(3) != 1 or t.stride(2) != t.shape[3]:
            raise ValueError(f"{name} must be contiguous within a head")
    if ks.stride(0) != km.stride(0) or ks.stride(1) != km.stride(1) or kq.stride()[:2] != vq.stride()[:2] \
            or vs.stride()[:2] != vm.stride()[:2]:
        raise ValueError("kq/vq, ks/km and vs/vm must share strides")
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    if "tps" in OVERRIDE:
        tps = OVERRIDE["tps"]
    else:
        # enough programs to keep ~16 warps per SM busy (decode is latency-bound otherwise)
        splits = max(1, (OVERRIDE.get("programs_per_sm", 8) * sms) // (bsz * hq))
        tps = max(2 * group, triton.cdiv(triton.cdiv(max(n_q, 1), splits), group) * group)
    n_split = max(1, triton.cdiv(n_q, tps))
    o = alloc((bsz * hq, n_split, d), torch.float32, q.device)
    ml = alloc((bsz * hq, n_split, 2), torch.float32, q.device)
    _decode_kernel[(bsz * hq, n_split)](
        q, kq, ks, km, vq, vs, vm, k_res, v_res, o, ml,
        hq, hkv, hq // hkv, n_q, n_res, tps, n_split, sm_scale,
        q.stride(0), q.stride(1), kq.stride(0), kq.stride(1), ks.stride(0), ks.stride(1),
        vs.stride(0), vs.stride(1), k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        BITS=bits, D=d, G=group, num_warps=OVERRIDE.get("num_warps", 2))
    out = alloc((bsz, hq, d), q.dtype, q.device)
    _combine_kernel[(bsz * hq,)](o, ml, out, n_split, D=d, SP=max(2, next_pow2(n_split)))
    return out
