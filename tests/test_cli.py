import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mixq
from mixq import cli
from mixq.cli import main
from mixq.zoo.models import create_model
from mixq.zoo.tutorial import ALL_8BIT_CONFIG_LIST, FAST_MIXED_CONFIG_LIST, TUTORIAL_CONFIG_LIST

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
INSPECT_TAKES = "inspect takes a calibration config (.json/.pth) or an engine file (.mixq)"


def _default_sigint():
    # A shell runs background jobs with SIGINT ignored, and children inherit that: give the child the
    # default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _error(capsys) -> str:
    """The one line a failed command wrote to stderr (and nothing on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture
def cfg(tmp_path) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text("- quant_types: [input, weight]\n  quant_bits: {input: 8, weight: 7}\n  op_types: [Linear]\n")
    return p


@pytest.fixture
def calibration(tmp_path) -> Path:
    """A real calibration config of the tutorial LeNet (PTQ on random data: no training)."""
    model = create_model("lenet")
    mixq.prepare_(model, FAST_MIXED_CONFIG_LIST, mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(torch.randn(8, 1, 28, 28)))
    return mixq.save_calibration_config(mixq.export_calibration(model), tmp_path / "calibration.json")


@pytest.fixture
def lenet_weights(tmp_path) -> Path:
    path = tmp_path / "lenet.pth"
    torch.save(create_model("lenet").state_dict(), path)
    return path


def test_demo_quick_prints_table_and_writes_results(data_dir, tmp_path, capsys):
    # One backend, so the placement report and the engine/PyTorch agreement below are of its quantized engines
    # (auto may keep the float engine where quantized ones are slower; tests/test_auto.py covers that choice).
    args = ["demo", "--quick", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--backend", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "| strategy | average bits | latency ms | vs 32bit | accuracy (engine) |" in out
    assert "placement on onnxruntime" in out
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["strategy"] for r in results["rows"]]
    assert names[:3] == ["all in 32bit", "tutorial mixed config (QAT)", "all in 8bit (QAT)"]
    for row in results["rows"]:
        # 188 SGD steps: far above chance (10%), and the engine agrees with its PyTorch model.
        assert 30.0 < row["accuracy_engine"] <= 100.0, row
        assert abs(row["accuracy_engine"] - row["accuracy_pytorch"]) < 2.0, row
        assert row["latency_ms"] > 0
    # Every QAT strategy's engine holds its quantized layers (a float engine here once went unnoticed).
    assert [r["engine"] for r in results["rows"]] == ["onnxruntime float"] + ["onnxruntime quantized"] * 3
    assert "| conv1 | Conv2d | int8 | int8 |" in out  # the all-8-bit placement report
    fp32 = results["rows"][0]
    assert fp32["avg_bits_mac"] == 32.0 and fp32["latency_vs_fp32"] == 1.0
    assert results["rows"][2]["avg_bits_mac"] == 8.0
    for name in ("results.md", "tutorial_mixed_config_calibration.json", "all_in_8bit_calibration.json"):
        assert (tmp_path / name).is_file(), name


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mixq", "demo", "--quick", "--data-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    expected = f"mixq demo: error: data directory {tmp_path / 'missing'} does not exist"
    assert out.stderr.strip().splitlines() == [expected]


def test_quantize_build_bench_inspect_report_round_trip(data_dir, tmp_path, cfg, capsys):
    out = tmp_path / "q"
    common = ["--data-dir", str(data_dir), "--no-progress"]
    quantize = ["quantize", "--model", "lenet", "--config", str(cfg), "--method", "qat", "--dataset", "mnist"]
    limits = ["--train-limit", "4096", "--test-limit", "1000", "--out", str(out)]
    assert main([*quantize, *limits, *common]) == 0
    captured = capsys.readouterr()
    assert "fake-quant accuracy" in captured.out
    assert captured.err == ""  # --no-progress: nothing on stderr
    engine = tmp_path / "lenet.mixq"
    # One backend: the placement asserted below is ORT's quantized engine (auto may keep the float engine).
    build = ["build", "--model", "lenet", "--calibration", str(out / "calibration.json"), "--backend", "onnxruntime"]
    shape = ["--input-shape", "32,1,28,28"]
    assert main([*build, "--weights", str(out / "model.pth"), *shape, "--out", str(engine)]) == 0
    assert "| fc1 | Linear | int8 | int8 | QGemm |" in capsys.readouterr().out
    assert main(["bench", str(engine), "--batch", "1", "4", "--runs", "5", "--warmup", "1"]) == 0
    assert "| 4 |" in capsys.readouterr().out
    assert main(["inspect", str(engine)]) == 0
    assert "fc1 (Linear): int8" in capsys.readouterr().out
    assert main(["inspect", str(out / "calibration.json")]) == 0
    assert "fc1 (Linear): input=8b, weight=7b" in capsys.readouterr().out
    assert main(["report", str(engine), "--profile-batch", "4", "--runs", "2"]) == 0
    assert "time us" in capsys.readouterr().out
    # A smoke-test engine from the random initial weights, asked for explicitly.
    assert main([*build, "--random-weights", *shape, "--out", str(tmp_path / "smoke.mixq")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.mixq")]) == 2
    assert "missing.mixq: engine file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert (
        main(["quantize", "--model", "lenet", "--config", str(bad), "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    )
    assert _error(capsys) == (
        f"mixq quantize: error: --config {bad}: cannot parse (JSONDecodeError: Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1))"
    )
    build = ["build", "--model", "nope", "--random-weights", "--calibration", "x.json", "--input-shape", "1,1,28,28"]
    assert main([*build, "--out", "e"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.md" in capsys.readouterr().err


# --- 1. no silent random weights -------------------------------------------------------------------------


def test_build_without_weights_is_refused(calibration, tmp_path, capsys):
    argv = ["build", "--model", "lenet", "--calibration", str(calibration), "--input-shape", "128,1,28,28"]
    assert main([*argv, "--out", str(tmp_path / "e.mixq")]) == 2
    assert _error(capsys) == (
        "mixq build: error: --weights is required: without it the engine gets the model's random initial "
        "weights; pass the model.pth written by `mixq quantize`, or --random-weights for a smoke test"
    )
    assert not (tmp_path / "e.mixq").exists()


def test_ptq_without_weights_is_refused(cfg, tmp_path, capsys):
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--method", "ptq", "--dataset", "mnist"]
    assert main([*argv, "--out", str(tmp_path / "p")]) == 2
    assert _error(capsys) == (
        "mixq quantize: error: --method ptq needs --weights: calibrating a model's random initial weights gives a "
        "useless model; pass the trained float state dict, or --random-weights for a smoke test (QAT may start "
        "from scratch)"
    )


def test_weights_and_random_weights_exclude_each_other(lenet_weights, capsys):
    argv = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--random-weights"]
    assert main([*argv, "--calibration", "c.json", "--input-shape", "1,1,28,28", "--out", "e"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: mixq build")
    assert err[-1] == "mixq build: error: argument --random-weights: not allowed with argument --weights"


def test_ptq_with_random_weights_runs(data_dir, cfg, tmp_path, capsys):
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--method", "ptq", "--random-weights"]
    limits = ["--train-limit", "256", "--test-limit", "100", "--calib-images", "256", "--no-progress"]
    assert main([*argv, "--dataset", "mnist", "--data-dir", str(data_dir), *limits, "--out", str(tmp_path)]) == 0
    assert "ptq lenet on mnist: fake-quant accuracy" in capsys.readouterr().out


# --- 2. one line instead of a stack trace ----------------------------------------------------------------


def _build_with_weights(weights, calibration, tmp_path):
    argv = ["build", "--model", "lenet", "--weights", str(weights), "--calibration", str(calibration)]
    return main([*argv, "--input-shape", "8,1,28,28", "--out", str(tmp_path / "e.mixq")])


def test_weights_of_another_model_name_file_model_and_keys(calibration, tmp_path, capsys):
    weights = tmp_path / "resnet.pth"
    torch.save(create_model("tiny_resnet").state_dict(), weights)
    assert _build_with_weights(weights, calibration, tmp_path) == 2
    assert _error(capsys) == (
        f"mixq build: error: --weights {weights} does not fit --model lenet (TorchModel): 9 missing keys "
        "(conv1.bias [6], conv2.weight [16, 6, 5, 5], ...); 37 unexpected keys (bn1.weight [8], bn1.bias [8], ...); "
        "1 shape mismatch (conv1.weight: [8, 3, 3, 3] in the file, [6, 1, 5, 5] in the model)"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\x01garbage", "cannot read as a PyTorch state dict (unknown binary format)"),
        (b"\xff\xfe\xfa", "cannot read as a PyTorch state dict (unknown binary format)"),
        (b"hello world", "is plain text, not a PyTorch state dict (save model.state_dict() with torch.save)"),
        ("whole model", "holds pickled Python objects (e.g. a whole model saved with torch.save(model)), which mixq "),
        ("checkpoint", "is a dict with keys 'epoch', 'model', not a PyTorch state dict (save model.state_dict() "),
        ("calibration", "is a calibration config (from export_model), not a PyTorch state dict "),
        ("truncated", "cannot read as a PyTorch state dict (RuntimeError: PytorchStreamReader failed reading zip "),
    ],
)
def test_unreadable_or_wrong_weights_files_are_one_line(content, expected, calibration, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    if content == "whole model":
        torch.save(create_model("lenet"), weights)
    elif content == "checkpoint":
        torch.save({"epoch": 3, "model": create_model("lenet").state_dict()}, weights)
    elif content == "calibration":
        weights.write_bytes(calibration.read_bytes())
    elif content == "truncated":
        torch.save(create_model("lenet").state_dict(), weights)
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        weights.write_bytes(content)
    assert _build_with_weights(weights, calibration, tmp_path) == 2
    line = _error(capsys)
    sep = " " if expected.startswith(("is ", "holds ")) else ": "
    assert line.startswith(f"mixq build: error: --weights {weights}{sep}{expected}"), line


def test_model_and_dataset_shapes_are_checked_before_training(cfg, tmp_path, capsys):
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "cifar10", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert _error(capsys) == (
        "mixq quantize: error: --model lenet does not fit --dataset cifar10 (images 3x32x32): layer conv1 (Conv2d) "
        "expects 1 input channel, got 3"
    )
    argv = ["quantize", "--model", "resnet18_cifar", "--config", str(cfg), "--dataset", "mnist", "--out", "o"]
    assert main(argv) == 2
    assert _error(capsys) == (
        "mixq quantize: error: --model resnet18_cifar does not fit --dataset mnist (images 1x28x28): layer conv1 "
        "(Conv2d) expects 3 input channels, got 1"
    )


def test_input_shape_is_checked_against_the_model(calibration, lenet_weights, capsys):
    argv = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--calibration", str(calibration)]
    assert main([*argv, "--input-shape", "8,1,32,32", "--out", "e.mixq"]) == 2
    assert _error(capsys) == (
        "mixq build: error: --model lenet does not fit --input-shape 8,1,32,32: layer fc1 (Linear) expects 256 input "
        "features, got 400"
    )


BAD_VALUES = [
    (["demo", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["demo", "--epochs", "-1"], "argument --epochs: expected a positive integer, got '-1'"),
    (["demo", "--epochs", "two"], "argument --epochs: expected a positive integer, got 'two'"),
    (["quantize", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["quantize", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["quantize", "--calib-images", "0"], "argument --calib-images: expected a positive integer, got '0'"),
    (["quantize", "--train-limit", "0"], "argument --train-limit: expected a positive integer, got '0'"),
    (["quantize", "--test-limit", "-5"], "argument --test-limit: expected a positive integer, got '-5'"),
    (["quantize", "--lr", "0"], "argument --lr: expected a positive number, got '0'"),
    (["quantize", "--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
    (["quantize", "--momentum", "-0.1"], "argument --momentum: expected a number >= 0, got '-0.1'"),
    (["build", "--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    (["bench", "e.mixq", "--runs", "0"], "argument --runs: expected a positive integer, got '0'"),
    (["bench", "e.mixq", "--batch", "1", "0"], "argument --batch: expected a positive integer, got '0'"),
    (["bench", "e.mixq", "--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    (["report", "e.mixq", "--profile-batch", "0"], "argument --profile-batch: expected a positive integer, got '0'"),
    (["report", "e.mixq", "--runs", "0"], "argument --runs: expected a positive integer, got '0'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_option_values_are_usage_errors_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the check (bench used to print its header first)
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith(f"usage: mixq {argv[0]}")
    assert lines[-1] == f"mixq {argv[0]}: error: {message}"
    assert "Traceback" not in captured.err


def test_demo_epochs_zero_in_a_process_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "mixq", "demo", "--epochs", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "mixq demo: error: argument --epochs: expected a positive integer, got '0'"
    assert "Traceback" not in r.stderr


# --- 3. backends and files checked before any work -------------------------------------------------------


def test_unknown_backend_is_refused_before_training(data_dir, tmp_path, capsys):
    argv = ["demo", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--backend", "nope"]
    assert main(argv) == 2
    names = ", ".join(repr(n) for n in ["auto", *mixq.backends.list_backends()])
    assert _error(capsys) == f"mixq demo: error: --backend nope: unknown backend 'nope'; available: [{names}]"
    assert not (tmp_path / "out").exists()  # no training, nothing written


def test_unavailable_backend_is_refused_before_building(calibration, lenet_weights, tmp_path, capsys):
    from mixq.backends import EngineError, get_backend

    try:
        get_backend("tensorrt")
        pytest.skip("TensorRT is usable here")
    except EngineError as e:
        reason = str(e)
    argv = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--calibration", str(calibration)]
    assert main([*argv, "--input-shape", "8,1,28,28", "--backend", "tensorrt", "--out", str(tmp_path / "e")]) == 2
    assert _error(capsys) == f"mixq build: error: --backend tensorrt: {reason}"


def test_auto_backend_is_accepted(calibration, lenet_weights, tmp_path, capsys):
    argv = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--calibration", str(calibration)]
    assert main([*argv, "--input-shape", "8,1,28,28", "--backend", "auto", "--out", str(tmp_path / "e.mixq")]) == 0
    assert (tmp_path / "e.mixq").is_file()


def test_missing_files_are_named_before_any_work(cfg, calibration, lenet_weights, tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    quantize = ["quantize", "--model", "lenet", "--dataset", "mnist", "--out", str(tmp_path / "q")]
    assert main([*quantize, "--config", str(tmp_path / "nope.yaml")]) == 2
    assert _error(capsys) == f"mixq quantize: error: --config {tmp_path / 'nope.yaml'}: file not found"
    assert main([*quantize, "--config", str(cfg), "--weights", str(missing)]) == 2
    assert _error(capsys) == f"mixq quantize: error: --weights {missing}: file not found"
    assert main([*quantize, "--config", str(cfg), "--data-dir", str(tmp_path / "nodata")]) == 2
    assert _error(capsys) == f"mixq quantize: error: data directory {tmp_path / 'nodata'} does not exist"
    build = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--input-shape", "1,1,28,28"]
    assert main([*build, "--calibration", str(missing), "--out", "e"]) == 2
    assert _error(capsys) == f"mixq build: error: --calibration {missing}: file not found"
    assert not (tmp_path / "q").exists()


# --- 5. files named for what they are --------------------------------------------------------------------


def test_inspect_names_a_state_dict_and_a_config_list(lenet_weights, capsys):
    assert main(["inspect", str(lenet_weights)]) == 2
    assert _error(capsys) == (
        f"mixq inspect: error: {lenet_weights} is a PyTorch state dict of 10 tensors (e.g. conv1.weight), not a "
        f"calibration config; {INSPECT_TAKES}"
    )
    config = CONFIGS / "nni_tutorial.yaml"
    assert main(["inspect", str(config)]) == 2
    assert _error(capsys) == (
        f"mixq inspect: error: {config} is a config_list of 3 entries, not a calibration config; {INSPECT_TAKES}"
    )


def test_inspect_decides_by_content_not_suffix(calibration, tmp_path, capsys):
    as_pth = tmp_path / "calib.pth"
    torch.save(json.loads(calibration.read_text()), as_pth)
    assert main(["inspect", str(as_pth)]) == 0
    assert "fc1 (Linear): input=8b, weight=7b" in capsys.readouterr().out
    weights_named_json = tmp_path / "weights.json"
    torch.save(create_model("lenet").state_dict(), weights_named_json)
    assert main(["inspect", str(weights_named_json)]) == 2
    assert _error(capsys).startswith(f"mixq inspect: error: {weights_named_json} is a PyTorch state dict of 10 tensors")


def test_config_option_names_calibration_files_and_dicts(calibration, tmp_path, capsys):
    quantize = ["quantize", "--model", "lenet", "--dataset", "mnist", "--out", str(tmp_path / "q")]
    assert main([*quantize, "--config", str(calibration)]) == 2
    assert _error(capsys) == (
        f"mixq quantize: error: --config {calibration} is a calibration config (from export_model); --config takes "
        "a config_list (list of dicts); pass calibration files to `mixq build --calibration`"
    )
    as_dict = tmp_path / "dict.yaml"
    as_dict.write_text("quant_types: [input, weight]\nquant_bits: 8\nop_types: [Conv2d]\n")
    assert main([*quantize, "--config", str(as_dict)]) == 2
    assert _error(capsys) == (
        f"mixq quantize: error: --config {as_dict}: expected a config_list (a YAML/JSON list of dicts), found a dict "
        "with keys 'quant_types', 'quant_bits', 'op_types'"
    )
    wrong_layer = tmp_path / "wrong.yaml"
    wrong_layer.write_text("- quant_types: [weight]\n  quant_bits: 8\n  op_names: [fc9]\n")
    assert main([*quantize, "--config", str(wrong_layer)]) == 2
    assert _error(capsys) == (
        f"mixq quantize: error: --config {wrong_layer}: config_list[0]['op_names']: no module named 'fc9' in the "
        "model; did you mean 'fc3'?"
    )


def test_calibration_option_names_a_config_list(lenet_weights, capsys):
    config = CONFIGS / "all_8bit.yaml"
    argv = ["build", "--model", "lenet", "--weights", str(lenet_weights), "--input-shape", "1,1,28,28"]
    assert main([*argv, "--calibration", str(config), "--out", "e"]) == 2
    assert _error(capsys) == (
        f"mixq build: error: --calibration {config} is a config_list of 2 entries, not a calibration config (pass "
        "the calibration.json written by `mixq quantize`); a config_list goes to `mixq quantize --config`"
    )


# --- 6. progress when stderr is not a terminal -----------------------------------------------------------


def test_quantize_logs_plain_progress_lines_off_a_terminal(data_dir, cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "LOG_EVERY_STEPS", 2)
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist", "--data-dir", str(data_dir)]
    limits = ["--train-limit", "512", "--batch-size", "128", "--test-limit", "100", "--epochs", "2"]
    assert main([*argv, *limits, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is not a terminal
    number = r"\d+\.\d{4}"
    for epoch in (1, 2):
        for step in (2, 4):
            pattern = rf"QAT epoch {epoch}/2: step {step}/4, loss {number}, \d+ images/s"
            assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
        pattern = rf"QAT epoch {epoch}/2: done, 4 steps in \d+\.\d s, mean loss {number}, \d+ images/s"
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
    assert "evaluating the fake-quant model on 100 test images" in lines


# --- 7. help, defaults, version --------------------------------------------------------------------------


def _subparsers() -> dict:
    return cli.build_parser()._subparsers._group_actions[0].choices


def test_every_option_has_help_and_shows_its_default():
    for name, p in _subparsers().items():
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False) and not action.required:
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                expected = action.help if "(default" in action.help else f"{action.help} (default: {shown})"
                assert f"(default: {shown})" in expected, (name, action.option_strings)
                assert " ".join(expected.split()) in text, (name, action.option_strings)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mixq {mixq.__version__}"


def test_help_exits_0(capsys):
    assert main(["quantize", "--help"]) == 0
    assert "examples/configs/nni_tutorial.yaml" in capsys.readouterr().out


# --- 8. shipped config files -----------------------------------------------------------------------------


def test_shipped_configs_load_and_resolve_against_lenet():
    shipped = {p.name: p for p in CONFIGS.glob("*.yaml")}
    expected = {
        "nni_tutorial.yaml": TUTORIAL_CONFIG_LIST,
        "all_8bit.yaml": ALL_8BIT_CONFIG_LIST,
        "fast_mixed.yaml": FAST_MIXED_CONFIG_LIST,
    }
    assert expected.keys() <= shipped.keys()
    for name, path in shipped.items():
        config = cli.load_config(str(path))
        assert mixq.resolve_config(create_model("lenet"), config), name  # at least one layer quantized
        if name in expected:
            assert config == expected[name] == yaml.safe_load(path.read_text()), name


def test_help_examples_use_shipped_configs():
    text = "\n".join(cli.EXAMPLES.values())
    used = set(re.findall(r"examples/configs/[\w.]+\.yaml", text))
    assert used and "cfg.json" not in text
    for path in used:
        assert (REPO / path).is_file(), path


# --- 4. Ctrl-C -------------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_and_leaves_no_partial_files(data_dir, tmp_path):
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "mixq", "demo", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    # The demo writes this line inside main()'s guarded region, so from here on any SIGINT ends in exit 130
    # (whatever it interrupts: see test_ctrl_c_inside_exec_of_a_string_exits_130). The sleep only makes the
    # interrupt likely to land in training rather than in the imports at its start; the outcome is the same.
    assert proc.stderr.readline().startswith("mixq demo: training")
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "mixq demo: interrupted"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


INTERRUPT_IN_EXEC = """
import sys
import mixq.cli as cli


