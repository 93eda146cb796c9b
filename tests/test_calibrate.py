"""Shared layer-by-layer calibration: capture, sequential driver, bad inputs."""

import pytest
import torch
from torch import nn

from qft.ptq.calibrate import calib_windows, capture_block_inputs, find_layers, sequential
from qft.spec import QuantSpec, QuantSpecError
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p


@pytest.fixture(scope="module")
def calib(text_file):
    return calib_windows(tiny_tokenizer(), text_file, n=6, seq_len=48)


def test_calib_windows_shape_and_content(text_file, calib):
    tok = tiny_tokenizer()
    assert calib.shape == (6, 48) and calib.dtype == torch.long
    ids = tok(SAMPLE_TEXT, add_special_tokens=False).input_ids
    assert calib[1].tolist() == ids[48:96]  # consecutive windows, no BOS


def test_calib_file_too_short(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("only a few words here")
    with pytest.raises(ValueError, match=r"short\.txt.*too short.*calibration needs n \* seq_len = 8192"):
        calib_windows(tiny_tokenizer(), p, n=16, seq_len=512)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calib_windows(tiny_tokenizer(), tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="seq_len=1 is not valid"):
        calib_windows(tiny_tokenizer(), p, n=1, seq_len=1)


def test_model_without_layers(calib):
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="model without the expected layers: NoLayers has none of model.layers"):
        find_layers(NoLayers())
    with pytest.raises(ValueError, match="model without the expected layers"):
        sequential(NoLayers(), calib, QuantSpec(), lambda ctx: None)


def test_group_size_that_does_not_fit_leaves_model_untouched(calib):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantSpecError, match=r"group_size=48 does not divide in_features=64 of layer 'model.layers.0"):
        sequential(model, calib, QuantSpec(bits=4, group_size=48), lambda ctx: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_calib_tensor():
    with pytest.raises(ValueError, match="calib must be a LongTensor"):
        sequential(tiny_llama(), torch.randn(2, 8), QuantSpec(), lambda ctx: None)


def test_block_outputs_equal_hidden_states_when_nothing_is_quantized(calib):
    model = tiny_llama(layers=3)
    with torch.no_grad():
        ref = model(input_ids=calib, output_hidden_states=True).hidden_states  # embeddings, block outputs...
    seen = []

    def record(ctx):
        seen.append(torch.cat(ctx.inputs))
    sequential(model, calib, QuantSpec(bits=8, group_size=32), record, batch_size=4)
    assert len(seen) == 3
    for i in range(3):  # the input of block i is hidden_states[i]
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-5, atol=1e-5)
    hidden, kwargs = capture_block_inputs(model, calib, "cpu", batch_size=4)
    assert len(hidden) == 2 and "position_embeddings" in kwargs[0]


def test_collect_shares_stats_and_matches_inputs(calib):
    model = tiny_llama()
    got = {}

    def grab(ctx):
        if ctx.index == 0:
            got["stats"] = ctx.collect(hessian=True, absmean=True, absmax=True, store_tokens=64)
            x = torch.cat(ctx.inputs).reshape(-1, 64)
            got["x"] = ctx.block.input_layernorm(x)
    sequential(model, calib, QuantSpec(bits=8, group_size=32), grab, batch_size=4)
    st = got["stats"]
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
    assert st["mlp.gate_proj"] is st["mlp.up_proj"] and st["mlp.down_proj"] is not st["mlp.up_proj"]
    q = st["self_attn.q_proj"]
    x = got["x"]
    assert q.count == x.shape[0] and q.tokens.shape == (64, 64)
    torch.testing.assert_close(q.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.mean_abs, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.absmax, x.abs().amax(0))


def test_linears_outside_blocks_are_rounded(calib):
    model = tiny_llama()
    sequential(model, calib, QuantSpec(bits=4, group_size=32, ignore=()), lambda ctx: None)
    from qft.nn import QuantLinear
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # the method did nothing there
