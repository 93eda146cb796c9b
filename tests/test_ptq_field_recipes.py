"""`qft ptq --recipe` for the ten PTQ-field recipes, end to end on a tiny model saved to disk:
quantize with the recipe's settings -> export (format chosen by the method) -> reload and evaluate
in the same command -> `qft eval` and `qft info` on the export, the same perplexity.

The model, calibration text and window sizes are overridden on the command line (flags win over
the recipe); everything else (method, spec, options, format) comes from the recipe file.
"""

import json
from pathlib import Path

import pytest
import yaml

from qft.cli import _recipe_defaults, main
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m"
FIELD = ["owq", "spqr", "squeezellm", "quip", "lutgemm", "rptq", "olive", "osplus", "llm_fp4", "wkvquant"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    # 384 = 2 x 192 (LUT-GEMM's group), head_dim 64 (WKVQuant's group of 32)
    tiny_llama(hidden=384, heads=6, kv_heads=2, intermediate=768, layers=1).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    (d / "text.txt").write_text(SAMPLE_TEXT)
    return d


@pytest.mark.parametrize("name", FIELD)
def test_recipe_end_to_end(tiny_dir, tmp_path, capsys, name):
    recipe = RECIPES / f"{name}.yaml"
    r = yaml.safe_load(recipe.read_text())
    text = str(tiny_dir / "text.txt")
    out = tmp_path / "q"
    small = ["--model", str(tiny_dir), "--calib", text, "--calib-n", "2", "--calib-seq-len", "64",
             "--text", text, "--seq-len", "64", "--n-windows", "2", "--out", str(out), "--max-new-tokens", "2"]
    assert main(["ptq", "--recipe", str(recipe), "--eval", *small]) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    ppl_ptq = float(printed.split(f"{r['ptq']['method']} ")[1].split(":")[1].split()[0])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qft"
    report = json.loads((out / "qft_report.json").read_text())
    assert report["options"] == r["ptq"]["options"]  # the recipe's options were used
    assert main(["eval", "--model", str(out), "--teacher", "none", "--text", text, "--seq-len", "64",
                 "--n-windows", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["ppl"] == pytest.approx(ppl_ptq, abs=5e-4)  # printed with 3 decimals
    assert main(["info", str(out), "--json"]) == 0
    inf = json.loads(capsys.readouterr().out)
    assert inf["quantized_layers"] > 0


def test_recipe_defaults_and_errors(tmp_path, capsys):
    d = _recipe_defaults(RECIPES / "owq.yaml")
    assert d["method"] == "owq" and d["recipe_quant"]["bits"] == 3 and d["recipe_options"]["col_fraction"] == 0.01875
    assert d["calib_n"] == 128 and d["out"] == "runs/smollm2-135m/owq-w3g64" and d["preset"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("ptq: {method: rtn}\nquantt: {bits: 3}\n")
    assert main(["ptq", "--recipe", str(bad)]) == 2
    assert "unknown section(s) ['quantt']" in capsys.readouterr().err
    assert main(["ptq", "--recipe", str(RECIPES / "kivi.yaml")]) == 2  # a KV recipe: no ptq section
    assert "no 'ptq' section" in capsys.readouterr().err
    assert main(["ptq", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "is not a file" in capsys.readouterr().err
