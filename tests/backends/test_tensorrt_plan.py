"""What the TensorRT backend tells the builder and how it runs, checked without TensorRT; and a scan of the
backend's source for the APIs TensorRT 10.12 deprecated and 11 removed."""

import ast
from pathlib import Path

import pytest
import torch

import mixq
from engine_cases import ALL8_WITH_LOGITS
from mixq.backends import BuildOptions, EngineError
from mixq.backends.tensorrt.engine import (
    TensorRTBackend,
    _version,
    batch_chunks,
    check_profile_shape,
    plan_network,
    torch_dtype,
)
from mixq.export import export_qdq_onnx
from mixq.zoo.models import TorchModel

BACKEND_SOURCES = sorted((Path(mixq.__file__).parent / "backends" / "tensorrt").glob("*.py"))


def _lenet(config=ALL8_WITH_LOGITS, extra_layer_bits=32):
    torch.manual_seed(0)
    model = TorchModel()
    mixq.prepare_(model, config, mixq.QAT())
    model.train()
    model(torch.randn(8, 1, 28, 28))
    return export_qdq_onnx(
        mixq.deploy_model(model.eval()), (1, 1, 28, 28), mixq.export_calibration(model), extra_layer_bits
    )


@pytest.mark.parametrize(("major", "flags"), [(10, ("STRONGLY_TYPED",)), (11, ())])
def test_plan_is_strongly_typed_with_a_dynamic_batch_profile_and_no_precision_flags(major, flags):
    """10.12+: strong typing is opted into with the creation flag; 11: always on, the flag deprecated."""
    plan = plan_network(_lenet().model, (32, 1, 28, 28), BuildOptions(max_batch=256, opt_batch=32), major)
    assert plan.creation_flags == flags
    assert plan.profile == ((1, 1, 28, 28), (32, 1, 28, 28), (256, 1, 28, 28))
    assert plan.input_name == "input"
    assert not hasattr(plan, "flags") and not hasattr(plan, "layer_precision")


def test_bad_profile_is_rejected():
    with pytest.raises(EngineError, match="opt_batch"):
        plan_network(_lenet().model, (8, 1, 28, 28), BuildOptions(max_batch=4, opt_batch=8), 11)


def test_large_batches_run_in_profile_sized_chunks():
    assert batch_chunks(1000, 256) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert batch_chunks(3, 256) == [(0, 3)]
    assert batch_chunks(512, 256) == [(0, 256), (256, 512)]
    with pytest.raises(EngineError, match="allows no batch"):
        batch_chunks(4, 0)


def test_shape_outside_the_profile_is_a_clear_error():
    profile = ((1, 1, 28, 28), (32, 1, 28, 28), (64, 1, 28, 28))
    check_profile_shape((64, 1, 28, 28), profile)
    with pytest.raises(
        EngineError, match=r"input shape \(65, 1, 28, 28\) is outside the engine's optimization profile"
    ):
        check_profile_shape((65, 1, 28, 28), profile)
    with pytest.raises(EngineError, match=r"min \(1, 1, 28, 28\), max \(64, 1, 28, 28\)"):
        check_profile_shape((8, 3, 28, 28), profile)


def test_output_dtypes_come_from_the_engine_type_names():
    assert torch_dtype("FLOAT") == torch.float32
    assert torch_dtype("HALF") == torch.float16
    assert torch_dtype("BF16") == torch.bfloat16
    assert torch_dtype("INT64") == torch.int64
    with pytest.raises(EngineError, match="FP8 has no torch equivalent"):
        torch_dtype("FP8")


def test_version_gate_parses_tensorrt_versions():
    assert _version("10.12.0.36") == (10, 12)
    assert _version("11.1.0") == (11, 1)
    assert _version("10.12.0") > (10, 11) and _version("11.9") < (12, 0)


def test_backend_reports_unavailable_without_tensorrt_with_the_supported_range():
    backend = TensorRTBackend()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not backend.is_available()
        reason = backend.unavailable_reason()
        assert "TensorRT 10.12 to 11.x" in reason and "tensorrt>=10.12,<12" in reason and "backend='auto'" in reason


def test_the_extra_pins_the_supported_range():
    pyproject = (Path(mixq.__file__).parents[2] / "pyproject.toml").read_text()
    assert 'tensorrt = ["tensorrt>=10.12,<12"]' in pyproject


# Weak-typing and pre-10 APIs: deprecated in TensorRT 10.x (weak typing in 10.12, calibrators in 10.1) and
# removed in 11 (migration guide 10.x -> 11.x; the strong-typing migration table of NVIDIA/TensorRT's
# trt-strong-typing-migration skill), or removed in 10 already (bindings, implicit batch, build_engine).
REMOVED = {
    # builder precision flags: weak typing (TF32 stays: it is not a typing flag)
    *(f"BuilderFlag.{f}" for f in ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")),
    *(f"BuilderFlag.{f}" for f in ("OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")),
    *(f"BuilderFlag.{f}" for f in ("STRICT_TYPES", "REJECT_EMPTY_ALGORITHMS", "DIRECT_IO", "SAFETY_SCOPE")),
    "set_flag",  # nothing to switch on in a strongly typed build
    "precision",  # ILayer.precision
    "reset_precision",
    "precision_is_set",
    "set_output_type",
    "reset_output_type",
    "output_type_is_set",
    "set_compute_precision",
    "int8_calibrator",
    "set_calibration_profile",
    "get_calibration_profile",
    "IInt8Calibrator",
    "IInt8EntropyCalibrator",
    "IInt8EntropyCalibrator2",
    "IInt8MinMaxCalibrator",
    "IInt8LegacyCalibrator",
    "CalibrationAlgoType",
    "platform_has_fast_int8",
    "platform_has_fast_fp16",
    "EXPLICIT_BATCH",
    "max_batch_size",
    "max_workspace_size",
    "build_engine",
    "num_bindings",
    "get_binding_index",
    "get_binding_name",
    "get_binding_shape",
    "get_binding_dtype",
    "binding_is_input",
    "execute_async_v2",
    "execute_async",
    "set_binding_shape",
}


def _used_names(path: Path) -> set[str]:
    """Every attribute and variable name in the code (``BuilderFlag.X`` as such), and names given as strings
    to getattr/setattr/hasattr; docstrings, comments and messages are not code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
            if isinstance(node.value, ast.Attribute | ast.Name):
                names.add(f"{getattr(node.value, 'attr', getattr(node.value, 'id', ''))}.{node.attr}")
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("attr"):
            target = node.args[0] if node.args else None
            owner = getattr(target, "attr", getattr(target, "id", ""))
            for a in node.args[1:2]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    names.update({a.value, f"{owner}.{a.value}"})
    return names


@pytest.mark.parametrize("path", BACKEND_SOURCES, ids=lambda p: p.name)
def test_backend_source_uses_no_deprecated_or_removed_tensorrt_api(path):
    assert sorted(_used_names(path) & REMOVED) == []


def test_the_scan_finds_what_the_old_backend_used(tmp_path):
    """The scan itself: the weak-typing calls of the backend before this rewrite are all caught."""
    old = tmp_path / "old.py"
    old.write_text(
        "config.set_flag(getattr(trt.BuilderFlag, 'FP16'))\n"
        "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)\n"
        "layer.precision = trt.float16\n"
        "getattr(config, 'int8_calibrator')\n"
    )
    found = {"set_flag", "BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "precision", "int8_calibrator"}
    assert _used_names(old) & REMOVED == found
    assert len(BACKEND_SOURCES) == 5  # engine, check, inspect, legalize and __init__
