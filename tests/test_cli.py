import json
import subprocess
import sys

from mixq.cli import main


def test_demo_quick_prints_table_and_writes_results(data_dir, tmp_path, capsys):
    assert main(["demo", "--quick", "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| strategy | accuracy | train s/epoch |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in results["rows"]] == ["all in 32bit (fp32 training)", "tutorial config, 8-bit QAT"]
    for row in results["rows"]:
        assert 10.0 < row["accuracy"] <= 100.0  # better than chance on 1000 test images
        assert row["train_seconds_per_epoch"] > 0
    assert (tmp_path / "mnist_calibration.json").is_file() and (tmp_path / "mnist_model.pth").is_file()


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mixq", "demo", "--quick", "--data-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"mixq demo: error: data directory {tmp_path / 'missing'} does not exist"
    ]
