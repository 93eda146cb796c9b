"""Per-layer output error of the AWQ variants against GPTQ on SmolLM2-135M (why a bar holds or not).

For a few decoder blocks (float model inputs, N x 512-token windows of wikitext-2 valid.txt), each
linear group (q/k/v stacked, o, gate/up stacked, down) is quantized by every quantizer below and
scored by its output error on all calibration tokens, tr(D H D^T) / tr(W H W^T) (D = W - Q):

  rtn            min-max round-to-nearest
  rtn+asym       BitDistiller's asymmetric clip search, then RTN
  awq            AWQ scales (RTN inside the search), then the asymmetric clip, RTN
  awq-final      AWQ scales searched with the clip + RTN inside the search
  gptq           GPTQ (act-order, diag(H)-weighted group grid, 1% dampening)
  awq-gptq-final AWQ scales searched with GPTQ inside the search (alpha grid of 10)

  python benchmarks/bench_awq_layer_errors.py --blocks 0 10 20 29 --n-calib 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    a = ap.parse_args()
    from qft.models import load_model
    from qft.ptq.awq import _gqa_layout, _scale_groups
    from qft.ptq.awq_search import asym_clip_qparams, hessian_error, qdq, scaled_hessian, search_scale
    from qft.ptq.calibrate import calib_windows, sequential
    from qft.ptq.gptq import gptq_quantize
    from qft.spec import QuantSpec
    model, tok = load_model("smollm2-135m")
    calib = calib_windows(tok, DATA / "wikitext-2" / "valid.txt", n=a.n_calib, seq_len=512)
    spec = QuantSpec(bits=a.bits, group_size=64, symmetric=False)
    b, gs, sym = spec.bits, 64, False
    rows = []

    def clip_rtn(Ws, H):
        return qdq(Ws, b, gs, sym, *asym_clip_qparams(Ws, H, spec))

    def gptq(Ws, H, s=None):
        Hs, damp = scaled_hessian(H, s, 0.01, True)
        return gptq_quantize(Ws, Hs, b, gs, sym, damp, clip_grid=20).w_q

    @torch.no_grad()
    def process(ctx):
        if ctx.index not in a.blocks:
            return
        stats = ctx.collect(hessian=True, absmean=True)
        for prev, lins, kind in _scale_groups(ctx.block):
            st = stats[lins[0]]
            W = torch.cat([ctx.block.get_submodule(n).weight.float() for n in lins])
            H = st.H
            tie = None
            if kind == "v_o":
                n_kv, rep, hd = _gqa_layout(ctx.block, prev, lins[0])
                def tie(s, n_kv=n_kv, rep=rep, hd=hd):
                    return s.view(n_kv, rep, hd).mean(1, keepdim=True).expand(n_kv, rep, hd).reshape(-1)

            def err(Wq):
                return hessian_error(W, Wq, H)
            ref = float(((W @ H) * W).sum())

            def search(quant, grid=20):
                s, alpha, _ = search_scale(None, st.mean_abs, W, b, gs, sym, grid, tie=tie, quantize=quant, error=err)
                return s, alpha
            s_rtn, al_rtn = search(None)
            s_fin, al_fin = search(lambda Ws, s: clip_rtn(Ws, H / torch.outer(s, s)))
            s_g, al_g = search(lambda Ws, s: gptq(Ws, H, s), grid=10)
            r = {"rtn": err(qdq(W, b, gs, sym)), "rtn+asym": err(clip_rtn(W, H)),
                 "awq": err(clip_rtn(W * s_rtn, H / torch.outer(s_rtn, s_rtn)) / s_rtn),
                 "awq-final": err(clip_rtn(W * s_fin, H / torch.outer(s_fin, s_fin)) / s_fin),
                 "gptq": err(gptq(W, H)), "awq-gptq-final": err(gptq(W * s_g, H, s_g) / s_g)}
            name = "+".join(n.rpartition(".")[2] for n in lins)
            rows.append((ctx.index, name, al_rtn, al_fin, al_g, {k: v / ref for k, v in r.items()}))
            print(rows[-1], flush=True)

    sequential(model, calib, spec, process, desc="layer errors")
    keys = list(rows[0][-1])
    print(f"\nSmolLM2-135M w{b}g64, {a.n_calib} x 512 calibration windows (float inputs), output error "
          "tr(D H D^T) / tr(W H W^T) in units of 1e-3; alpha: rtn-search / final-search / gptq-search")
    print("| block | linears | alpha | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for i, name, a1, a2, a3, r in rows:
        cells = " | ".join(f"{1e3 * r[k]:.2f}" for k in keys)
        print(f"| {i} | {name} | {a1:.2f} / {a2:.2f} / {a3:.2f} | {cells} |")


if __name__ == "__main__":
    main()
