import os
import signal
import subprocess
import sys
import time

import pytest

from mixq._io import atomic_write

WRITER = r"""
import sys, time
from mixq._io import atomic_write
with atomic_write(sys.argv[1], "wb") as f:
    for _ in range(10_000):
        f.write(b"x" * 65536)   # 640 MB, far more than gets written before the kill
        f.flush()
        time.sleep(0.001)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_write_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "calib.json"
    target.write_text('{"previous": true}')
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the temporary file has real content
        tmps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if tmps and tmps[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail("the writer never started writing")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert target.read_text() == '{"previous": true}'  # the old file, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "calib.json"]
    assert all(n.startswith(".calib.json.") and n.endswith(".tmp") for n in leftovers)  # never the final name


def test_exception_mid_write_removes_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new, partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="modes"), atomic_write(tmp_path / "x", "a"):
        pass
