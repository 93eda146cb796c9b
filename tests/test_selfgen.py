"""LLM-QAT self-generated data: structure, sampling, determinism, resumability (kill + resume), CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qft.testing import tiny_llama, tiny_tokenizer
from qft.train.selfgen import (SelfGenConfig, SelfGenError, filter_probs, read_selfgen, sample_inverse_cdf,
                               scan_records, selfgen)

CFG = dict(n=10, seq_len=24, batch_size=4, seed=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads on a busy 2-core box are 50x slower
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_tok():
    return tiny_llama(), tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_tok):
    d = tmp_path_factory.mktemp("tiny")
    model_tok[0].save_pretrained(d)
    model_tok[1].save_pretrained(d)
    return d


def test_structure_first_greedy_sampled(model_tok, tmp_path):
    model, tok = model_tok
    out = selfgen(model, tok, tmp_path / "s.jsonl", SelfGenConfig(**CFG), progress=False)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["idx"] for r in recs] == list(range(10))
    special = set(tok.all_special_ids)
    greedy_counts = set()
    sampled_differs = 0
    for r in recs:
        ids = torch.tensor(r["input_ids"])
        assert len(ids) == 24 and not (set(ids.tolist()) & special)
        g = r["n_greedy"]
        assert 3 <= g <= 5
        greedy_counts.add(g)
        logits = model(ids[None]).logits[0]
        logits[:, sorted(special)] = float("-inf")
        argmax = logits.argmax(-1)
        assert torch.equal(argmax[:g], ids[1:g + 1]), "tokens 1..n_greedy must be greedy"
        sampled_differs += int((argmax[g:-1] != ids[g + 1:]).sum())
    assert sampled_differs > 0, "the sampled part never left the greedy path"
    assert len(greedy_counts) > 1, "the greedy count should vary per sequence"


def test_seeded_deterministic(model_tok, tmp_path):
    model, tok = model_tok
    a = selfgen(model, tok, tmp_path / "a.jsonl", SelfGenConfig(**CFG), progress=False).read_bytes()
    b = selfgen(model, tok, tmp_path / "b.jsonl", SelfGenConfig(**CFG), progress=False).read_bytes()
    c = selfgen(model, tok, tmp_path / "c.jsonl", SelfGenConfig(**{**CFG, "seed": 4}), progress=False).read_bytes()
    assert a == b and a != c


def test_top_k1_is_fully_greedy(model_tok, tmp_path):
    model, tok = model_tok
    out = selfgen(model, tok, tmp_path / "g.jsonl", SelfGenConfig(**{**CFG, "n": 3, "top_k": 1}), progress=False)
    for ids in read_selfgen(out):
        ids = torch.tensor(ids)
        logits = model(ids[None]).logits[0]
        logits[:, tok.all_special_ids] = float("-inf")
        assert torch.equal(logits.argmax(-1)[:-1], ids[1:])


def test_sampling_primitives():
    probs, ids = filter_probs(torch.log(torch.tensor([[0.2, 0.5, 0.3]])), 1.0, 0, 0.6)
    assert ids.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.0]]))
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(4, 1)
    pick = sample_inverse_cdf(p, torch.tensor([0.0, 0.05, 0.1, 0.999]))
    assert pick.tolist() == [0, 0, 2, 3]
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g)
    freq = torch.bincount(sample_inverse_cdf(p[:1].repeat(20000, 1), u), minlength=4).float() / 20000
    torch.testing.assert_close(freq, p[0], atol=0.015, rtol=0)


def test_truncated_tail_dropped_and_partial_batch_regenerated(model_tok, tmp_path):
    model, tok = model_tok
    cfg = SelfGenConfig(**CFG)
    ref = selfgen(model, tok, tmp_path / "ref.jsonl", cfg, progress=False).read_bytes()
    out = tmp_path / "r.jsonl"
    selfgen(model, tok, out, cfg, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # 5 records (a partial batch) + a cut line
    assert scan_records(out) == (5, len(b"".join(lines[:5])), True)
    with pytest.warns(UserWarning, match="truncated"):
        assert len(read_selfgen(out)) == 5
    with pytest.warns(UserWarning, match="truncated"):
        selfgen(model, tok, out, cfg, progress=False)
    assert out.read_bytes() == ref


def test_resume_refuses_other_settings_and_corruption(model_tok, tmp_path):
    model, tok = model_tok
    out = selfgen(model, tok, tmp_path / "s.jsonl", SelfGenConfig(**{**CFG, "n": 4}), progress=False)
    with pytest.raises(SelfGenError, match="seed=3.*seed=5"):
        selfgen(model, tok, out, SelfGenConfig(**{**CFG, "seed": 5}), progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "garbage\n" + "".join(lines[2:]))
    with pytest.raises(SelfGenError, match="line 2"):
        selfgen(model, tok, out, SelfGenConfig(**CFG), progress=False)


def test_extend_to_larger_n(model_tok, tmp_path):
    model, tok = model_tok
    ref = selfgen(model, tok, tmp_path / "ref.jsonl", SelfGenConfig(**CFG), progress=False).read_bytes()
    out = selfgen(model, tok, tmp_path / "s.jsonl", SelfGenConfig(**{**CFG, "n": 8}), progress=False)
    selfgen(model, tok, out, SelfGenConfig(**CFG), progress=False)
    assert out.read_bytes() == ref


@pytest.mark.parametrize("kw, field", [(dict(greedy_min=4, greedy_max=3), "greedy_max"), (dict(top_p=0.0), "top_p"),
                                       (dict(temperature=0), "temperature"), (dict(first_token="x"), "first_token"),
                                       (dict(seq_len=1), "seq_len"), (dict(n=0), "n")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(SelfGenError, match=rf"SelfGenConfig\.{field}="):
        SelfGenConfig(**kw)


KILLED_RUN = r"""
import sys, time, torch
torch.set_num_threads(1)
from qft.models import load_model
from qft.train.selfgen import SelfGenConfig, selfgen
model, tok = load_model(sys.argv[1])
cfg = SelfGenConfig(n=24, seq_len=24, batch_size=4, seed=3)
selfgen(model, tok, sys.argv[2], cfg, model_id="tiny", progress=False, on_batch=lambda n: time.sleep(0.4))
"""


def test_killed_subprocess_resumes_without_duplicates(model_dir, tmp_path):
    from qft.models import load_model
    model, tok = load_model(str(model_dir))
    cfg = SelfGenConfig(n=24, seq_len=24, batch_size=4, seed=3)
    ref = selfgen(model, tok, tmp_path / "ref.jsonl", cfg, model_id="tiny", progress=False).read_bytes()
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(model_dir), str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n_before = out.read_bytes().count(b"\n")
    assert 8 <= n_before < 24
    selfgen(model, tok, out, cfg, model_id="tiny", progress=False)
    assert out.read_bytes() == ref  # same data, no duplicates, no truncated record
    assert [json.loads(l)["idx"] for l in out.read_text().splitlines()] == list(range(24))


def test_cli(model_dir, tmp_path, capsys):
    from qft.cli import main
    out = tmp_path / "cli.jsonl"
    rc = main(["selfgen", "--model", str(model_dir), "--n", "5", "--seq-len", "12", "--batch-size", "2",
               "--out", str(out), "--threads", "1"])
    assert rc == 0 and len(read_selfgen(out)) == 5
    assert "5 sequences x 12 tokens" in capsys.readouterr().out
    rc = main(["selfgen", "--model", str(model_dir), "--out", str(out), "--top-k", "-1"])
    assert rc == 2 and "--top-k=-1" in capsys.readouterr().err
