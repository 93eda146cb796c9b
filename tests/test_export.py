"""Export / load round trips, compressed-tensors loading in transformers, and bad checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qft.export import CheckpointError, info, load, save
from qft.nn import quant_linears, quantize_model
from qft.spec import QuantSpec
from qft.testing import tiny_llama, tiny_tokenizer


def _quantized(spec, tie=False, seed=0):
    m = quantize_model(tiny_llama(tie=tie, seed=seed), spec)
    return m


X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["qft", "pack-quantized"])
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=16, symmetric=True),
                                  QuantSpec(bits=8, group_size=None), QuantSpec(bits=2, group_size=32)])
@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_exact(tmp_path, fmt, spec, tie):
    m = _quantized(spec, tie)
    y = m(X).logits
    save(m, tmp_path / "ck", tiny_tokenizer(), format=fmt)
    r = load(tmp_path / "ck")
    assert all(q.state == "packed" for _, q in quant_linears(r))
    assert torch.equal(r(X).logits, y)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=16, scheme="nf"), QuantSpec(bits=1, scheme="sign", group_size=None)])
def test_native_format_holds_codebook_schemes(tmp_path, spec):
    m = _quantized(spec)
    y = m(X).logits
    with pytest.raises(ValueError, match="format='qft'"):
        save(m, tmp_path / "ct", format="pack-quantized")
    save(m, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(X).logits, y)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_quantized_loads_in_transformers(tmp_path, bits, symmetric):
    """compressed-tensors export -> AutoModelForCausalLM (with the compressed-tensors package) -> same logits."""
    m = _quantized(QuantSpec(bits=bits, group_size=32, symmetric=symmetric))
    y = m(X).logits
    save(m, tmp_path / "ck", tiny_tokenizer(), format="pack-quantized")
    torch.save(X, tmp_path / "x.pt")
    # a fresh interpreter: plain transformers (+ `import qft` for asymmetric: see qft/compat.py)
    code = textwrap.dedent(f"""
        import torch, sys
        {'import qft' if not symmetric else ''}
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        x = torch.load(sys.argv[2])
        torch.save(m(x).logits, sys.argv[3])
        print(type(m.model.layers[0].mlp.up_proj).__name__)
        """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck"), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    y2 = torch.load(tmp_path / "y.pt")
    assert torch.allclose(y2, y, atol=1e-4, rtol=1e-4), (y2 - y).abs().max()


def test_info_reports_bits_and_size(tmp_path):
    save(_quantized(QuantSpec(bits=4, group_size=32)), tmp_path / "ck", format="pack-quantized")
    i = info(tmp_path / "ck")
    # 4 bits + (fp32 scale + 4-bit packed zero) / 32 weights = 4 + 36/32
    assert abs(i["bits_per_weight"] - (4 + 36 / 32)) < 0.05
    assert i["quantized_layers"] == 14 and i["size_on_disk_bytes"] > 0


def test_refuses_non_empty_dir_without_overwrite(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    m = _quantized(QuantSpec(bits=4, group_size=32))
    with pytest.raises(FileExistsError, match="overwrite"):
        save(m, out)
    assert (out / "keep.txt").read_text() == "user data"
    save(m, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_interrupted_export_leaves_nothing_under_final_name(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save(_quantized(QuantSpec(bits=4, group_size=32)), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert not [p for p in tmp_path.iterdir()]  # temp dir cleaned up


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    m = _quantized(QuantSpec(bits=4, group_size=32))
    save(m, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import safetensors.torch as st
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save(_quantized(QuantSpec(bits=2, group_size=32)), tmp_path / "ck", overwrite=True)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


@pytest.fixture
def ckpt(tmp_path):
    save(_quantized(QuantSpec(bits=4, group_size=32)), tmp_path / "ck", format="qft")
    return tmp_path / "ck"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_truncated_weights(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted or truncated"):
        load(ckpt)


def test_corrupted_header(ckpt):
    f = ckpt / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8:40] = b"\x00" * 32
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load(ckpt)


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no weights"):
        load(ckpt)


def test_config_without_quantization_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json has no 'quantization_config'"):
        load(ckpt)


def test_corrupted_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(ckpt)


def test_wrong_tensor_shape(ckpt):
    from safetensors.torch import load_file, save_file
    t = load_file(ckpt / "model.safetensors")
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:, :1].contiguous()
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.scales' has shape"):
        load(ckpt)


def test_wrong_plain_tensor_shape(ckpt):
    from safetensors.torch import load_file, save_file
    t = load_file(ckpt / "model.safetensors")
    t["model.norm.weight"] = torch.ones(3)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit"):
        load(ckpt)


def test_missing_tensor(ckpt):
    from safetensors.torch import load_file, save_file
    t = load_file(ckpt / "model.safetensors")
    del t["model.layers.1.input_layernorm.weight"]
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors"):
        load(ckpt)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=32, scheme="nf"),
                                  QuantSpec(bits=3, group_size=16)])
def test_native_format_loads_in_transformers_after_import_qft(tmp_path, spec):
    import qft  # noqa: F401  (registers the "qft" quantizer lazily)
    from transformers import AutoModelForCausalLM
    from qft.nn import QuantLinear
    m = _quantized(spec, tie=True)
    y = m(X).logits
    save(m, tmp_path / "ck", format="qft")
    h = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(h.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(h(X).logits, y)
