import json
import subprocess
import sys

from mixq.cli import main


def test_demo_quick_prints_table_and_writes_results(data_dir, tmp_path, capsys):
    assert main(["demo", "--quick", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"]) == 0
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


def test_quantize_build_bench_inspect_report_round_trip(data_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- quant_types: [input, weight]\n  quant_bits: {input: 8, weight: 7}\n  op_types: [Linear]\n")
    out = tmp_path / "q"
    common = ["--data-dir", str(data_dir), "--no-progress"]
    assert (
        main(
            [
                "quantize",
                "--model",
                "lenet",
                "--config",
                str(cfg),
                "--method",
                "qat",
                "--dataset",
                "mnist",
                "--train-limit",
                "4096",
                "--test-limit",
                "1000",
                "--out",
                str(out),
                *common,
            ]
        )
        == 0
    )
    assert "fake-quant accuracy" in capsys.readouterr().out
    engine = tmp_path / "lenet.mixq"
    assert (
        main(
            [
                "build",
                "--model",
                "lenet",
                "--weights",
                str(out / "model.pth"),
                "--calibration",
                str(out / "calibration.json"),
                "--input-shape",
                "32,1,28,28",
                "--out",
                str(engine),
            ]
        )
        == 0
    )
    assert "| fc1 | Linear | int8 | int8 | QGemm |" in capsys.readouterr().out
    assert main(["bench", str(engine), "--batch", "1", "4", "--runs", "5", "--warmup", "1"]) == 0
    assert "| 4 |" in capsys.readouterr().out
    assert main(["inspect", str(engine)]) == 0
    assert "fc1 (Linear): int8" in capsys.readouterr().out
    assert main(["inspect", str(out / "calibration.json")]) == 0
    assert "fc1 (Linear): input=8b, weight=7b" in capsys.readouterr().out
    assert main(["report", str(engine), "--profile-batch", "4", "--runs", "2"]) == 0
    assert "time us" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.mixq")]) == 2
    assert "missing.mixq: engine file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert (
        main(["quantize", "--model", "lenet", "--config", str(bad), "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    )
    assert "--config" in capsys.readouterr().err
    assert (
        main(["build", "--model", "nope", "--calibration", "x.json", "--input-shape", "1,1,28,28", "--out", "e"]) == 2
    )
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.md" in capsys.readouterr().err


def test_ctrl_c_exits_130_and_leaves_no_partial_files(data_dir, tmp_path):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "mixq", "demo", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell runs background jobs with SIGINT ignored, and children inherit that: give the child the
        # default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr.readline().startswith("mixq demo: training")  # past imports and data loading
    time.sleep(2)  # inside the first training epoch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "mixq demo: interrupted"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
