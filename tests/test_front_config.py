"""One pool record for every front door: ``PoolConfig``'s fields give both subcommands their pool
flags and every DSPy class its pool keywords; engine options and sampling values are checked in
the caller's process before any worker starts; the defaults by entry point are one table
(``mpdp.defaults``) that the doors read and the README quotes; ``mpdp serve`` answers a chat
request without ``max_tokens`` up to the context, as OpenAI's API and ``vllm serve`` do."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

import mpdp
from mpdp.cli import build_parser, main
from mpdp.config import POOL_FIELDS, TO_CONTEXT, PoolConfig
from test_server_support import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def _pool_flags(subcommand: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[subcommand]
    group = next(g for g in parser._action_groups if g.title == "pool")
    return [a.option_strings[0] for a in group._group_actions]


def test_both_subcommands_list_the_same_pool_flags_from_pool_config():
    flags = PoolConfig.cli_flags()
    assert _pool_flags("generate") == _pool_flags("serve") == flags
    for wanted in ("--max-pending", "--launcher", "--ray-address", "--routing", "--max-crashes",
                   "--engine-option", "--num-gpus", "--tensor-parallel-size", "--step-timeout"):
        assert wanted in flags
    # every field but the door's own choices has a flag
    assert {f.name for f in dataclasses.fields(PoolConfig) if not f.metadata.get("flag")} == {"wait_ready", "sampling"}
    for sub in ("generate", "serve"):
        text = subprocess.run([sys.executable, "-m", "mpdp.cli", sub, "--help"], cwd=ROOT, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60).stdout
        assert all(flag in text for flag in flags), sub


def test_flags_become_the_config():
    args = build_parser().parse_args(["serve", "--max-pending", "7", "--launcher", "ray", "--ray-address", "h:1",
                                      "--routing", "least_loaded", "--max-crashes", "3", "--engine-option", "a=1",
                                      "--engine-option", "b=x", "--gpus", "0,2", "--worker-env", "K=v"])
    config = PoolConfig.from_cli_args(args)
    assert (config.max_pending, config.launcher, config.ray_address, config.routing, config.max_crashes) == \
        (7, "ray", "h:1", "least_loaded", 3)
    assert config.engine_options == {"a": 1, "b": "x"} and config.gpus == [0, 2] and config.worker_env == {"K": "v"}


# A valid value other than the default for every pool setting.
SETTINGS = {
    "model": "some-model", "engine": "echo", "num_workers": 3, "num_gpus": None, "tensor_parallel_size": 1,
    "engine_options": {"delay_s": 0.5}, "gpus": None, "routing": "prefix_affinity", "routing_options": {"slack": 100}, "max_batch": 64, "batch_limit": 8, "max_pending": 99,
    "max_crashes": 5, "heartbeat_interval": 0.25, "heartbeat_timeout": 9.0, "step_timeout": 50.0,
    "ready_timeout": 70.0, "shutdown_timeout": 3.0, "dispatcher_timeout": 20.0, "transport": "tcp",
    "transport_host": "127.0.0.2", "transport_port": 5999, "worker_logs": "inherit", "worker_env": {"A": "b"},
    "launcher": "ray", "ray_address": "head:6379", "wait_ready": False, "sampling": {"ignore_eos": True},
}


def test_the_settings_table_covers_every_field():
    assert set(SETTINGS) == POOL_FIELDS


def _config_of(lm) -> dict:
    return lm.handle.config.to_dict()


def test_dspy_lm_accepts_every_pool_setting(no_child_left):
    import mpdp.dspy as mdspy

    lm = mdspy.LM(**SETTINGS)
    assert _config_of(lm) == SETTINGS and not lm.pool_started
    assert lm.model == "some-model"
    # the same as a record, and one setting at a time on top of it
    from_config = mdspy.LM(config=PoolConfig(**SETTINGS), max_pending=5)
    assert _config_of(from_config) == {**SETTINGS, "max_pending": 5}
    legacy = mdspy.PoolLM(**SETTINGS)
    assert _config_of(legacy) == SETTINGS
    reloaded = mdspy.PoolLM(**{k: v for k, v in legacy.dump_state().items() if k != "_dspy_lm_class"})
    assert _config_of(reloaded) == SETTINGS
    seed = mdspy.vLLMOfflineMultiGPU(**{k: v for k, v in SETTINGS.items() if k not in ("model",)})
    assert _config_of(seed)["max_pending"] == 99 and _config_of(seed)["launcher"] == "ray"
    seed_from_config = mdspy.vLLMOfflineMultiGPU(config=PoolConfig(engine="echo", routing="least_loaded"))
    assert _config_of(seed_from_config)["routing"] == "least_loaded"
    with pytest.raises(TypeError, match="unknown sampling keyword 'rooting', and no pool setting"):
        mdspy.LM(engine="echo", rooting="x")


def test_sampling_and_pool_keywords_are_told_apart_by_the_field_list(no_child_left):
    import mpdp.dspy as mdspy

    lm = mdspy.LM(engine="echo", ignore_eos=True, max_pending=11, top_k=3)
    config = lm.handle.config
    assert config.max_pending == 11 and config.sampling.ignore_eos is True      # a pool-level default
    assert lm.kwargs["top_k"] == 3 and config.sampling.top_k is None            # DSPy carries it per call


def _count_spawns(monkeypatch) -> list:
    import subprocess as sp

    spawned = []
    real = sp.Popen

    def popen(*args, **kwargs):
        spawned.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "Popen", popen)
    return spawned


@pytest.mark.parametrize("subcommand", ["generate", "serve"])
def test_an_unknown_engine_option_is_exit_2_before_any_worker_starts(subcommand, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    files = ["--input", str(src), "--output", str(tmp_path / "out.jsonl")] if subcommand == "generate" else []
    spawned = _count_spawns(monkeypatch)
    port = ["--port", "0"] if subcommand == "serve" else []
    code = main([subcommand, *files, "--engine", "echo", "--engine-option", "nosuch=1", *port])
    err = capsys.readouterr().err
    assert code == 2 and spawned == []
    assert len(err.strip().splitlines()) == 1 and "nosuch" in err and "--engine-option" in err
    assert "delay_s" in err                          # the engine's own options, listed


def test_an_unknown_engine_option_on_the_command_line_is_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(src), "--output",
                           str(tmp_path / "o.jsonl"), "--engine", "hf", "--engine-option", "nosuch=1"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mpdp generate: error: --engine-option: unknown hf engine option 'nosuch'")


def test_sampling_flags_are_checked_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    spawned = _count_spawns(monkeypatch)
    assert main(["serve", "--engine", "echo", "--temperature", "-1", "--port", "0"]) == 2
    assert spawned == [] and "--temperature" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["echo", "hf"])
def test_pool_refuses_an_unknown_engine_option_naming_it(engine, monkeypatch):
    spawned = _count_spawns(monkeypatch)
    with pytest.raises(ValueError, match="unknown .* engine option 'nosuch'"):
        mpdp.Pool(engine=engine, engine_options={"nosuch": 1})
    assert spawned == []


def test_vllm_options_are_read_from_engine_args_without_importing_vllm(tmp_path, monkeypatch):
    """A stand-in vllm package: its arg_utils would fail on import, so reading it must not import it."""
    from mpdp.engines import vllm as vllm_engine

    pkg = tmp_path / "vllm"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the parent must not import vllm')\n")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "arg_utils.py").write_text(
        "import torch\nfrom dataclasses import dataclass\nfrom typing import ClassVar\n\n"
        "@dataclass\nclass EngineArgs:\n    model: str = 'm'\n    max_model_len: int | None = None\n"
        "    gpu_memory_utilization: float = 0.9\n    registry: ClassVar[dict] = {}\n\n"
        "    def create_engine_config(self):\n        local: int = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    vllm_engine._engine_args_fields.cache_clear()
    try:
        known = vllm_engine.VLLMEngine.known_options()
        assert known == {"max_model_len", "gpu_memory_utilization", "capacity", "kv_events"}
        vllm_engine.VLLMEngine.check_options({"max_model_len": 4096, "capacity": 8})
        with pytest.raises(ValueError, match="unknown vllm engine option 'nosuch'"):
            vllm_engine.VLLMEngine.check_options({"nosuch": 1})
        assert "vllm" not in sys.modules
    finally:
        vllm_engine._engine_args_fields.cache_clear()


# ─── Defaults by entry point ─────────────────────────────────────────────────


def test_the_readme_quotes_the_defaults_table():
    from mpdp.defaults import DOORS, markdown

    assert markdown() in (ROOT / "README.md").read_text()
    assert {"pool", "generate", "serve_chat", "serve_completions", "dspy", "dspy_hf", "seed", "seed_hf"} <= set(DOORS)


def test_each_door_reads_its_row():
    from mpdp.compat import _seed_defaults
    from mpdp.defaults import sampling_defaults
    from mpdp.integrations.dspy import AUTO, dspy_defaults
    from mpdp.server.app import endpoint_defaults

    args = build_parser().parse_args(["generate", "--input", "i", "--output", "o"])
    row = sampling_defaults("generate")
    assert (args.max_tokens, args.temperature) == (row["max_tokens"], row["temperature"])
    serve = build_parser().parse_args(["serve"])
    assert serve.max_tokens is None                      # each endpoint fills in its own
    assert dspy_defaults("hf") == {"temperature": 0.0, "max_tokens": 256} == sampling_defaults("dspy_hf")
    assert dspy_defaults("vllm") == {"temperature": None, "max_tokens": 2048}
    assert _seed_defaults("vllm", AUTO, AUTO, AUTO) == (0.6, 2048, 0.95)
    assert _seed_defaults("hf", AUTO, AUTO, AUTO) == (0.0, 256, None)

    class Plain:
        defaults: dict = {}

    class Capped:
        defaults = {"max_tokens": 50}

    assert endpoint_defaults(Plain()) == {"chat": {"max_tokens": TO_CONTEXT}, "completion": {}}
    assert endpoint_defaults(Capped()) == {"chat": {}, "completion": {}}      # --max-tokens wins


def test_echo_generates_up_to_the_context(make_pool):
    pool = make_pool(num_workers=1)
    text = "x" * 40
    assert pool.submit(text, max_tokens=TO_CONTEXT).result(60).text == text
    capped = make_pool(num_workers=1, engine_options={"max_model_len": 50})
    c = capped.submit(text, max_tokens=TO_CONTEXT).result(60)
    assert c.finish_reason == "length" and len(c.text) == 10
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        pool.submit(text, max_tokens="ten")


def test_serve_fills_each_endpoints_default_under_the_request(tmp_path):
    """echo (one character a token): chat without max_tokens echoes the whole prompt, completions
    stop at 16; a request's own max_tokens and --max-tokens still win."""
    text = "a prompt of more than sixteen characters"
    for flags, chat_len, completion_len in (([], len(text), 16), (["--max-tokens", "5"], 5, 5)):
        s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", *flags,
                          tmp_path=tmp_path)
        try:
            client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=60)
            chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
            assert len(chat.choices[0].message.content) == chat_len
            streamed = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                      stream=True)
            assert len("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) == chat_len
            assert len(client.completions.create(model="m", prompt=text).choices[0].text) == completion_len
            own = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                 max_tokens=3)
            assert own.choices[0].message.content == text[:3]
        finally:
            assert s.stop() == 0


