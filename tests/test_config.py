import pytest
from torch import nn

from mixq import ConfigError, IntType, PerChannel, PerTensor, QuantSpec, resolve_config
from mixq.zoo.models import TorchModel, create_model
from mixq.zoo.tutorial import TUTORIAL_CONFIG_LIST


def summary(specs):
    return {n: {t: s.spec(t).dtype.name for t in s.quant_types} for n, s in specs.items()}


def test_tutorial_config_resolves_like_nni():
    specs = resolve_config(TorchModel(), TUTORIAL_CONFIG_LIST)
    assert summary(specs) == {
        "conv1": {"input": "uint8", "weight": "int8"},
        "conv2": {"input": "uint8", "weight": "int8"},
        "fc1": {"input": "uint8", "weight": "int8"},
        "fc2": {"input": "uint8", "weight": "int8"},
        "relu1": {"output": "uint8"},
        "relu2": {"output": "uint8"},
        "relu3": {"output": "uint8"},
        "relu4": {"output": "uint8"},
    }
    assert specs["conv1"].weight == QuantSpec(IntType(8, True), True, PerChannel(0))
    assert specs["conv1"].input == QuantSpec(IntType(8, False), False, PerTensor())
    assert list(specs) == ["conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3", "relu4"]  # module order


@pytest.mark.parametrize(
    "config_list, expected",
    [
        # later entries win whole (no merging)
        (
            [
                {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
                {"quant_types": ["weight"], "quant_bits": 4, "op_names": ["fc2"]},
            ],
            {
                "fc1": {"input": "uint8", "weight": "int8"},
                "fc2": {"weight": "int4"},
                "fc3": {"input": "uint8", "weight": "int8"},
            },
        ),
        # exclude removes, wherever it comes after
        (
            [
                {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]},
                {"exclude": True, "op_names": ["conv1", "fc3"]},
            ],
            {n: {"weight": "int8"} for n in ("conv2", "fc1", "fc2")},
        ),
        # an entry after an exclude puts the module back
        (
            [
                {"exclude": True, "op_names": ["fc1"]},
                {"quant_types": ["weight"], "quant_bits": 6, "op_types": ["Linear"]},
            ],
            {n: {"weight": "int6"} for n in ("fc1", "fc2", "fc3")},
        ),
        # op_types and op_names both given: both must match
        (
            [{"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], "op_names": ["relu1", "fc1"]}],
            {"relu1": {"output": "uint8"}},
        ),
        # per-type bits, dtype and scheme dicts
        (
            [
                {
                    "quant_types": ["input", "weight"],
                    "quant_bits": {"input": 16, "weight": 4},
                    "quant_dtype": {"input": "int", "weight": "uint"},
                    "op_names": ["fc1"],
                }
            ],
            {"fc1": {"input": "int16", "weight": "uint4"}},
        ),
    ],
)
def test_resolution_table(config_list, expected):
    assert summary(resolve_config(TorchModel(), config_list)) == expected


def test_resolution_is_deterministic_and_specs_are_frozen():
    a = resolve_config(TorchModel(), TUTORIAL_CONFIG_LIST)
    b = resolve_config(TorchModel(), TUTORIAL_CONFIG_LIST)
    assert a == b
    with pytest.raises(AttributeError):
        a["conv1"].weight = None


def test_nested_module_names_and_start_step_and_observer():
    model = create_model("tiny_resnet")
    specs = resolve_config(
        model,
        [
            {
                "quant_types": ["output"],
                "quant_bits": 8,
                "op_names": ["layer1.0.relu1"],
                "quant_start_step": 5,
                "observer": "entropy",
            }
        ],
    )
    assert specs["layer1.0.relu1"].quant_start_step == 5
    assert specs["layer1.0.relu1"].observer == "entropy"


W8 = {"quant_types": ["weight"], "quant_bits": 8}


@pytest.mark.parametrize(
    "config_list, match",
    [
        ({"quant_types": ["weight"]}, "must be a list of dicts"),
        (["conv1"], r"config_list\[0\]: each entry must be a dict"),
        ([{**W8, "op_type": ["Conv2d"]}], r"config_list\[0\]\['op_type'\]: unknown key; did you mean 'op_types'"),
        ([{**W8}], r"config_list\[0\]: needs 'op_types' or 'op_names'"),
        (
            [{**W8, "op_types": ["Linear"]}, {**W8, "op_names": ["fc9"]}],
            r"config_list\[1\]\['op_names'\]: no module named 'fc9' in the model; did you mean 'fc",
        ),
        ([{**W8, "op_types": ["Conv3d"]}], r"config_list\[0\]\['op_types'\]: 'Conv3d' cannot be quantized"),
        (
            [{**W8, "op_types": ["Conv1d"]}],
            r"config_list selects no module of TorchModel \(module types present: \['Conv2d'",
        ),
        ([{**W8, "op_types": "Conv2d"}], r"must be a list of strings, got the string 'Conv2d'"),
        (
            [{"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Linear"]}],
            r"\['quant_bits'\]: bits must be in 2..16, got 1; 1-bit \(binary\) layers are BNN's",
        ),
        (
            [{"quant_types": ["weight"], "quant_bits": 32, "op_types": ["Linear"]}],
            "32 means float: leave the layer out of config_list",
        ),
        (  # NNI's QAT accepts 1..31, but nothing above 16 bits can be built into an engine, NNI's or mixq's
            [{"quant_types": ["weight"], "quant_bits": {"weight": 24}, "op_types": ["Linear"]}],
            r"got 24; NNI's QAT_Quantizer accepts up to 31 bits, but no engine .* builds 24-bit layers: use 16",
        ),
        ([{**W8, "op_types": ["Linear"], "quant_convention": "tflite"}], r"\['quant_convention'\]: unknown convention"),
        ([{"quant_types": ["weight"], "quant_bits": True, "op_types": ["Linear"]}], "bits must be an int"),
        (
            [{"quant_types": ["input", "weight"], "quant_bits": {"weight": 8}, "op_types": ["Linear"]}],
            r"has no value for quant type 'input'",
        ),
        (
            [{"quant_types": ["weight"], "quant_bits": {"weight": 8, "output": 8}, "op_types": ["Linear"]}],
            r"has a value for 'output'",
        ),
        ([{"quant_types": ["wieght"], "quant_bits": 8, "op_types": ["Linear"]}], r"unknown quant type 'wieght'"),
        ([{"quant_types": ["weight", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], "lists a type twice"),
        ([{"quant_types": ["weight"], "op_types": ["Linear"]}], r"\['quant_bits'\]: missing"),
        (
            [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["ReLU"]}],
            r"module 'relu1' \(ReLU\) has no weight",
        ),
        ([{**W8, "op_types": ["Linear"], "quant_scheme": "per_channel_sym"}], "unknown scheme 'per_channel_sym'"),
        (
            [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["Linear"], "quant_scheme": "per_channel_affine"}],
            "weights only",
        ),
        ([{**W8, "op_types": ["Linear"], "quant_dtype": "int8"}], "unknown dtype 'int8'"),
        ([{**W8, "op_types": ["Linear"], "quant_start_step": -1}], r"\['quant_start_step'\]: must be an int >= 0"),
        ([{**W8, "op_types": ["Linear"], "observer": "kl"}], r"\['observer'\]: unknown observer 'kl'"),
        ([{**W8, "op_types": ["ReLU"], "op_names": ["fc1"]}], r"config_list\[0\]: matches no module"),
        ([{"exclude": True, "op_names": ["fc1"], "quant_bits": 8}], "an 'exclude' entry takes only"),
        ([{"exclude": "yes", "op_names": ["fc1"]}], r"\['exclude'\]: must be True or False"),
    ],
)
def test_invalid_entries_name_index_and_key(config_list, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(TorchModel(), config_list)


def test_op_names_on_a_container_is_rejected_by_name():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"module '0' is a Sequential, which cannot be quantized"):
        resolve_config(model, [{"quant_types": ["output"], "quant_bits": 8, "op_names": ["0"]}])


CALIBRATION_MSG = (
    "this is a calibration config (as export_model returns), not a config_list{entry}; pass it to "
    "ModelSpeedup(config=...) / mixq build --calibration"
)


def test_a_bare_dict_says_to_wrap_it_in_a_list():
    entry = {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"], "observer": "ema", "x": 1}
    with pytest.raises(ConfigError) as e:
        resolve_config(TorchModel(), entry)
    assert str(e.value) == (
        "config_list must be a list of dicts (NNI's config_list), got a dict with keys "
        "['quant_types', 'quant_bits', 'op_types', 'observer', ...]; wrap it in a list: [{...}]"
    )


def test_an_empty_config_list_is_refused_not_resolved_to_nothing():
    for empty in ([], ()):
        with pytest.raises(ConfigError, match=r"^config is empty: a config_list needs at least one entry, e\.g\. "):
            resolve_config(TorchModel(), empty)


def test_a_calibration_config_is_named_as_such():
    calib = {"conv1": {"op_type": "Conv2d", "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 1.0}}
    with pytest.raises(ConfigError) as e:
        resolve_config(TorchModel(), calib)
    assert str(e.value) == "config_list: " + CALIBRATION_MSG.format(entry="")
    with pytest.raises(ConfigError) as e:
        resolve_config(TorchModel(), [calib])
    assert str(e.value) == "config_list[0]: " + CALIBRATION_MSG.format(entry=" entry")


def test_quant_convention_picks_nnis_integer_rules_per_type():
    config = [
        {
            "quant_types": ["input", "weight"],
            "quant_bits": 8,
            "quant_dtype": "int",
            "quant_scheme": {"input": "per_tensor_affine", "weight": "per_tensor_symmetric"},
            "quant_convention": {"input": "nni", "weight": "mixq"},
            "op_names": ["fc1"],
        }
    ]
    spec = resolve_config(TorchModel(), config)["fc1"]
    assert (spec.input.dtype.qmin, spec.input.dtype.qmax, spec.input.convention) == (-127, 127, "nni")
    assert (spec.weight.dtype.qmin, spec.weight.convention) == (-128, "mixq")
    assert QuantSpec.from_dict(spec.input.to_dict()) == spec.input
    assert "convention" not in spec.weight.to_dict()  # mixq's files keep their form


def test_generic_config_reused_on_a_model_without_conv2d():
    """One config for every model: a type the model lacks is not an error while the entry matches something."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    specs = resolve_config(model, [{**W8, "op_types": ["Conv2d", "Linear"]}])
    assert list(specs) == ["0", "2"]
    split = resolve_config(model, [{**W8, "op_types": ["Conv2d"]}, {**W8, "op_types": ["Linear"]}])
    assert list(split) == ["0", "2"]  # an entry for a type this model lacks is skipped, not an error


def test_op_names_wildcards_select_quantizable_modules_only():
    """``encoder.layers.*.self_attn.*`` reaches the attention projections (nn.MultiheadAttention is resolved as
    mixq.prepare_ will see it: in_proj/out_proj as Linear layers) and skips containers and dropouts."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Module()
    model.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    specs = resolve_config(model, [{**W8, "op_names": ["encoder.layers.*.self_attn.*"]}])
    assert list(specs) == [f"encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")]
    linear_only = resolve_config(model, [{**W8, "op_types": ["Linear"], "op_names": ["encoder.layers.1.*"]}])
    assert list(linear_only) == [
        f"encoder.layers.1.{n}" for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    ]
    with pytest.raises(
        ConfigError, match=r"config_list\[0\]\['op_names'\]: the pattern 'decoder.\*' matches no module"
    ):
        resolve_config(model, [{**W8, "op_names": ["decoder.*"]}])
