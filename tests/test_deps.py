"""What mpdp needs from its dependencies and how it meets the versions a user installs today:
errors an engine raises while adding a request (vLLM >= 0.27 raises classes of its own), the
declared version ranges, Ray's token authentication and unreachable addresses, and the embedded
model's cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

# As in tests/test_ray.py: read once when Ray is first imported; with it every node of a local
# Ray cluster (and its GCS address) is 127.0.0.1, never the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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
    import configparser
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    here = ".".join(map(str, sys.version_info[:3]))
    assert here in SpecifierSet(setup["options"]["python_requires"])
    for extra in ("vllm", "dspy", "ray"):
        (requirement,) = map(Requirement, setup["options.extras_require"][extra].split())
        assert any(spec.operator == ">=" for spec in requirement.specifier), requirement   # a lower bound
        assert any(spec.operator == "<" for spec in requirement.specifier), requirement    # an upper bound
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert requirement.specifier.contains(installed, prereleases=True), (extra, installed, requirement)


# -- Ray: the README's route with today's token authentication; an address that does not answer --------
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(env: dict, address: str, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    folder = Path(env["HOME"])
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"line {i}"}) + "\n"
                                             for i in range(20)))
    return subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(folder / "in.jsonl"),
                           "--output", str(folder / "out.jsonl"), "--engine", "echo", "--num-workers", "2",
                           "--launcher", "ray", "--ray-address", address, "--no-progress", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_head_with_a_token():
    """``ray start --head`` on 127.0.0.1, where a Ray token already exists (as any local ray.init()
    of Ray >= 2.59 leaves one in ~/.ray): Ray then turns token authentication on. A private HOME
    and RAY_TMPDIR; the head runs with --block in its own process group, ended with it."""
    pytest.importorskip("ray")
    folder = tempfile.mkdtemp(prefix="mpdp-deps-")        # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN",
                                                             "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=folder, RAY_TMPDIR=os.path.join(folder, "t"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=120, check=True)
    assert (Path(folder) / ".ray" / "auth_token").is_file()
    port = _free_port()
    log_path = Path(folder) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen([*ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                 f"--port={port}", "--include-dashboard=false", "--num-cpus=2",
                                 "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: "block forever" in log_path.read_text() or head.poll() is not None, 180,
                   interval=0.5, what="the Ray head to start")
        assert head.poll() is None, log_path.read_text()[-3000:]
        assert "Token authentication is enabled" in log_path.read_text()      # the case of the issue
        yield env, f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1)                  # what the head's SIGTERM ended leaves its group: none may stay
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(400)
def test_the_readme_ray_route_works_with_token_authentication(ray_head_with_a_token):
    env, address = ray_head_with_a_token
    r = _generate(env, address)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (Path(env["HOME"]) / "out.jsonl").read_text().splitlines()]
    assert [(x["id"], x["text"]) for x in lines] == [(f"r{i}", f"line {i}") for i in range(20)]
    # A driver told not to authenticate is refused, after Ray's own retries, in one line that says why.
    r = _generate({**env, "RAY_AUTH_MODE": "disabled"}, address, "--overwrite")
    assert r.returncode == 1
    error = [x for x in r.stderr.splitlines() if x.startswith("mpdp")]
    assert len(error) == 1 and f"could not connect to the Ray cluster at {address}" in error[0], r.stderr[-3000:]
    assert "RAY_AUTH_MODE=disabled here: a cluster with token authentication refuses this driver" in error[0]


@pytest.mark.timeout(120)
def test_an_address_that_does_not_answer_fails_at_once_in_one_line(tmp_path):
    pytest.importorskip("ray")
    port = _free_port()                                   # closed: nothing listens there
    env = dict(os.environ, HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    r = _generate(env, f"127.0.0.1:{port}", timeout=100)   # Ray alone retries for over ten minutes
    assert r.returncode == 1
    assert r.stderr.strip() == (f"mpdp: error: the workers did not start: no Ray cluster answers at "
                                f"127.0.0.1:{port} (connection refused): start one there "
                                f"(`ray start --head --port={port}`) or give the head node's HOST:PORT")
    # The same through the API: a ConnectionError (and an mpdp error) before anything started.
    from mpdp.launch.ray import RayConnectError

    with pytest.raises(RayConnectError, match=f"no Ray cluster answers at 127.0.0.1:{port}") as info:
        mpdp.Pool(engine="echo", num_workers=1, launcher="ray", ray_address=f"127.0.0.1:{port}")
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, mpdp.errors.MpdpError)


def test_which_addresses_are_probed():
    from mpdp.launch.ray import _host_port

    assert _host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    for ray_own in (None, "", "auto", "local", "ray://127.0.0.1:10001", "127.0.0.1"):
        assert _host_port(ray_own) is None


# -- the embedded model's cache: keyed by content, one copy, atomic ------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A tiny stand-in GGUF, an empty cache, and a converter stub that records its calls."""
    import mpdp.models as models

    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF v1 weights")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MPDP_CACHE_DIR", str(cache))
    monkeypatch.setattr(models, "_gguf_path", lambda: gguf)
    calls = []

    def convert(source, out):
        calls.append(source.read_bytes())
        if source.read_bytes().startswith(b"broken"):
            (out / "half-written.safetensors").write_bytes(b"x")
            raise RuntimeError("converting failed (exit 1)")
        (out / "config.json").write_text("{}")
        (out / "weights").write_bytes(source.read_bytes())

    monkeypatch.setattr(models, "_convert_in_subprocess", convert)
    return types.SimpleNamespace(gguf=gguf, cache=cache, calls=calls, resolve=models.resolve_model)


