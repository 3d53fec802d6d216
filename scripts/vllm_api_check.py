"""Does mpdp's vLLM engine still fit a vLLM release? Checked on a machine without a GPU.

    python scripts/vllm_api_check.py [VERSION]        # default: $MPDP_VLLM_CHECK_VERSION

mpdp drives vLLM's engine step by step, through APIs that move between releases (the renderer,
EngineArgs fields, SamplingParams' validation and its exception classes). A GPU run is the full
test (tests/test_vllm_gpu.py); this check sees most API drift on any machine whose torch is the
one the release was built against (vLLM 0.27 - 0.32: torch 2.13, the CPU build CI installs):

1. the release's wheel (``pip download vllm==VERSION --no-deps``) is unpacked into a folder of its
   own, without its compiled extensions (no kernel runs here), beside the few light packages its
   modules import that this environment lacks (installed ``--no-deps --target``, at the versions
   the wheel asks for). Nothing is installed into this environment. Cached per version under
   ``$MPDP_VLLM_CHECK_DIR`` (default ``~/.cache/mpdp/vllm-check``); a later run from another
   environment (a venv) adds to the folder what that one lacks.
2. a child interpreter with those folders first on its path and vLLM's CPU platform (a platform
   plugin names it) builds mpdp's ``VLLMEngine`` for real on the embedded model --
   EngineArgs, ``create_engine_config``, the renderer, the input processor -- with only
   ``LLMEngine.from_engine_args`` replaced by an engine without an engine core (``_Coreless``:
   ``add_request`` runs vLLM's own input processor, which is where bad requests are refused).
   Then: every sampling field mpdp maps, valid and invalid (each invalid one must reach the
   caller as ValueError/TypeError, and the worker loop must fail that request alone),
   RequestOutputKind, structured outputs (and an invalid schema), chat rendering, token ids out
   of the vocabulary, the exception hierarchy, the engine methods and output fields mpdp reads,
   and RequestOutputs built with the release's classes through mpdp's ``step`` (logprobs, streams).

Exit status: 0 all checks passed; 1 a check failed (each one named); 77 skipped (the wheel cannot
be had here, or this Python is too old for the release), the reason on the last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP = 77
VERSION_ENV = "MPDP_VLLM_CHECK_VERSION"
DIR_ENV = "MPDP_VLLM_CHECK_DIR"
# Imported by the modules the check uses, not installed with mpdp's extras: (module, the names its
# distribution has had). Each is installed only where the module is missing here, at the version the
# wheel's metadata asks for (interegular, which lm-format-enforcer needs, at its newest).
LIGHT_DEPS = [("msgspec", ["msgspec"]), ("blake3", ["blake3"]), ("cbor2", ["cbor2"]),
              ("openai_harmony", ["oss-harmony", "openai-harmony"]), ("PIL", ["pillow"]),
              ("pybase64", ["pybase64"]), ("partial_json_parser", ["partial-json-parser"]),
              ("llguidance", ["llguidance"]), ("einops", ["einops"]), ("cachetools", ["cachetools"]),
              ("cpuinfo", ["py-cpuinfo"]), ("xgrammar", ["xgrammar"]),
              ("lmformatenforcer", ["lm-format-enforcer"]), ("interegular", ["interegular"])]


class Skip(Exception):
    pass


# -- in this environment: the release's Python layer, in a folder of its own ---------------------------
def prepare(version: str, root: Path) -> list[Path]:
    """The folders to put first on the child's path (the release's files, its light dependencies)."""
    home = root / version
    site, deps, done = home / "site", home / "deps", home / "ready"
    if done.is_file():
        # Prepared before, maybe by another environment (a venv lacking a light package the
        # first one had): what this one lacks joins the folder now.
        _install_light_deps(_installed_metadata(site), deps)
        _write_platform_plugin(deps)
        return [site, deps]
    wheels = home / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"vllm=={version}", "--no-deps",
                            "--only-binary", ":all:", "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
        if r.returncode != 0 or not found:
            lines = [x for x in (r.stderr or r.stdout).splitlines() if x.strip() and "WARNING" not in x]
            raise Skip(f"pip could not get the vllm {version} wheel here: {' / '.join(lines[-2:]) or 'no wheel'}")
    with zipfile.ZipFile(found[0]) as wheel:
        metadata = _metadata(wheel)
        _python_fits(metadata, version)
        site.mkdir(parents=True, exist_ok=True)
        # The Python layer only: compiled extensions (most of the wheel's size) need CUDA to load.
        wheel.extractall(site, [n for n in wheel.namelist() if ".so" not in Path(n).suffixes])
    _install_light_deps(metadata, deps)
    _write_platform_plugin(deps)
    done.write_text(version)
    found[0].unlink()                   # unpacked: the 330 MB wheel is not needed again
    return [site, deps]


def _write_platform_plugin(folder: Path) -> None:
    """A vLLM platform plugin (an entry point, as out-of-tree platforms register) naming vLLM's own
    CPU platform: a CUDA wheel on a machine without a GPU finds no platform by itself, and
    ``VLLM_TARGET_DEVICE=cpu`` picks the CPU one in some releases only (0.32, not 0.26 or 0.27)."""
    info = folder / "mpdp_vllm_check_platform-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpdp-vllm-check-platform\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[vllm.platform_plugins]\nmpdp_check = mpdp_vllm_check_platform:plugin\n")
    (folder / "mpdp_vllm_check_platform.py").write_text(
        "def plugin():\n    return 'vllm.platforms.cpu.CpuPlatform'\n")


def _metadata(wheel: zipfile.ZipFile) -> list[str]:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return wheel.read(name).decode().splitlines()


def _installed_metadata(site: Path) -> list[str]:
    """The unpacked release's own METADATA (its dist-info came out of the wheel with it)."""
    found = sorted(site.glob("vllm-*.dist-info/METADATA"))
    return found[0].read_text().splitlines() if found else []


