import subprocess
import sys


def test_import_mixq_is_light():
    code = (
        "import sys, mixq, mixq.nni, torch\n"
        "heavy = [m for m in ('onnxruntime', 'tensorrt', 'onnx', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