def _copies(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def _reinstall(path: Path, content: bytes) -> None:
    """What pip does to the file on a reinstall: a new file, a new mtime."""
    path.unlink()
    path.write_bytes(content)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))


def test_the_same_file_reinstalled_is_the_same_folder_and_converts_once(fake_gguf, capsys):
    first = fake_gguf.resolve("smollm2-135m-instruct")
    assert "mpdp: converting the embedded model model.gguf" in capsys.readouterr().err   # not silent
    _reinstall(fake_gguf.gguf, b"GGUF v1 weights")
    assert fake_gguf.resolve("smollm2-135m-instruct") == first
    assert len(fake_gguf.calls) == 1 and _copies(fake_gguf.cache) == [Path(first).name]
    assert capsys.readouterr().err == ""                               # found, nothing to say


def test_a_new_file_replaces_the_old_copy(fake_gguf):
    first = fake_gguf.resolve("smollm2-135m-instruct")
    # Copies the old size-and-mtime keys left behind (four were seen, 2.1 GB), and a half-removed one.
    for name in ("smollm2-135m-instruct-cc770be9b3", "smollm2-135m-instruct-0123456789"):
        (fake_gguf.cache / name).mkdir()
        (fake_gguf.cache / name / "config.json").write_text("{}")
    _reinstall(fake_gguf.gguf, b"GGUF v2 weights")
    second = fake_gguf.resolve("smollm2-135m-instruct")
    assert second != first and (Path(second) / "weights").read_bytes() == b"GGUF v2 weights"
    assert _copies(fake_gguf.cache) == [Path(second).name]             # one copy of the model
    assert not [p for p in fake_gguf.cache.iterdir() if ".tmp-" in p.name]


def test_a_failed_conversion_leaves_no_temp_folder_and_keeps_the_copy_there_was(fake_gguf):
    first = fake_gguf.resolve("smollm2-135m-instruct")
    _reinstall(fake_gguf.gguf, b"broken weights")
    with pytest.raises(RuntimeError, match="converting failed"):
        fake_gguf.resolve("smollm2-135m-instruct")
    assert _copies(fake_gguf.cache) == [Path(first).name]
    assert not [p for p in fake_gguf.cache.iterdir() if ".tmp-" in p.name]


def test_the_file_is_hashed_once_per_size_and_mtime(fake_gguf, monkeypatch):
    import mpdp.models as models

    hashed = []
    real = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda path: hashed.append(path) or real(path))
    folder = fake_gguf.resolve("smollm2-135m-instruct")
    for _ in range(3):
        assert fake_gguf.resolve("smollm2-135m-instruct") == folder
    assert len(hashed) == 1
    (fake_gguf.cache / ".sources.json").write_text("not json")          # a damaged index: hashed again
    assert fake_gguf.resolve("smollm2-135m-instruct") == folder and len(hashed) == 2


def test_a_killed_converters_temp_folder_is_removed_by_the_next(fake_gguf):
    fake_gguf.cache.mkdir()
    stale = fake_gguf.cache / ".smollm2-135m-instruct-abc.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    fake_gguf.resolve("smollm2-135m-instruct")
    assert not stale.exists()


@pytest.mark.timeout(600)
def test_the_real_conversion_into_an_empty_cache(tmp_path):
    """The real thing once (about 30 s): a progress line, a loadable folder, one copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    env = dict(os.environ, MPDP_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    code = "from mpdp.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = Path(r.stdout.strip())
    assert r.stderr.startswith("mpdp: converting the embedded model SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "mpdp: converted in" in r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    assert _copies(tmp_path / "cache") == [folder.name]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>user" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
