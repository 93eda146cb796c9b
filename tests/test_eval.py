import math

import pytest
import torch

from qft.eval import EvalProtocol, evaluate, heldout_selfgen, read_text, windows_from_text
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


def test_windows_follow_protocol():
    tok = tiny_tokenizer()
    ids = tok(SAMPLE_TEXT, add_special_tokens=False).input_ids
    w = windows_from_text(tok, SAMPLE_TEXT, EvalProtocol(seq_len=64, n_windows=3))
    assert w.shape == (3, 64)
    assert w[1].tolist() == ids[64:128]  # non-overlapping, from the start, no BOS
    w2 = windows_from_text(tok, SAMPLE_TEXT, EvalProtocol(seq_len=64, n_windows=3, stride=32))
    assert w2[1].tolist() == ids[32:96]


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has \d+ tokens: too short for 20 window\(s\) of 512"):
        windows_from_text(tiny_tokenizer(), "hello world", EvalProtocol(), source="tiny.txt")


@pytest.mark.parametrize("kw", [dict(seq_len=1), dict(n_windows=-1), dict(batch_size=0), dict(stride=0)])
def test_bad_protocol(kw):
    with pytest.raises(ValueError, match="EvalProtocol"):
        EvalProtocol(**kw)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "e.txt")


def test_perplexity_matches_manual_nll_and_kl_to_self_is_zero():
    m, tok = tiny_llama(), tiny_tokenizer()
    w = windows_from_text(tok, SAMPLE_TEXT, EvalProtocol(seq_len=32, n_windows=3))
    r = evaluate(m, w, teacher=m, batch_size=2, progress=False)
    with torch.no_grad():
        logits = m(w).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert math.isclose(r["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert abs(r["kl"]) < 1e-6 and r["tokens"] == 3 * 31


def test_kl_positive_for_a_different_model():
    tok = tiny_tokenizer()
    w = windows_from_text(tok, SAMPLE_TEXT, EvalProtocol(seq_len=32, n_windows=2))
    r = evaluate(tiny_llama(seed=1), w, teacher=tiny_llama(seed=0), progress=False)
    assert r["kl"] > 0


def test_heldout_selfgen_is_seeded():
    m, tok = tiny_llama(), tiny_tokenizer()
    a = heldout_selfgen(m, tok, n_seqs=3, seq_len=16, seed=7, batch_size=2, progress=False)
    b = heldout_selfgen(m, tok, n_seqs=3, seq_len=16, seed=7, batch_size=2, progress=False)
    c = heldout_selfgen(m, tok, n_seqs=3, seq_len=16, seed=8, batch_size=2, progress=False)
    assert a.shape == (3, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a[:, 0].tolist()) & set(tok.all_special_ids)
