"""docs/api.md is generated from the docstrings (scripts/api_docs.py, checked here in CI) and must match them."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API_MD = REPO / "docs" / "api.md"


@pytest.fixture(scope="module")
def api_docs():
    spec = importlib.util.spec_from_file_location("api_docs", REPO / "scripts" / "api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(api_docs) -> str:
    return api_docs.generate()


def test_api_reference_is_up_to_date(generated):
    if API_MD.read_text(encoding="utf-8") != generated:
        pytest.fail("docs/api.md is stale: run python scripts/api_docs.py", pytrace=False)


def test_every_public_name_has_a_docstring(api_docs):
    import mixq

    missing = api_docs.missing_docstrings("mixq")
    assert not missing, f"names in mixq.__all__ without a docstring: {', '.join(missing)}"
    assert len(mixq.__all__) > 30  # the check ran over the real list


def test_every_exported_name_is_documented(api_docs, generated):
    for namespace in api_docs.NAMESPACES:
        for name in importlib.import_module(namespace).__all__:
            assert f'<a id="{namespace}.{name}"></a>' in generated, f"{namespace}.{name} missing from docs/api.md"
    # signature, home module and docstring are there for a known function
    entry = generated.split('<a id="mixq.quantize"></a>', 1)[1].split("<a id=", 1)[0]
    assert "*function*, defined in `mixq.api`" in entry
    assert "quantize(" in entry and "model" in entry
    doc_first_line = importlib.import_module("mixq").quantize.__doc__.strip().splitlines()[0]
    assert doc_first_line in entry
    # constants get the docstring written after them, classes their public methods
    assert "The one float type mixq quantizes to" in generated
    assert "#### `Backend.build` *(method)*" in generated


def test_output_does_not_depend_on_the_machine(generated):
    assert not re.search(r"0x[0-9a-fA-F]{6,}", generated), "a memory address leaked into docs/api.md"
    for path in {str(REPO), sys.prefix, str(Path.home())} - {"/"}:
        assert path not in generated, f"an absolute path ({path}) leaked into docs/api.md"


def test_check_mode_says_one_line_and_never_writes(tmp_path, api_docs, generated, monkeypatch, capsys):
    target = tmp_path / "api.md"
    monkeypatch.setattr(api_docs, "OUT", target)
    target.write_text("# old\n", encoding="utf-8")
    assert api_docs.main(["--check"]) == 1
    assert capsys.readouterr().err == "docs/api.md is stale: run python scripts/api_docs.py\n"
    assert target.read_text(encoding="utf-8") == "# old\n"
    target.write_text(generated, encoding="utf-8")
    assert api_docs.main(["--check"]) == 0
    assert capsys.readouterr().err == ""
