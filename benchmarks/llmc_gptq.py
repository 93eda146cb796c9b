"""Peer run: llm-compressor's GPTQ on the same model and calibration windows (own venv).

Run with the llm-compressor venv's python, NOT qft's (the two stacks pin different versions):

    /work/venv-llmc/bin/python benchmarks/llmc_gptq.py --model ~/.cache/qft/models/smollm2-135m \
        --calib out/bench_ptq/calib.pt --bits 4 --group-size 64 --out out/bench_ptq/llmc-w4g64

``--calib`` is a torch file holding a LongTensor [n, seq_len] (written by bench_ptq_gptq.py), so
both tools see exactly the same token windows. Writes, under ``--out``:
  compressed/      the compressed-tensors checkpoint as llm-compressor saves it
  dense/           a float HF directory with every quantized weight replaced by its dequantized
                   value (what qft's evaluation loads in the qft venv)
  result.json      {"bits", "group_size", "time_s" (oneshot wall time), "levels_ok"}
"""

import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dampening", type=float, default=0.01)
    a = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(a.calib)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=a.bits, type="int", symmetric=False, strategy="group",
                                 group_size=a.group_size))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                          dampening_frac=a.dampening)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=windows.shape[1],
            num_calibration_samples=len(windows), shuffle_calibration_samples=False)
    elapsed = time.perf_counter() - t0
    print(f"llm-compressor GPTQ w{a.bits}g{a.group_size}: {elapsed:.1f} s", flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # dense copy: dequantized weights from the module's own qparams (compressed_tensors' fake quant)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    levels_ok = True
    dense = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_scale") and hasattr(mod, "quantization_scheme"):
            args = mod.quantization_scheme.weights
            zp = getattr(mod, "weight_zero_point", None)
            w = fake_quantize(mod.weight.data, mod.weight_scale.data, zp.data if zp is not None else None, args)
            dense[name + ".weight"] = w.detach().clone()
            g = w.reshape(w.shape[0], -1, a.group_size)
            nlev = max(len(torch.unique(g[r, c])) for r in range(0, g.shape[0], 97) for c in range(g.shape[1]))
            levels_ok &= nlev <= 2 ** a.bits
    model.save_pretrained(out / "compressed", save_compressed=True)
    tok.save_pretrained(out / "compressed")
    fp = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    sd = fp.state_dict()
    missing = [k for k in dense if k not in sd]
    if missing:
        raise SystemExit(f"quantized weights without a match in the float model: {missing[:5]}")
    with torch.no_grad():
        for k, v in dense.items():
            sd[k].copy_(v)
    fp.save_pretrained(out / "dense")
    tok.save_pretrained(out / "dense")
    (out / "result.json").write_text(json.dumps({"bits": a.bits, "group_size": a.group_size, "time_s": elapsed,
                                                 "n_quantized": len(dense), "levels_ok": bool(levels_ok)}))


if __name__ == "__main__":
    main()