def interrupted(args):
    # What a Ctrl-C during a lazy import looks like: dataclasses build methods with exec() of a string.
    exec("raise KeyboardInterrupt")


cli.cmd_inspect = interrupted
sys.exit(cli.main(["inspect", "x"]))
"""


def test_ctrl_c_inside_exec_of_a_string_exits_130(tmp_path):
    # CPython flags a KeyboardInterrupt that escaped exec() of a string and, under `python -m`, kills the
    # process with SIGINT at exit even though it was caught (returncode -2): the race of the test above.
    (tmp_path / "interrupt_in_exec.py").write_text(INTERRUPT_IN_EXEC)
    proc = subprocess.run(
        [sys.executable, "-m", "interrupt_in_exec"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_default_sigint,
    )
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == ["mixq inspect: interrupted"]


def test_quantize_device_and_speed_options_are_checked_before_training(cfg, tmp_path, capsys):
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist", "--out", str(tmp_path)]
    assert main([*argv, "--method", "ptq", "--random-weights", "--compile"]) == 2
    assert _error(capsys) == "mixq quantize: error: --compile applies to QAT training; PTQ only calibrates"
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        assert _error(capsys) == (
            "mixq quantize: error: --device cuda: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
            "False)"
        )


def test_quantize_qat_with_amp_and_compile(data_dir, cfg, tmp_path, capsys, monkeypatch):
    """--amp (bf16 autocast, channels_last) and --compile train and export; the compiler is swapped for
    aot_eager here (the same graph capture, without inductor's minutes of code generation on this CPU)."""
    compiled = []
    real_compile = torch.compile

    def aot_eager_compile(model, mode=None, **kwargs):
        compiled.append(mode)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    out = tmp_path / "q"
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist", "--data-dir", str(data_dir)]
    limits = ["--train-limit", "1000", "--test-limit", "500", "--batch-size", "128", "--no-progress"]
    assert main([*argv, *limits, "--device", "cpu", "--amp", "--compile", "--out", str(out)]) == 0
    assert compiled == [None]  # reduce-overhead (CUDA graphs) only on a GPU
    assert "fake-quant accuracy" in capsys.readouterr().out
    calibration = mixq.load_calibration_config(out / "calibration.json")
    assert calibration["fc1"]["input_bits"] == 8 and calibration["fc1"]["tracked_max_input"] > 0


@pytest.mark.parametrize("command", ["quantize", "demo", "search", "build"])
def test_unwritable_out_is_one_line_before_any_work(command, cfg, calibration, lenet_weights, tmp_path, capsys):
    under_a_file = tmp_path / "a_file"
    under_a_file.write_text("x")
    argv = {
        "quantize": ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist"],
        "demo": ["demo"],
        "search": ["search", "--model", "lenet", "--weights", str(lenet_weights), "--dataset", "mnist"],
        "build": ["build", "--model", "lenet", "--weights", str(lenet_weights), "--calibration", str(calibration)],
    }[command] + (["--input-shape", "4,1,28,28", "--backend", "onnxruntime"] if command == "build" else [])
    for out, reason in [("/proc/mixq-out/x", "cannot create files in /proc"), (under_a_file / "x", "is a file")]:
        assert main([*argv, "--out", str(out)]) == 2
        line = _error(capsys)
        assert line.startswith(f"mixq {command}: error: --out {out}: ") and reason in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a_file", "cfg.yaml", "calibration.json", "lenet.pth"])


def test_quantize_refuses_bits_no_engine_builds_before_training(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "bits3.yaml"
    cfg.write_text("- quant_types: [input, weight]\n  quant_bits: 3\n  op_types: [Conv2d]\n")
    monkeypatch.setattr(cli, "_dataset", lambda *a, **k: pytest.fail("data was loaded before the config was checked"))
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    line = _error(capsys)
    assert f"--config {cfg}: layer 'conv1' asks for [3] bits" in line and "--training-only" in line, line


def test_quantize_training_only_trains_a_config_no_engine_builds(data_dir, tmp_path, capsys):
    cfg = tmp_path / "bits3.yaml"
    cfg.write_text("- quant_types: [weight]\n  quant_bits: 3\n  op_types: [Conv2d]\n")
    argv = ["quantize", "--model", "lenet", "--config", str(cfg), "--dataset", "mnist", "--data-dir", str(data_dir)]
    limits = ["--train-limit", "256", "--test-limit", "100", "--no-progress", "--training-only"]
    assert main([*argv, *limits, "--out", str(tmp_path / "o")]) == 0
    calib = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert calib["conv1"]["weight_bits"] == 3


def test_missing_data_is_downloaded_into_the_cache_or_named_in_one_line(data_dir, tmp_path, capsys, monkeypatch):
    """No MIXQ_DATA and no shared/data: `quantize` downloads into the user cache before any work; when that fails
    (no internet), one line names the commands. The download itself is served from a file:// copy here."""
    from mixq.zoo import data, download

    monkeypatch.delenv("MIXQ_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_checkout_root", lambda: None)
    monkeypatch.setattr(download, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))  # refused: nothing listens there
    argv = ["quantize", "--model", "lenet", "--config", str(CONFIGS / "all_8bit.yaml"), "--dataset", "mnist"]
    argv += ["--train-limit", "256", "--test-limit", "100", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("mixq: no mnist data found; downloading it into ")
    assert len(err) == 2 and "run `mixq download mnist`" in err[1] and "MIXQ_DATA" in err[1], err
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(download, "MNIST_MIRRORS", ((data_dir / "mnist").as_uri() + "/",))
    assert main(argv) == 0
    assert data.holds(tmp_path / "cache" / "mixq" / "data", "mnist")
    assert (tmp_path / "o" / "calibration.json").is_file()


def test_download_from_a_data_directory_into_the_cache(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIXQ_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["download", "mnist", "--from", str(data_dir)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    assert (tmp_path / "cache" / "mixq" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert main(["download", "mnist", "--from", str(tmp_path / "nope")]) == 2
    assert "--from" in _error(capsys)


def test_a_closed_pipe_ends_inspect_quietly(calibration):
    """`mixq inspect x | head`: the reader goes away; no traceback, the shell's status for SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixq", "inspect", str(calibration)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_ctrl_c_in_the_demo_keeps_the_finished_strategies(data_dir, tmp_path, capsys, monkeypatch):
    """Interrupted while the second strategy trains: the first one's model file is kept (written atomically,
    complete) and stderr names it; the interrupt still ends the command with 130."""
    from mixq.zoo import demo
    from mixq.zoo.models import TorchModel
    from mixq.zoo.tutorial import TrainedVariant

    def train_variants(task, configs, *args, **kwargs):
        if isinstance(task, demo._WarmupTask):  # the untimed warm-up of every strategy
            return {}
        ((name, config),) = configs.items()
        if config is not None:
            raise KeyboardInterrupt
        return {name: TrainedVariant(name, TorchModel().eval(), None, 10.0, [0.1])}

    monkeypatch.setattr(demo, "train_variants", train_variants)
    argv = ["demo", "--quick", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, "--backend", "onnxruntime"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "mixq demo: interrupted"
    assert err[-2] == (
        f"mixq demo: interrupted during training or building; kept in {tmp_path}: all in 32bit "
        "(all_in_32bit_model.pth) (no table: it needs every strategy)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all_in_32bit_model.pth"]
    assert set(torch.load(tmp_path / "all_in_32bit_model.pth")) == set(TorchModel().state_dict())


def _own_model(tmp_path):
    """The model of examples/own_model.py (a 1-D signal classifier no registry knows) and random inputs for it."""
    torch.manual_seed(1)
    return REPO / "examples" / "own_model.py", torch.randn(300, 2, 32)


def test_own_model_ptq_from_the_cli_with_calib_and_eval_data(tmp_path, capsys):
    """PTQ of a model the CLI has never seen, on the user's own .npy inputs, evaluated on their own labelled .pt
    data (labels = the float model's own predictions, so the float model scores 100%); then build and inspect."""
    import importlib.util

    import numpy as np

    path, x = _own_model(tmp_path)
    spec = importlib.util.spec_from_file_location("own_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.Net().eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with torch.no_grad():
        labels = net(x[200:]).argmax(1)
    np.save(tmp_path / "calib.npy", x[:200].numpy())
    torch.save({"images": x[200:], "labels": labels}, tmp_path / "eval.pt")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- quant_types: [input, weight]\n  quant_bits: 8\n  op_types: [Conv1d, Linear]\n")
    argv = ["quantize", "--model", f"{path}:Net", "--weights", str(tmp_path / "w.pth"), "--config", str(cfg)]
    argv += ["--method", "ptq", "--calib-data", str(tmp_path / "calib.npy"), "--eval-data", str(tmp_path / "eval.pt")]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"fake-quant accuracy ([\d.]+)% on 100 test images", out).group(1))
    assert acc >= 90.0, out  # 8-bit PTQ of a float model that scores 100% on these labels by construction
    calib = json.loads((tmp_path / "q" / "calibration.json").read_text())
    assert {k for k in calib if not k.startswith("__")} == {"conv", "fc"} and calib["conv"]["input_bits"] == 8
    build = ["build", "--model", f"{path}:Net", "--weights", str(tmp_path / "q" / "model.pth")]
    build += ["--calibration", str(tmp_path / "q" / "calibration.json"), "--input-shape", "4,2,32"]
    assert main([*build, "--backend", "onnxruntime", "--out", str(tmp_path / "own.mixq")]) == 0
    assert main(["inspect", str(tmp_path / "own.mixq")]) == 0
    assert "conv (Conv1d): int8" in capsys.readouterr().out
    bench = ["bench", str(tmp_path / "own.mixq"), "--batch", "4", "--runs", "2", "--warmup", "0"]
    assert main([*bench, "--eval-data", str(tmp_path / "eval.pt")]) == 0
    engine_acc = float(re.search(r"engine top-1 ([\d.]+)% on the 100 images", capsys.readouterr().out).group(1))
    # The engine computes the fake-quant model in integers (requantized once per layer): near-tie samples may
    # flip, not more than 2 of 100 (here: 1).
    assert abs(engine_acc - acc) <= 2.0, (engine_acc, acc)
    torch.save({"images": torch.zeros(3, 2, 30), "labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "bad.pt")
    assert main([*bench, "--eval-data", str(tmp_path / "bad.pt")]) == 2
    assert "samples [2, 30], the engine takes [2, 32]" in _error(capsys)


@pytest.mark.parametrize(
    ("make", "option", "expected"),
    [
        (lambda p: np_save(p / "c.npy", np_zeros((4, 2, 32), "uint8")), "calib", "uint8 [4, 2, 32]; the model takes"),
        (lambda p: np_save(p / "c.npy", np_zeros((4, 3, 32), "float32")), "calib", "expects 2 input channels, got 3"),
        (lambda p: torch.save({"a": torch.zeros(2)}, p / "c.pt"), "calib", "holds a dict with keys ['a']"),
        (lambda p: torch.save(torch.zeros(4, 2, 32), p / "c.pt"), "eval", "holds inputs only (float32 [4, 2, 32])"),
        (lambda p: (p / "c.csv").write_text("1,2"), "calib", "expected a .npy, .npz, .pt, .pth file"),
    ],
)
def test_own_data_files_are_checked_before_any_work(make, option, expected, tmp_path, capsys):
    path, _ = _own_model(tmp_path)
    make(tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.stem == "c")
    argv = ["quantize", "--model", f"{path}:Net", "--random-weights", "--config", str(CONFIGS / "all_8bit.yaml")]
    argv += ["--method", "ptq", "--out", str(tmp_path / "q")]
    argv += (
        ["--calib-data", str(data)]
        if option == "calib"
        else ["--calib-data", str(_npy(tmp_path)), "--eval-data", str(data)]
    )
    assert main(argv) == 2
    line = _error(capsys)
    assert f"--{option}-data {data}" in line and expected in line, line
    assert not (tmp_path / "q").exists()


def test_calib_data_is_for_ptq_and_dataset_or_calib_data_is_needed(tmp_path, capsys):
    path, _ = _own_model(tmp_path)
    argv = ["quantize", "--model", f"{path}:Net", "--random-weights", "--config", str(CONFIGS / "all_8bit.yaml")]
    assert main([*argv, "--out", str(tmp_path / "q")]) == 2
    assert "give --dataset (mnist, cifar10) or, for PTQ of your own model, --calib-data FILE" in _error(capsys)
    assert main([*argv, "--calib-data", str(_npy(tmp_path)), "--out", str(tmp_path / "q")]) == 2
    assert "--calib-data calibrates PTQ (--method ptq)" in _error(capsys)


def _npy(tmp_path):
    import numpy as np

    np.save(tmp_path / "ok.npy", np.random.default_rng(0).standard_normal((8, 2, 32)).astype("float32"))
    return tmp_path / "ok.npy"


def np_save(path, array):
    import numpy as np

    np.save(path, array)


def np_zeros(shape, dtype):
    import numpy as np

    return np.zeros(shape, dtype)


def test_ptq_calibrates_on_an_image_folder_through_a_transform(tmp_path, capsys):
    """--calib-data DIR: images of mixed sizes, resized and normalized by --calib-transform, calibrate LeNet; the
    folder's inputs are exactly what the transform says (checked against a hand computation of one image)."""
    from PIL import Image

    from mixq.zoo.data import ImageTransform, load_image_folder

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i, size in enumerate([(28, 28), (40, 30), (28, 28), (56, 56)]):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i}.png")
    transform = "size=28x28;mode=L;mean=0.1307;std=0.3081"
    x = load_image_folder(tmp_path / "imgs", ImageTransform.parse(transform))
    assert x.shape == (4, 1, 28, 28)
    expected = (np.asarray(Image.open(folder / "0.png"), dtype=np.float32) / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(x[0, 0], torch.from_numpy(expected), atol=1e-6)
    weights = tmp_path / "w.pth"
    torch.save(create_model("lenet").state_dict(), weights)
    argv = ["quantize", "--model", "lenet", "--weights", str(weights), "--config", str(CONFIGS / "all_8bit.yaml")]
    argv += ["--method", "ptq", "--calib-data", str(tmp_path / "imgs"), "--no-progress", "--out", str(tmp_path / "q")]
    assert main([*argv, "--calib-transform", transform]) == 0
    assert "accuracy was not measured" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "calibration.json").read_text())["conv1"]["input_bits"] == 8
    # without a size the differently sized images are an error naming one, before any work
    assert main([*argv, "--calib-transform", "mode=L"]) == 2
    assert "give the transform a size=HxW" in _error(capsys)
    assert main([*argv, "--calib-transform", "size=28;mode=L"]) == 2
    assert "--calib-transform: transform size must be HxW" in _error(capsys)
