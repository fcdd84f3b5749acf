"""fp8 in the search: a choice with quant_dtype "fp8" in its config_list entries, offered on backends with
fp8 kernels (cuda, tensorrt) and never built or profiled on the CPU backends."""

import pytest
import torch

import mixq
from mixq.search.space import CHOICES, config_list_for, find_units, offered_on, runs_on
from mixq.spec import FloatType
from test_search import FakeMeasurer, search_fake


def test_fp8_choice_config_list_asks_fp8_inputs_weights_and_activations():
    from mixq.zoo.models import create_model

    model = create_model("lenet")
    units = find_units(model, torch.randn(1, 1, 28, 28))
    assignment = {"conv1": "fp8", "conv2": "int8", "fc1": "fp8", "fc2": "fp32", "fc3": "fp32"}
    config = config_list_for(units, assignment)
    fp8 = [e for e in config if e.get("quant_dtype") == "fp8"]
    assert [e["op_names"] for e in fp8] == [["conv1", "fc1"], ["relu1", "relu3"]]
    assert all(e["quant_bits"] in (8, {"input": 8, "weight": 8}) for e in fp8)
    specs = mixq.resolve_config(model, config)
    for name in ("conv1", "fc1"):
        assert isinstance(specs[name].weight.dtype, FloatType) and isinstance(specs[name].input.dtype, FloatType)
    assert isinstance(specs["relu1"].output.dtype, FloatType)
    assert not isinstance(specs["conv2"].weight.dtype, FloatType)
    mixq.prepare_(model, config, mixq.QAT(), example_input=torch.randn(2, 1, 28, 28))  # QAT takes it too


def test_fp8_is_offered_where_fp8_kernels_are():
    assert CHOICES["fp8"].precision == "fp8" and CHOICES["fp8"].dtype == "fp8"
    assert set(runs_on("fp8")) == {"cuda", "tensorrt"}  # asked of the backends (Backend.emulated)
    assert offered_on("fp8", "cuda") and offered_on("fp8", "tensorrt")
    assert not offered_on("fp8", "onnxruntime") and not offered_on("fp8", "openvino")
    assert all(offered_on(c, "onnxruntime") for c in ("fp32", "fp16", "int8", "int8w7"))


class GpuAndCpu(FakeMeasurer):
    """Backend ``cuda`` runs fp8 (300 us a unit) and int8 (400 us); ``onnxruntime`` int8 only (700 us)."""

    def unit_us(self, b, c):
        table = {"cuda": {"int8": 400.0, "fp8": 300.0}, "onnxruntime": {"int8": 700.0}}
        return 1000.0 if c == "fp32" else table[b].get(c, 900.0)

    def profile(self, backend, choice):
        assert offered_on(choice, backend), f"{choice} profiled on {backend}"
        return super().profile(backend, choice)


@pytest.mark.parametrize("budget", [5.0])
def test_search_takes_fp8_on_cuda_and_never_profiles_it_on_cpu(budget):
    measurer = GpuAndCpu(backends=("onnxruntime", "cuda"))
    out = search_fake(measurer, budget, choices=("fp32", "int8", "fp8"))
    assert out.winner.backend == "cuda" and set(out.winner.assignment) == {"fp8"}
    assert any(n.startswith("fp8 on onnxruntime: not offered") for n in out.notes)
    assert all(not (r.backend == "onnxruntime" and "fp8" in r.assignment) for r in out.rows)
