"""`qft eval --kv-bits`: perplexity with the KIVI cache in the loop, and its input errors."""

import json

import pytest

from qft.cli import main
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_kv")
    tiny_llama().save_pretrained(d)  # head_dim 16
    tiny_tokenizer().save_pretrained(d)
    (d / "text.txt").write_text(SAMPLE_TEXT)
    return d


def _eval(tiny_dir, *extra):
    return ["eval", "--model", str(tiny_dir), "--teacher", "none", "--text", str(tiny_dir / "text.txt"),
            "--seq-len", "96", "--n-windows", "2", "--json", *extra]


def test_eval_with_kivi_cache(tiny_dir, capsys):
    assert main(_eval(tiny_dir)) == 0
    fp = json.loads(capsys.readouterr().out)["ppl"]
    # everything inside the full-precision window: the same perplexity as the plain forward
    assert main(_eval(tiny_dir, "--kv-bits", "2", "--kv-group-size", "8", "--kv-residual", "96")) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["ppl"] - fp) / fp < 1e-4 and same["kv"]["quantized_tokens"] == 0
    res = {}
    for bits in (2, 4):
        assert main(_eval(tiny_dir, "--kv-bits", str(bits), "--kv-group-size", "8", "--kv-residual", "16")) == 0
        res[bits] = json.loads(capsys.readouterr().out)
        assert res[bits]["kv"]["bits"] == bits and res[bits]["kv"]["quantized_tokens"] == 80
    assert abs(res[2]["ppl"] - fp) > abs(res[4]["ppl"] - fp)  # 2-bit codes move it more than 4-bit ones
    assert res[2]["kv"]["bytes"] < res[4]["kv"]["bytes"] < res[4]["kv"]["fp16_bytes"]
    assert main(["eval", "--model", str(tiny_dir), "--teacher", "none", "--text", str(tiny_dir / "text.txt"),
                 "--seq-len", "96", "--n-windows", "2", "--kv-bits", "4", "--kv-group-size", "8",
                 "--kv-residual", "16", "--kv-sink", "1", "--kv-pre-rope"]) == 0
    text = capsys.readouterr().out
    assert "KIVI KV4 cache in the loop" in text and "sink 1" in text and "% saved" in text


@pytest.mark.parametrize("argv,needle", [
    (["--kv-bits", "3"], "--kv-bits=3 is not valid; allowed: 2, 4"),
    (["--kv-bits", "8"], "--kv-bits=8 is not valid"),
    (["--kv-group-size", "8"], "--kv-group-size given without --kv-bits"),
    (["--kv-bits", "2", "--kv-group-size", "0"], "--kv-group-size=0 is not valid"),
    (["--kv-bits", "2", "--kv-residual", "-1"], "--kv-residual=-1 is not valid"),
    (["--kv-bits", "2", "--kv-chunk", "0"], "--kv-chunk=0 is not valid"),
    (["--kv-bits", "2", "--kv-group-size", "12"], "group_size=12 does not divide head_dim=16"),
])
def test_eval_kv_bad_values(tiny_dir, capsys, argv, needle):
    assert main(_eval(tiny_dir, *argv)) == 2
    assert needle in capsys.readouterr().err
