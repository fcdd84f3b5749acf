import os
import signal
import stat
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


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", ["w", "wb"])
def test_new_file_gets_the_permissions_open_would_give(tmp_path, umask_022, mode):
    with atomic_write(tmp_path / "out", mode) as f:
        f.write("x" if mode == "w" else b"x")
    with open(tmp_path / "reference", mode) as f:
        f.write("x" if mode == "w" else b"x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o644  # 0o666 & ~0o022, not mkstemp's 0o600
    assert stat.S_IMODE((tmp_path / "reference").stat().st_mode) == 0o644


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_umask_is_honoured_and_left_alone(tmp_path, umask_022):
    os.umask(0o077)
    with atomic_write(tmp_path / "private") as f:
        f.write(b"x")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    assert os.umask(0o022) == 0o077  # atomic_write did not change the umask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_replacing_a_file_keeps_its_permissions(tmp_path, umask_022):
    target = tmp_path / "shared.json"
    target.write_text("old")
    target.chmod(0o664)
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o664  # as open(target, "w") would leave it
