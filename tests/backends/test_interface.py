"""The backend interface: every registered backend declares what it can run (read without building), and
``auto``, the search and ``speedup`` ask those declarations instead of naming backends."""

import pytest

from mixq.backends import EngineError, backends_on, list_backends, registered_backend
from mixq.backends.base import PRECISIONS


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_declares_device_and_precisions(name):
    backend = registered_backend(name)
    assert backend.name == name
    assert backend.device in ("cpu", "cuda")
    assert "fp32" in backend.precisions and backend.precisions <= PRECISIONS
    assert backend.emulated <= PRECISIONS and not (backend.emulated & backend.precisions)


def test_backends_by_device_cover_the_registry_once():
    cpu, cuda = backends_on("cpu"), backends_on("cuda")
    assert sorted(cpu + cuda) == list_backends() and not set(cpu) & set(cuda)
    assert set(cpu) == {"onnxruntime", "openvino"} and set(cuda) == {"cuda", "tensorrt"}
    assert registered_backend("tpu") is None


def test_auto_candidates_come_from_the_devices():
    from mixq import auto

    on_cpu = auto.candidate_backends()
    assert on_cpu and all(registered_backend(n).device == "cpu" for n in on_cpu)
    assert not hasattr(auto, "CPU_BACKENDS") and not hasattr(auto, "GPU_BACKENDS")


def test_search_offers_no_emulated_precision():
    from mixq.search.space import CHOICES, offered_on, runs_on

    for name in list_backends():
        backend = registered_backend(name)
        for choice in CHOICES.values():
            assert offered_on(choice.name, name) == (choice.precision not in backend.emulated)
    assert set(runs_on("fp8")) == {n for n in list_backends() if "fp8" not in registered_backend(n).emulated}


def test_get_backend_of_an_unknown_name_is_one_clear_error():
    with pytest.raises(EngineError, match="unknown backend 'tpu'"):
        from mixq.backends import get_backend

        get_backend("tpu")
