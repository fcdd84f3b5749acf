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