@pytest.mark.timeout(400)
def test_serve_on_hf_answers_without_max_tokens_up_to_the_context(tmp_path):
    """The official client leaves max_tokens out: the answer ends at EOS or at the context (a small
    max_model_len bounds it on CPU), never after the engines' 16 tokens."""
    context = 96
    s = ServerProcess("--engine", "hf", "--num-workers", "1", "--served-model-name", "m", "--engine-option",
                      f"max_model_len={context}", tmp_path=tmp_path, timeout=240)
    try:
        client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=240)
        asks = [[{"role": "user", "content": "Write a long story about a dragon."}],
                [{"role": "user", "content": "What is 2+2? Answer with one number."}]]
        for messages in asks:
            r = client.chat.completions.create(model="m", messages=messages, temperature=0)
            reason, usage = r.choices[0].finish_reason, r.usage
            assert reason in ("stop", "length"), reason
            if reason == "length":                   # cut by the context, not by a default
                assert usage.prompt_tokens + usage.completion_tokens == context
                assert usage.completion_tokens > 16
        # /v1/completions keeps OpenAI's and vLLM's legacy default of 16 tokens
        c = client.completions.create(model="m", prompt="Once upon a time", temperature=0)
        assert c.usage.completion_tokens <= 16
    finally:
        assert s.stop() == 0


