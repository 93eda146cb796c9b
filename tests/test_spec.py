import pytest

from qft.spec import PRESETS, QuantSpec, QuantSpecError, preset, resolve_spec


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(QuantSpecError, match=r"QuantSpec\.bits=.*allowed: an integer 1\.\.8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("field,value,allowed", [
    ("scheme", "int3", "int, nf, fp, sign"),
    ("format", "awq", "pack-quantized, gptq, qft"),
    ("group_size", 0, "positive integer"),
    ("act_granularity", "row", "token, tensor"),
    ("kv_bits", 1, "2..16"),
])
def test_bad_fields_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(QuantSpecError) as e:
        QuantSpec(**{field: value})
    assert f"QuantSpec.{field}={value!r}" in str(e.value) and allowed in str(e.value)


def test_scheme_bits_consistency():
    with pytest.raises(QuantSpecError, match="scheme='nf'"):
        QuantSpec(bits=3, scheme="nf")
    with pytest.raises(QuantSpecError, match="e2m1"):
        QuantSpec(bits=5, scheme="fp")
    assert QuantSpec(bits=4, scheme="nf").symmetric


def test_unknown_preset_lists_known():
    with pytest.raises(QuantSpecError) as e:
        preset("w5g7")
    assert "w4g64" in str(e.value) and "w5g7" in str(e.value)


def test_presets_valid_and_round_trip():
    for name, spec in PRESETS.items():
        assert QuantSpec.from_dict(spec.to_dict()) == spec, name
    assert resolve_spec("W4G64") == PRESETS["w4g64"]


def test_from_dict_rejects_unknown_field():
    with pytest.raises(QuantSpecError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 64})


def test_group_size_not_dividing_names_layer_and_choices():
    spec = QuantSpec(bits=4, group_size=128)
    with pytest.raises(QuantSpecError) as e:
        spec.check_layer("model.layers.0.mlp.up_proj", 576)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and "576" in msg and "128" in msg
    assert "32" in msg and "64" in msg and "192" in msg


def test_matches_targets_and_ignore():
    spec = QuantSpec(targets=("*proj",), ignore=("lm_head", "*.down_proj"))
    assert spec.matches("model.layers.0.self_attn.q_proj")
    assert not spec.matches("model.layers.0.mlp.down_proj")
    assert not spec.matches("lm_head")
