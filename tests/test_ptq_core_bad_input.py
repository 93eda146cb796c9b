"""Bad input named by the PTQ-core issue, across every calibrated method: a calibration file that
is too short, a model without the expected layers, a group size that does not fit, no calibration."""

import pytest
import torch
from torch import nn

from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.spec import QuantSpec, QuantSpecError
from qft.testing import tiny_llama, tiny_tokenizer

CALIBRATED = [("gptq", "w4g64", {}), ("awq", "w4g64", {}), ("awq_gptq", "w4g64", {}),
              ("smoothquant", "w8a8", {}), ("zeroquant", QuantSpec(bits=4, group_size=64, act_bits=8), {"lkd": True}),
              ("omniquant", "w4g64", {"steps": 1})]
GROUPED = [("gptq", {}), ("awq", {}), ("awq_gptq", {}), ("zeroquant", {}), ("omniquant", {"steps": 1})]
CALIB = torch.randint(0, 256, (2, 16))


class NoLayers(nn.Module):  # linears, but no decoder blocks to calibrate
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, input_ids=None, **kw):
        return self.proj(torch.zeros(input_ids.shape + (64,)))


@pytest.mark.parametrize("method,spec,opts", CALIBRATED)
def test_model_without_the_expected_layers(method, spec, opts):
    with pytest.raises(ValueError, match="layers"):
        run(method, NoLayers(), spec, CALIB, **opts)


@pytest.mark.parametrize("method,spec,opts", CALIBRATED)
def test_no_calibration(method, spec, opts):
    with pytest.raises(ValueError, match="calib"):
        run(method, tiny_llama(), spec, None, **opts)


@pytest.mark.parametrize("method,opts", GROUPED)
def test_group_size_that_does_not_fit_leaves_the_model_untouched(method, opts):
    model = tiny_llama()  # in_features 64 and 128
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits=4, group_size=48, act_bits=8) if method == "zeroquant" else QuantSpec(bits=4, group_size=48)
    with pytest.raises(QuantSpecError, match=r"group_size=48 does not divide in_features=64"):
        run(method, model, spec, CALIB, **opts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_smollm2_shapes_group_128_does_not_fit():
    """SmolLM2's hidden size is 576 = 4.5 x 128: the error says so before any work."""
    model = tiny_llama(hidden=576, heads=9, kv_heads=3, intermediate=64, layers=1)
    with pytest.raises(QuantSpecError, match=r"group_size=128 does not divide in_features=576"):
        run("gptq", model, "w4g128", CALIB)


def test_calibration_file_too_short(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("a calibration text of a few words only. " * 20)
    with pytest.raises(ValueError, match=r"short\.txt.*too short.*calibration needs n \* seq_len = 65536"):
        calib_windows(tiny_tokenizer(), p, n=128, seq_len=512)