# ─── One front door: import, verbs ───────────────────────────────────────────


def test_import_mpdp_then_mpdp_dspy_lm():
    code = ("import sys, mpdp; assert 'dspy' not in sys.modules, 'import mpdp imported dspy'; "
            "lm = mpdp.dspy.LM(engine='echo', num_workers=1); print(type(lm).__name__, lm.pool_started)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["LM", "False"], proc.stderr


def test_submit_stream_asubmit_astream_take_the_same_keywords():
    def keywords(method):
        return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]

    assert keywords(mpdp.Pool.submit) == keywords(mpdp.Pool.asubmit) == keywords(mpdp.Pool.stream) == \
        keywords(mpdp.Pool.astream)


def test_every_pool_owner_closes_with_close(make_pool, no_child_left):
    import mpdp.dspy as mdspy

    for cls in (mpdp.Pool, mdspy.LM, mdspy.PoolLM, mdspy.MpdpEngine, mdspy.AsyncMpdpEngine, mdspy.PoolHandle,
                mdspy.vLLMOfflineMultiGPU, mdspy.vLLMOffline):
        assert callable(getattr(cls, "close", None)), cls
    assert mdspy.vLLMOfflineMultiGPU.shutdown                       # the seed's name, kept

    async def run():
        async with mpdp.Pool(engine="echo", num_workers=1) as pool:
            assert (await pool.asubmit("hi", max_tokens=2)).text == "hi"
        assert pool.closed
        other = make_pool(num_workers=1)
        await other.aclose()
        assert other.closed

    asyncio.run(run())


FRONT_DOORS = ("mpdp.cli", "mpdp.cli_args", "mpdp.batch", "mpdp.server", "mpdp.integrations", "mpdp.dspy",
               "mpdp.compat", "mpdp.openai_api", "mpdp.defaults")
BELOW = ["core", "routing", "wire", "worker", "launch", "engines", "pool.py", "config.py", "requests.py",
         "errors.py", "models.py", "gcpause.py"]


def test_nothing_below_the_front_doors_imports_one():
    """The front doors (command line, server, batch, DSPy, the seed's classes) sit on top of one
    pool: the pool and its parts never import them (at module level or inside a function)."""
    import ast

    files = [p for name in BELOW for p in ([ROOT / "mpdp" / name] if name.endswith(".py")
                                          else sorted((ROOT / "mpdp" / name).rglob("*.py")))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(path.name, n) for n in names if n.startswith(FRONT_DOORS)]
    assert len(files) > 20 and found == []
