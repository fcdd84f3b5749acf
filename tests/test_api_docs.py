"""docs/api.md is generated from the docstrings (scripts/api_docs.py) and must match them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_api_reference_matches_the_docstrings():
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "api_docs.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr


def test_api_reference_covers_the_public_names():
    import mixq
    import mixq.train

    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    for name in mixq.__all__:
        assert f"### `mixq.{name}" in text, name
    for name in mixq.train.__all__:
        assert f"### `mixq.train.{name}" in text, name
