"""What mpdp needs from its dependencies and how it meets the versions a user installs today:
errors an engine raises while adding a request (vLLM >= 0.27 raises classes of its own), the
declared version ranges, Ray's token authentication and unreachable addresses, and the embedded
model's cache."""

from __future__ import annotations

import sys
import types

import pytest

import mpdp
from conftest import full_size, wait_until


# -- a request's own failure, whatever the engine raised while adding it ---------------------------
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_child_left")
def test_any_exception_from_add_fails_that_request_alone(make_pool):
    pool = make_pool(num_workers=1, engine_options={"faults": True, "delay_s": 0.05})
    pid = pool.stats()["workers"][0]["pid"]
    around = [pool.submit(f"ok {i}") for i in range(20)]
    bad = pool.submit("!fault:addfail")
    around += [pool.submit(f"ok {i}") for i in range(20, 40)]
    with pytest.raises(mpdp.errors.EngineError, match="EchoAddError: the echo engine failed to add"):
        bad.result(timeout=30)
    assert [f.result(timeout=30).text for f in around] == [f"ok {i}" for i in range(40)]
    worker = pool.stats()["workers"][0]
    assert worker["pid"] == pid and worker["restarts"] == 0 and full_size(pool)   # the same process
    assert pool.submit("still serving").result(timeout=10).text == "still serving"


class _FakeVLLMError(Exception):                 # vllm.exceptions as 0.27 .. 0.34 define it
    pass


class _FakeClientError(_FakeVLLMError):
    pass


class _FakeValidationError(_FakeClientError):
    pass


@pytest.fixture
def vllm_0_27_exceptions(monkeypatch):
    """A ``vllm.exceptions`` shaped as vLLM >= 0.27's, with or without a vLLM installed (the real
    classes of each release are checked by tests/test_vllm_api.py)."""
    fake = types.ModuleType("vllm.exceptions")
    fake.VLLMError, fake.VLLMClientError, fake.VLLMValidationError = (
        _FakeVLLMError, _FakeClientError, _FakeValidationError)
    package = sys.modules.get("vllm") or types.ModuleType("vllm")
    monkeypatch.setitem(sys.modules, "vllm", package)
    monkeypatch.setitem(sys.modules, "vllm.exceptions", fake)


@pytest.mark.usefixtures("vllm_0_27_exceptions")
def test_vllm_request_errors_are_the_callers_fault():
    from mpdp.engines.base import EngineResult
    from mpdp.engines.vllm import request_error

    bad = _FakeValidationError("top_p must be in (0, 1], got 7")
    assert not isinstance(bad, ValueError)
    error = request_error(bad, "vLLM rejected the request: ")
    assert type(error) is ValueError and str(error) == "vLLM rejected the request: top_p must be in (0, 1], got 7"
    assert EngineResult.failure(1, error).error_type == "ValueError"        # a 400, not a crash
    assert type(request_error(ValueError("bad"))) is ValueError
    assert type(request_error(TypeError("bad"))) is TypeError
    died = RuntimeError("engine core died")
    assert request_error(died) is None       # not bad input: raised as it is, the request's EngineError
    assert EngineResult.failure(1, died).error_type == "EngineError"


# -- DSPy: the LM's pool through DSPy's public API ----------------------------------------------------
def test_dspy_lm_reaches_its_pool_through_the_public_engine(monkeypatch):
    dspy = pytest.importorskip("dspy")
    from mpdp.integrations import dspy as mdspy

    if mdspy.lm15 is None:
        pytest.skip(f"mpdp.dspy.LM needs DSPy >= 3.4, this is {dspy.__version__}")
    lm = mdspy.LM("echo-model", engine="echo", num_workers=1, cache=False)
    assert lm.handle is lm.engine.handle and not lm.pool_started       # nothing started
    marker = types.SimpleNamespace(handle=object())
    monkeypatch.setattr(dspy.LM, "engine", property(lambda self: marker))
    assert lm.handle is marker.handle          # not DSPy's private _engine_spec


def test_what_the_tests_run_on_is_inside_the_declared_ranges():
    """The ranges in setup.cfg cover the versions these tests ran on (their upper bounds are the
    newest checked: a newer install fails here until it is checked and the bound moved)."""
    import importlib.metadata
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from setuptools.config.setupcfg import read_configuration

    options = read_configuration(Path(__file__).resolve().parents[1] / "setup.cfg")["options"]
    here = ".".join(map(str, sys.version_info[:3]))
    assert here in SpecifierSet(options["python_requires"])
    for extra in ("vllm", "dspy", "ray"):
        (requirement,) = map(Requirement, options["extras_require"][extra])
        assert any(spec.operator == ">=" for spec in requirement.specifier), requirement   # a lower bound
        assert any(spec.operator == "<" for spec in requirement.specifier), requirement    # an upper bound
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert requirement.specifier.contains(installed, prereleases=True), (extra, installed, requirement)