def _python_fits(metadata: list[str], version: str) -> None:
    from pip._vendor.packaging.specifiers import SpecifierSet

    for line in metadata:
        if line.startswith("Requires-Python:"):
            spec = SpecifierSet(line.split(":", 1)[1].strip())
            here = ".".join(map(str, sys.version_info[:3]))
            if here not in spec:
                raise Skip(f"vllm {version} needs Python {spec}; this is Python {here}")


def _install_light_deps(metadata: list[str], target: Path) -> None:
    import importlib.util
    from importlib.machinery import PathFinder

    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

    wanted = {}
    for line in metadata:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                wanted[canonicalize_name(req.name)] = str(req.specifier)
    specs = []
    for module, names in LIGHT_DEPS:
        if importlib.util.find_spec(module) is None and PathFinder.find_spec(module, [str(target)]) is None:
            dist = next((canonicalize_name(n) for n in names if canonicalize_name(n) in wanted), names[0])
            specs.append(f"{dist}{wanted.get(dist, '')}")
    if specs:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                            *specs], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"pip could not install {' '.join(specs)}: {r.stderr.strip().splitlines()[-1:]}")
    target.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> int:
    version = (argv[0] if argv else os.environ.get(VERSION_ENV, "")).strip()
    if not version:
        print(f"skipped: no vLLM version to check (give one, or set {VERSION_ENV})")
        return SKIP
    root = Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "mpdp" / "vllm-check").expanduser()
    t0 = time.monotonic()
    try:
        paths = prepare(version, root)
    except Skip as exc:
        print(f"skipped: {exc}")
        return SKIP
    t1 = time.monotonic()
    sys.path.insert(0, str(REPO))
    from mpdp.models import resolve_model

    model = resolve_model("smollm2-135m-instruct")     # converted here once, if not cached yet
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR",
               PYTHONPATH=os.pathsep.join([*map(str, paths), str(REPO)]))
    r = subprocess.run([sys.executable, __file__, "--inside", version, model], env=env)
    print(f"vllm {version}: prepared in {t1 - t0:.1f}s, checked in {time.monotonic() - t1:.1f}s")
    return r.returncode


# -- in the child: the checks ------------------------------------------------------------------------
class _Coreless:
    """What mpdp's VLLMEngine uses of ``vllm.v1.engine.llm_engine.LLMEngine``, with the release's
    own config, renderer and input processor, and no engine core (no model is loaded)."""

    def __init__(self, vllm_config):
        from vllm.renderers import renderer_from_config
        from vllm.v1.engine.input_processor import InputProcessor

        self.vllm_config = vllm_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.engine_core = _NoCore()
        self.requests = {}
        self.outputs = []               # what the next step() returns (the check builds them)

    @classmethod
    def from_engine_args(cls, engine_args, usage_context=None):
        return cls(engine_args.create_engine_config(usage_context))

    def get_tokenizer(self):
        return self.renderer.get_tokenizer()

    def add_request(self, request_id, prompt, params):
        self.requests[request_id] = self.input_processor.process_inputs(
            request_id, prompt, params, supported_tasks=("generate",))

    def abort_request(self, request_ids):
        for rid in request_ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        outputs, self.outputs = self.outputs, []
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs


class _NoCore:
    """Stands for the engine-core client (``vllm.v1.engine.core_client.EngineCoreClient``, whose
    methods mpdp uses are checked in ``engine_methods``): there is no engine core process here."""

    def get_output(self, *args, **kwargs):
        raise AssertionError("the check has no engine core: nothing is generated")

    def shutdown(self):
        pass


def _checks(model: str):
    """(name, function) pairs; each raises AssertionError (or anything) on a mismatch."""
    import dataclasses
    import inspect

    from mpdp.engines.base import EngineRequest, WorkerPlacement
    from mpdp.engines.vllm import _FINISH, _SAMPLING_KEYS, VLLMEngine
    from mpdp.wire import protocol
    from mpdp.worker.loop import _add_all

    state = {}

    def engine():
        if "engine" not in state:
            from vllm.v1.engine import llm_engine

            llm_engine.LLMEngine.from_engine_args = _Coreless.from_engine_args
            state["engine"] = VLLMEngine(model, dict(_ENGINE_OPTIONS), WorkerPlacement(index=1))
        return state["engine"]

    def added(params=None, **fields):
        eng = engine()
        rid = state["next"] = state.get("next", 0) + 1
        eng.add(EngineRequest(id=rid, params=params or {}, **(fields or {"prompt": "Hello"})))
        return eng._engine.requests[str(rid)]

    def refused(params=None, **fields):
        """The error a bad request raises from add, and what the worker loop makes of it."""
        rid = state["next"] = state.get("next", 0) + 1
        request = EngineRequest(id=rid, params=params or {}, **(fields or {"prompt": "Hello"}))
        try:
            engine().add(request)
        except (ValueError, TypeError) as exc:
            out = []
            _add_all(engine(), [protocol.request_to_wire(request)], out)
            assert len(out) == 1 and out[0].error_type in ("ValueError", "TypeError"), out
            return exc
        raise AssertionError(f"accepted: {request}")

    def engine_args():
        from vllm.engine.arg_utils import EngineArgs

        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        missing = sorted((set(_ENGINE_OPTIONS) | _README_OPTIONS | {"model", "disable_log_stats", "seed"}) - fields)
        assert not missing, f"EngineArgs lacks {missing}"
        eng = engine()
        config = eng._engine.vllm_config
        assert eng.max_model_len == _ENGINE_OPTIONS["max_model_len"] == config.model_config.max_model_len
        assert eng.max_num_seqs == _ENGINE_OPTIONS["max_num_seqs"]
        assert config.model_config.seed == _ENGINE_OPTIONS["seed"] + 1        # offset by the worker index
        assert config.structured_outputs_config.backend == "xgrammar"        # from a plain dict
        assert int(config.compilation_config.mode) == 0                       # from an int
        cache = config.cache_config
        assert hasattr(cache, "num_gpu_blocks") and isinstance(cache.block_size, int)
        assert isinstance(config.model_config.get_diff_sampling_param(), dict)

    def engine_methods():
        from vllm.v1.engine.llm_engine import LLMEngine

        for name in ("from_engine_args", "add_request", "step", "abort_request", "has_unfinished_requests",
                     "get_tokenizer"):
            assert callable(getattr(LLMEngine, name, None)), f"LLMEngine.{name} is gone"
        params = list(inspect.signature(LLMEngine.add_request).parameters)[1:4]
        assert params == ["request_id", "prompt", "params"], params
        source = inspect.getsource(LLMEngine.__init__)
        for attr in ("self.vllm_config", "self.renderer", "self.engine_core"):
            assert attr in source, f"LLMEngine no longer sets {attr}"
        from vllm.v1.engine.core_client import EngineCoreClient

        for name in ("get_output", "shutdown"):          # step counting wraps get_output; close() shuts down
            assert callable(getattr(EngineCoreClient, name, None)), f"EngineCoreClient.{name} is gone"
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

        assert "new_token_ids" in EngineCoreOutput.__struct_fields__, EngineCoreOutput.__struct_fields__
        assert "outputs" in EngineCoreOutputs.__struct_fields__, EngineCoreOutputs.__struct_fields__
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: F401  (close())

    def sampling_fields():
        from vllm.sampling_params import RequestOutputKind

        valid = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "n": 2, "stop": ["\n"],
                 "seed": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": 2, "ignore_eos": True}
        assert set(valid) == set(_SAMPLING_KEYS), sorted(set(_SAMPLING_KEYS) ^ set(valid))
        params = added(valid).sampling_params
        for key, value in valid.items():
            assert getattr(params, key) == value, (key, getattr(params, key), value)
        assert params.output_kind == RequestOutputKind.FINAL_ONLY
        assert added(stream=True, prompt="Hi").sampling_params.output_kind == RequestOutputKind.DELTA
        assert added({"logprobs": True}).sampling_params.logprobs == 0          # OpenAI's boolean
        assert added({"logprobs": False}).sampling_params.logprobs is None

    def invalid_sampling_values():
        """vLLM's own refusal of each bad value reaches the caller as ValueError/TypeError."""
        bad = {"max_tokens": 0, "temperature": -1.0, "top_p": 1.5, "top_k": -5, "n": 0, "stop": [""],
               "presence_penalty": 5.0, "frequency_penalty": -5.0, "logprobs": -2}
        raised = {}
        for key, value in bad.items():
            exc = refused({key: value})
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raised[key] = type(cause).__name__
        print(f"    vLLM raised: {json.dumps(raised)}")
        refused({"stop": 5})                    # a wrong type

    def structured_outputs():
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        params = added({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
        assert params.sampling_params.structured_outputs.json == schema
        params = added({"response_format": {"type": "json_object"}})
        assert params.sampling_params.structured_outputs.json_object is True
        exc = refused({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}})
        print(f"    an invalid schema: {type(exc.__cause__ or exc).__name__}: {str(exc)[:100]}")

    def chat_rendering():
        eng = engine()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        ids = eng._prompt_token_ids(EngineRequest(id=0, messages=messages), None)
        text = eng._tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith(
            "<|im_start|>assistant\n"), text
        # The same text as transformers renders with the model's own template.
        expected = eng._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == expected, (text, expected)
        request = added(messages=messages)
        assert list(request.prompt_token_ids) == ids
        prompt_ids = eng._prompt_token_ids(EngineRequest(id=0, prompt="Hello there"), None)
        assert prompt_ids == list(eng._tokenizer.encode("Hello there", add_special_tokens=True))

    def bad_token_ids():
        exc = refused(prompt_token_ids=[1, 2, 10 ** 7])
        print(f"    ids out of the vocabulary: {type(exc.__cause__ or exc).__name__}: {str(exc)[:100]}")

    def exception_hierarchy():
        import vllm.exceptions as ex
        from mpdp.engines.vllm import request_error

        error = ex.VLLMValidationError("bad")
        print(f"    VLLMValidationError: {' < '.join(c.__name__ for c in type(error).__mro__[:-2])}")
        assert type(request_error(error)) is ValueError
        if hasattr(ex, "VLLMClientError"):
            assert issubclass(ex.VLLMValidationError, ex.VLLMClientError)

    def outputs_and_finish_reasons():
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput

        fields = {f.name for f in dataclasses.fields(CompletionOutput)}
        assert {"index", "text", "token_ids", "finish_reason", "logprobs"} <= fields, fields
        init = inspect.signature(RequestOutput.__init__).parameters
        assert {"request_id", "prompt_token_ids", "outputs", "finished"} <= set(init), list(init)
        assert "logprob" in {f.name for f in dataclasses.fields(Logprob)}
        from vllm.v1.engine import FINISH_REASON_STRINGS

        unknown = set(FINISH_REASON_STRINGS) - set(_FINISH) - {"error"}      # "error" fails the request
        assert not unknown, f"finish reasons mpdp does not map: {unknown}"

    def outputs_through_step():
        """RequestOutputs built with the release's own classes, through mpdp's step(): FINAL_ONLY
        with logprobs, DELTA pieces of a stream, and a choice vLLM failed."""
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput

        eng = engine()
        tok = eng._tokenizer
        ids = list(tok.encode(" Paris is", add_special_tokens=False))[:2]

        def output(rid, token_ids, finished, reason=None, logprobs=None, text=None):
            choice = CompletionOutput(index=0, text=tok.decode(token_ids) if text is None else text,
                                      token_ids=token_ids, cumulative_logprob=None, logprobs=logprobs,
                                      finish_reason=reason)
            return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[1, 2, 3], prompt_logprobs=None,
                                 outputs=[choice], finished=finished)

        added({"logprobs": 1, "max_tokens": 2})
        rid = str(state["next"])
        positions = [{ids[0]: Logprob(-0.25, rank=1), 999: Logprob(-1.5, rank=2)}, {ids[1]: Logprob(-0.75, rank=1)}]
        eng._engine.outputs = [output(rid, ids, True, "length", positions)]
        (result,) = eng.step()
        assert result.error is None and result.finished, result
        assert result.texts == [tok.decode(ids)] and result.finish_reasons == ["length"], result
        assert (result.prompt_tokens, result.completion_tokens) == (3, 2), result
        assert [r["logprob"] for r in result.logprobs[0]] == [-0.25, -0.75], result.logprobs

        added(stream=True, prompt="Hi")
        rid = str(state["next"])
        eng._engine.outputs = [output(rid, ids[:1], False)]
        (partial,) = eng.step()
        assert not partial.finished and partial.texts == [tok.decode(ids[:1])], partial
        eng._engine.outputs = [output(rid, ids[1:], True, "stop")]
        (final,) = eng.step()
        assert final.finished and final.texts == [tok.decode(ids[:1]) + tok.decode(ids[1:])], final
        assert final.finish_reasons == ["stop"] and final.completion_tokens == 2, final

        added()
        eng._engine.outputs = [output(str(state["next"]), ids, True, "error")]
        (failed,) = eng.step()
        assert failed.error_type == "EngineError" and "finish_reason 'error'" in failed.error, failed
        assert not {rid, str(state["next"])} & set(eng._live)          # each one returned, none held

    def abort():
        eng = engine()
        before = set(eng._engine.requests)
        added()
        rid = state["next"]
        eng.abort([rid])
        assert set(eng._engine.requests) == before and str(rid) not in eng._live

    return [(f.__name__, f) for f in (engine_args, engine_methods, sampling_fields, invalid_sampling_values,
                                      structured_outputs, chat_rendering, bad_token_ids, exception_hierarchy,
                                      outputs_and_finish_reasons, outputs_through_step, abort)]


