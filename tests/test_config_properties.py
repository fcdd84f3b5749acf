"""Property-based tests of config_list validation: every input either resolves deterministically or raises
a ConfigError that names the entry index (and the key, where one key is at fault); an empty list is refused
as a whole."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixq import ConfigError, resolve_config
from mixq.config import KEYS as CONFIG_KEYS
from mixq.zoo.models import TorchModel

MODEL = TorchModel()
NAMES = ["conv1", "conv2", "fc1", "fc2", "fc3", "relu1", "relu3", "pool1", "fc9", "", "conv1.weight"]
TYPES = ["Conv2d", "Linear", "ReLU", "MaxPool2d", "default", "Conv3d", "BatchNorm2d", "linear"]
KEYS = [*CONFIG_KEYS, "op_type", "bits", ""]  # the valid keys and a few typos

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True), st.text(max_size=6))
quant_types = st.lists(st.sampled_from(["input", "weight", "output", "wieght"]), max_size=4)
bits = st.one_of(
    st.integers(0, 64), st.dictionaries(st.sampled_from(["input", "weight", "output"]), st.integers(0, 64))
)
value_for = {
    "quant_types": st.one_of(quant_types, junk),
    "quant_bits": st.one_of(bits, junk),
    "op_types": st.one_of(st.lists(st.sampled_from(TYPES), max_size=3), junk),
    "op_names": st.one_of(st.lists(st.sampled_from(NAMES), max_size=3), junk),
    "exclude": st.one_of(st.booleans(), junk),
    "quant_scheme": st.one_of(
        st.sampled_from(
            ["per_tensor_affine", "per_channel_symmetric", "per_tensor_symmetric", "per_channel_affine", "bogus"]
        ),
        junk,
    ),
    "quant_dtype": st.one_of(st.sampled_from(["int", "uint", "int8"]), junk),
    "quant_start_step": st.one_of(st.integers(-2, 10), junk),
    "observer": st.one_of(st.sampled_from(["minmax", "ema", "percentile", "entropy", "mse", "kl"]), junk),
    "quant_convention": st.one_of(st.sampled_from(["mixq", "nni", "tflite"]), junk),
}


@st.composite
def entry(draw):
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
    return {k: draw(value_for.get(k, junk)) for k in keys}


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(entry(), junk), max_size=4))
def test_every_config_list_resolves_or_names_entry_and_key(config_list):
    if not config_list:  # nothing to name an entry of: refused as a whole
        with pytest.raises(ConfigError, match=r"^config is empty: "):
            resolve_config(MODEL, config_list)
        return
    try:
        first = resolve_config(MODEL, config_list)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("config_list"), msg
        m = re.match(r"config_list\[(\d+)\](\['([^']*)'\])?: ", msg)
        if m:
            i = int(m.group(1))
            assert 0 <= i < len(config_list)
            if m.group(3) is not None:
                assert isinstance(config_list[i], dict), msg
                # the key is in the entry, except when the message says it is missing
                assert (m.group(3) in config_list[i]) != msg.endswith("missing (required unless 'exclude' is True)")
        else:
            assert msg.startswith("config_list must be a list of dicts"), msg
        return
    assert resolve_config(MODEL, config_list) == first  # deterministic
    for name, spec in first.items():
        assert name in dict(MODEL.named_modules())
        for t in spec.quant_types:
            assert 2 <= spec.spec(t).dtype.bits <= 16


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["conv1", "conv2", "fc1", "fc2"]), min_size=1, max_size=6))
def test_duplicate_names_and_conflicting_entries_resolve_to_the_last(names):
    config = [{"quant_types": ["weight"], "quant_bits": 4 + i % 5, "op_names": [n]} for i, n in enumerate(names)]
    specs = resolve_config(MODEL, config)
    for n in set(names):
        last = max(i for i, m in enumerate(names) if m == n)
        assert specs[n].weight.dtype.bits == 4 + last % 5