# What the check builds its engine with: fields mpdp converts (a dict, an int) and the README's.
_ENGINE_OPTIONS = {"max_model_len": 1024, "max_num_seqs": 8, "seed": 5, "dtype": "float32", "enforce_eager": True,
                   "structured_outputs_config": {"backend": "xgrammar"}, "compilation_config": 0}
_README_OPTIONS = {"gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager", "load_format",
                   "quantization", "enable_prefix_caching", "max_num_seqs", "seed", "tensor_parallel_size"}


def _note_torch_mismatch() -> None:
    """The check is meant for releases built against the torch installed here; another torch can
    fail it for reasons of its own (0.17, built for torch 2.10, fails on 2.13 in vLLM's CPU
    platform), so say so up front."""
    import importlib.metadata

    import torch

    pins = [r for r in importlib.metadata.requires("vllm") or () if r.replace(" ", "").startswith("torch==")]
    pinned = pins[0].split("==", 1)[1].split(";")[0].strip() if pins else None
    if pinned and torch.__version__.split("+")[0] != pinned:
        print(f"note: this vLLM is built against torch {pinned}, this is torch {torch.__version__}: "
              f"a failure may be that mismatch's, not mpdp's", flush=True)


def _cpu_platform_without_triton() -> None:
    """vLLM >= 0.34's CPU platform refuses an x86 machine without triton-cpu (its kernels need it);
    the check runs no kernel, so the config is checked as if it were there."""
    from vllm.platforms import current_platform
    from vllm.platforms.cpu import CpuPlatform

    assert isinstance(current_platform, CpuPlatform), f"the check needs vLLM's CPU platform, not {current_platform}"
    check = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        import vllm.triton_utils as triton_utils

        had = triton_utils.HAS_TRITON
        triton_utils.HAS_TRITON = True
        try:
            check(cls, vllm_config)
        finally:
            triton_utils.HAS_TRITON = had

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def inside(version: str, model: str) -> int:
    import traceback

    import vllm

    assert vllm.__version__.startswith(version), (vllm.__version__, version)
    _note_torch_mismatch()
    _cpu_platform_without_triton()
    failed = []
    for name, check in _checks(model):
        try:
            check()
            print(f"ok   {name}", flush=True)
        except BaseException:
            failed.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"vllm {vllm.__version__}: {len(failed)} of the checks failed: {failed}" if failed
          else f"vllm {vllm.__version__}: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        sys.exit(inside(*sys.argv[2:4]))
    sys.exit(main(sys.argv[1:]))
