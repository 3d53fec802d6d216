"""The vLLM engine: one ``vllm.LLMEngine`` (v1), driven one step at a time.

This is the loop ``vllm.LLM.generate`` runs (``vllm/entrypoints/offline_utils.py``:
``_add_request`` then ``while has_unfinished_requests(): step()``), opened up so that the
worker can add requests between steps. It is built the way ``vllm.LLM`` builds its engine
(``vllm/entrypoints/llm.py``): ``LLMEngine.from_engine_args`` with ``UsageContext.LLM_CLASS``
(which picks LLM's larger batch defaults: on an H100, max_num_seqs 1024 and
max_num_batched_tokens 16384, against 128 / 2048 for the default ENGINE_CONTEXT),
``disable_log_stats=True``, and the engine core in its own process
(``VLLM_ENABLE_V1_MULTIPROCESSING``, on by default), so that scheduling and the GPU overlap
with the output processing here. Prompts are rendered with the engine's own renderer, as
``LLM.generate`` / ``LLM.chat`` do, and every request asks for ``RequestOutputKind.FINAL_ONLY``.

Nothing here imports vLLM or torch at module level: the pool's parent process imports this
class (for ``loads_weights``) and must stay free of CUDA.

Options: every key is a ``vllm.EngineArgs`` field (gpu_memory_utilization, max_model_len,
dtype, enforce_eager, load_format, quantization, enable_prefix_caching, max_num_seqs, seed,
tensor_parallel_size, ...), except mpdp's own: ``capacity``, the credit this worker
advertises (default: the scheduler's max_num_seqs plus an eighth, at least 32 more), and
``kv_events``, set by the pool for cache-aware routing: "ipc" (a local worker) or "tcp" (a
worker on another node) turns on vLLM's KV-cache event publisher, announced in READY
(``mpdp/core/kv_events.py``).
A streamed request whose worker died arrives here with a ``continuation`` (``_resumed``): its
streamed token ids join the prompt, so vLLM decodes what follows in their context; its text not
yet delivered goes out first, and the final text is whole. One choice, no grammar
(``cannot_continue``); a stop string across the seam is not seen, and presence/frequency
penalties count the streamed tokens as prompt.
``seed`` (default 0) is offset by the worker index, so that workers do not draw the same
random numbers (unseeded requests at temperature > 0 would otherwise repeat across workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import multiprocessing
from typing import Any

from mpdp.config import SAMPLING, TO_CONTEXT
from mpdp.engines.base import (ContextWindowExceeded, Engine, EngineRequest, EngineResult, WorkerPlacement,
                               json_format)
from mpdp.engines.logprobs import record as logprob_record, token_bytes

# The EngineRequest.params keys that map one to one onto vllm.SamplingParams fields: all of
# mpdp's but the two read here (response_format becomes structured outputs, chat_template_kwargs
# goes to the chat template).
_SAMPLING_KEYS = frozenset(SAMPLING) - {"response_format", "chat_template_kwargs"}
_OWN_OPTIONS = frozenset({"capacity", "kv_events"})
# vLLM's CompletionOutput.finish_reason strings (vllm/v1/engine/__init__.py, FINISH_REASON_STRINGS)
# onto mpdp's. "repetition" only happens with SamplingParams.repetition_detection, never set here.
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


class VLLMEngine(Engine):
    name = "vllm"

    loads_weights = True
    uses_gpu = True
    publishes_kv_events = True       # its KV-cache events feed cache-aware routing (core/kv_events.py)
    ready_timeout = 900.0            # weights, torch.compile and CUDA graphs
    # Heartbeats come from their own thread, but it needs the GIL, which vLLM's Python-heavy
    # in-process step and its native calls were not measured to hand over promptly: kept long.
    heartbeat_timeout = 60.0
    step_timeout = 600.0             # a step can wait on a long prefill or a compile of a new shape

    @classmethod
    def known_options(cls) -> frozenset[str] | None:
        """``vllm.EngineArgs``' fields (but ``model``) and mpdp's own, read from vLLM's source
        without importing it: the parent process checks options before any worker starts and must
        stay free of CUDA. None (left to the worker) where vLLM is not installed here."""
        fields = _engine_args_fields()
        return None if fields is None else (fields - {"model"}) | _OWN_OPTIONS
    batch_limit_default = "adaptive"  # past the largest CUDA graph, more sequences make fewer tokens/s
    # A stream whose worker died goes on here from the tokens it delivered (they join the prompt;
    # see _resumed): one choice, no grammar (vLLM's structured output cannot start mid-answer).
    continues_streams = True

    @classmethod
    def cannot_continue(cls, params: dict[str, Any]) -> str | None:
        if (params.get("n") or 1) > 1:
            return "the vllm engine continues a stream of one choice only (this one has n > 1)"
        fmt = params.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return "the vllm engine cannot resume a response_format grammar in the middle of an answer"
        return None

    def __init__(self, model: str, options: dict[str, Any], placement: WorkerPlacement):
        super().__init__(model, options, placement)
        engine_kwargs = dict(options)
        capacity = engine_kwargs.pop("capacity", None)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        kv_events = engine_kwargs.pop("kv_events", None)
        engine_kwargs = _engine_kwargs(engine_kwargs, placement)
        self.ready_extra: dict[str, Any] = {}
        self._kv_events = None
        if kv_events and engine_kwargs.get("enable_prefix_caching", True) is not False:
            self._kv_events = _EventPublisher(kv_events, placement.index)
            engine_kwargs["kv_events_config"] = self._kv_events.config()

        _allow_children()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        args = EngineArgs(model=model, **engine_kwargs)
        try:
            self._engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        except BaseException:
            if self._kv_events is not None:   # no READY will announce it: nobody else removes its folder
                self._kv_events.cleanup()
            raise
        config = self._engine.vllm_config
        self._max_model_len = int(config.model_config.max_model_len)
        self.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        cache = config.cache_config
        # The cache's size in tokens: vLLM's own group-aware figure where it has one (0.26 on; hybrid
        # models hold several KV groups per block, so blocks x block size over-counts), else blocks.
        sized = getattr(cache, "kv_cache_size_tokens", None)
        self.kv_cache_tokens = int(sized) if isinstance(sized, int) and sized > 0 else \
            (cache.num_gpu_blocks or 0) * (cache.block_size or 0)
        if self._kv_events is not None:
            self.ready_extra["kv_events"] = self._kv_events.announce(int(cache.block_size))
        # The running batch (max_num_seqs) plus room for what the dispatcher sends while results go out.
        self._capacity = capacity or self.max_num_seqs + max(32, self.max_num_seqs // 8)
        # Batch-limit hints (mpdp/core/batch_limits.py): decode batches larger than the largest
        # captured CUDA graph run without one, their steps prepared on the CPU.
        self.ready_extra["max_num_seqs"] = self.max_num_seqs
        self.ready_extra["graph_max"] = _largest_cuda_graph(config)
        self._counts: tuple[int, int] | None = None
        self._count_steps()
        self._renderer = self._engine.renderer
        self._tokenizer = self._engine.get_tokenizer()
        self._token_bytes = token_bytes(self._tokenizer)      # each token's own bytes, for logprobs
        self._top_k: dict[str, int] = {}                      # request -> alternatives asked for
        # The model's generation_config.json defaults (temperature, top_p, ...), as LLM.generate
        # and the OpenAI server apply them when a request leaves a field out.
        self._defaults = dict(config.model_config.get_diff_sampling_param())
        self._live: dict[str, int] = {}   # vLLM request id (str) -> mpdp request id, until returned
        self._streams: dict[str, "_Accumulated"] = {}   # the streamed ones among them
        self._ready: list[EngineResult] = []             # finished without vLLM (see add)
        print(f"mpdp vllm worker {placement.index}: gpus {placement.gpus or 'inherited'}, "
              f"max_model_len {self._max_model_len}, max_num_seqs {self.max_num_seqs}, "
              f"kv cache {self.kv_cache_tokens} tokens, capacity {self._capacity}", flush=True)

    # -- the Engine interface ----------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def add(self, request: EngineRequest) -> None:
        rid = str(request.id)
        if rid in self._live:
            raise ValueError(f"request {request.id} is already in flight on this worker")
        params = request.params or {}
        head = None
        with _request_errors():
            token_ids = self._prompt_token_ids(request, params.get("chat_template_kwargs"))
            prompt_tokens = len(token_ids)
            if request.continuation is not None:
                head = self._resumed(request.continuation, token_ids, params)
                if head.finish is not None:        # it had ended with the last token it streamed
                    self._ready.append(head.result(request.id, prompt_tokens))
                    return
                token_ids = token_ids + head.ids
            sampling = self._sampling_params(params, stream=request.stream,
                                             room=self._max_model_len - len(token_ids), done=head.count if head else 0)
        if len(token_ids) >= self._max_model_len:
            raise ContextWindowExceeded(
                f"the prompt has {len(token_ids)} tokens but the model's context window is "
                f"{self._max_model_len} tokens (max_model_len), and at least one must be left to generate")
        with _request_errors("vLLM rejected the request: "):    # bad ids, bad structured-output schema, ...
            from vllm.inputs import TokensPrompt

            # What LLM.generate does for a token prompt: the renderer turns it into the engine's input.
            (engine_input,) = self._renderer.render_cmpl([TokensPrompt(prompt_token_ids=token_ids)])
            self._engine.add_request(rid, engine_input, sampling)
        self._live[rid] = request.id
        if sampling.logprobs is not None:
            self._top_k[rid] = sampling.logprobs
        if request.stream:
            self._streams[rid] = _Accumulated(prompt_tokens, self._records_of(rid), head, self._token_bytes)

    def step(self) -> list[EngineResult]:
        results: list[EngineResult] = []
        if self._ready:                        # continuations that had nothing left to generate
            results, self._ready = self._ready, []
        if not self._live:
            return results
        if self._engine.has_unfinished_requests():
            for out in self._engine.step():
                acc = self._streams.get(out.request_id)
                if acc is not None:            # DELTA outputs: new text since the last step
                    acc.add(out)
                    if not out.finished:
                        results.append(acc.partial(self._live[out.request_id], out))
                        continue
                    del self._streams[out.request_id]
                if not out.finished:           # FINAL_ONLY: only finished ones come, but be sure
                    continue
                request_id = self._live.pop(out.request_id, None)
                records = self._records_of(out.request_id)
                self._top_k.pop(out.request_id, None)
                if request_id is not None:     # None: aborted meanwhile
                    results.append(acc.final(request_id, out) if acc is not None
                                   else _result(request_id, out, records))
        if self._live and not self._engine.has_unfinished_requests():
            # vLLM holds nothing more, yet some of ours never came back: fail them instead of hanging.
            for request_id in self._live.values():
                results.append(EngineResult.failure(
                    request_id, RuntimeError("vLLM finished without returning this request")))
            self._live.clear()
            self._top_k.clear()
        return results

    def step_counts(self) -> tuple[int, int] | None:
        counts, self._counts = self._counts, None
        return counts

    def _count_steps(self) -> None:
        """Count what each engine-core step ran: LLMEngine.step gets one EngineCoreOutputs per
        core step (``engine_core.get_output``), holding one output per request that made tokens,
        also those whose RequestOutput (FINAL_ONLY) is not returned until they finish."""
        core = self._engine.engine_core
        get_output = core.get_output

        def counted_get_output(*args, **kwargs):
            outputs = get_output(*args, **kwargs)
            outs = outputs.outputs
            self._counts = (len(outs), sum(len(o.new_token_ids) for o in outs))
            return outputs

        core.get_output = counted_get_output

    def abort(self, request_ids: list[int]) -> None:
        if self._ready:
            gone = set(request_ids)
            self._ready = [r for r in self._ready if r.id not in gone]
        ids = [rid for rid in map(str, request_ids) if self._live.pop(rid, None) is not None]
        for rid in ids:
            self._streams.pop(rid, None)
            self._top_k.pop(rid, None)
        if ids:
            self._engine.abort_request(ids)

    def has_unfinished(self) -> bool:
        return bool(self._live or self._ready)

    def _records_of(self, rid: str):
        """choice -> its ``engines.logprobs`` records, for a request that asked for logprobs."""
        k, of = self._top_k.get(rid, 0), self._token_bytes
        return lambda choice: _records(choice, k, of)

    def close(self) -> None:
        if getattr(self, "_kv_events", None) is not None:
            self._kv_events.cleanup()
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is None:
            return
        in_process = getattr(engine, "model_executor", None) is not None   # VLLM_ENABLE_V1_MULTIPROCESSING=0
        try:
            engine.engine_core.shutdown()      # stops the engine core process: its GPU memory goes with it
        finally:
            try:
                engine.renderer.shutdown()
            except Exception:
                pass
            self._renderer = self._tokenizer = None
            del engine
            gc.collect()
            if in_process:                     # the model lived in this process: free it here
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()

    # -- requests -> vLLM ------------------------------------------------------------------------
    def _sampling_params(self, params: dict[str, Any], stream: bool = False, room: int = 1, done: int = 0):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        fields = dict(self._defaults)
        structured = None
        for key, value in params.items():
            if key in _SAMPLING_KEYS:
                fields[key] = value
            elif key == "response_format":
                structured = _structured_outputs(value)
            elif key != "chat_template_kwargs":
                raise ValueError(f"the vllm engine does not support the sampling parameter {key!r}")
        if fields.get("max_tokens") == TO_CONTEXT:   # what vLLM's None means: until the context is full
            fields["max_tokens"] = max(1, room)
        elif done:                             # a continuation: its streamed tokens counted
            fields["max_tokens"] = max(1, self._max_tokens(params) - done)
        if done and fields.get("min_tokens"):
            fields["min_tokens"] = max(0, fields["min_tokens"] - done)
        if fields.get("logprobs") is True:     # OpenAI-style boolean: the chosen token only
            fields["logprobs"] = 0
        elif fields.get("logprobs") is False:
            fields["logprobs"] = None
        # Streamed requests come back step by step (DELTA); the rest only once, finished, which
        # keeps the non-streamed path exactly as cheap as before.
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(**fields, structured_outputs=structured, output_kind=kind)

    def _prompt_token_ids(self, request: EngineRequest, chat_template_kwargs: dict | None) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        tokenizer = self._tokenizer
        if request.prompt is not None:
            # As vLLM's renderer tokenizes a completion prompt (BOS and all), without truncation
            # so that the length check below sees the whole prompt.
            return list(tokenizer.encode(request.prompt, add_special_tokens=True))
        if request.messages is not None:
            return self._chat_token_ids(request.messages, chat_template_kwargs or {})
        raise ValueError("the request has no prompt, messages or prompt_token_ids")

    def _max_tokens(self, params: dict[str, Any]) -> int | str:
        """The request's max_tokens, else the model's generation_config, else SamplingParams' own."""
        return params.get("max_tokens", self._defaults.get("max_tokens", _VLLM_MAX_TOKENS))

    def _resumed(self, continuation: list, prompt_ids: list[int], params: dict[str, Any]) -> "_Head":
        """A stream sent again after its worker died: the tokens it streamed join the prompt, so
        vLLM decodes what follows in their context (no spurious space or merged word at the seam).
        Their text is decoded here the way the streamed text was (in the prompt's context), so
        the part not yet delivered (held back with a partial character or a possible stop
        string) goes out first and the final text is whole."""
        if len(continuation) != 1:
            raise ValueError(f"the vllm engine continues one choice, this continuation has {len(continuation)}")
        ((ids, sent),) = continuation
        ids = list(ids)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
            raise ValueError("the continuation's token ids must be non-negative ints")
        options = {"skip_special_tokens": params.get("skip_special_tokens", True)}
        if getattr(self._tokenizer, "clean_up_tokenization_spaces", False):
            # vLLM's detokenizer never cleans up (" !" stays " !"), whatever the tokenizer's config
            # says (Llama 3's sets it); a cleaned-up text would be shorter than the streamed one.
            options["clean_up_tokenization_spaces"] = False
        decode = functools.partial(self._tokenizer.decode, **options)
        context = prompt_ids[-_SEAM_CONTEXT:]
        before, whole = decode(context), decode(context + ids)
        text = whole[len(before):] if whole.startswith(before) else decode(ids)
        finish = None
        limit = self._max_tokens(params)
        if limit == TO_CONTEXT:
            limit = self._max_model_len - len(prompt_ids)
        if len(ids) >= limit or len(prompt_ids) + len(ids) >= self._max_model_len:
            finish = "length"
        elif ids and not params.get("ignore_eos") and ids[-1] == self._tokenizer.eos_token_id:
            finish = "stop"
        return _Head(ids, text, text[sent:], finish)

    def _chat_token_ids(self, messages: list[dict[str, Any]], chat_template_kwargs: dict) -> list[int]:
        """The model's chat template over ``messages``, as ``LLM.chat`` applies it."""
        from vllm.renderers import ChatParams
        from vllm.utils.mistral import is_mistral_tokenizer

        kwargs = {"add_generation_prompt": True, "continue_final_message": False}
        kwargs.update(chat_template_kwargs)    # enable_thinking and the like reach the template
        kwargs["tokenize"] = is_mistral_tokenizer(self._tokenizer)   # as LLM.chat: text, then tokens
        _, prompt = self._renderer.render_messages(messages, ChatParams(chat_template_kwargs=kwargs))
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        # Chat prompts carry their special tokens in the template: none added (renderer's chat default).
        return list(self._tokenizer.encode(prompt["prompt"], add_special_tokens=False))


@contextlib.contextmanager
def _request_errors(prefix: str = ""):
    """Re-raise bad input as ValueError/TypeError (see ``request_error``); anything else as it is."""
    try:
        yield
    except Exception as exc:
        error = request_error(exc, prefix)
        if error is None:
            raise
        raise error from exc


def request_error(exc: Exception, prefix: str = "") -> Exception | None:
    """What the caller sees for an exception vLLM raised while a request was added: ValueError for
    bad input, TypeError for a wrong type, None for anything else (raised as it is: the worker
    fails that request alone whatever the class, as an EngineError naming it).

    Bad input is ValueError (vLLM <= 0.26: its VLLMValidationError subclassed ValueError) or,
    from vLLM 0.27, any ``vllm.exceptions.VLLMClientError`` (VLLMValidationError among them),
    which is no ValueError: SamplingParams, the input processor (token ids out of the vocabulary),
    the xgrammar backend (an invalid JSON schema) and chat-template resolution raise it."""
    if isinstance(exc, TypeError):
        return TypeError(f"{prefix}{exc}")
    if isinstance(exc, ValueError) or _is_client_error(exc):
        return ValueError(f"{prefix}{exc}")
    return None


def _is_client_error(exc: Exception) -> bool:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:                        # vLLM <= 0.26: its request errors are ValueErrors
        return False
    return isinstance(exc, VLLMClientError)


def _engine_kwargs(options: dict[str, Any], placement: WorkerPlacement) -> dict[str, Any]:
    """Check the options against EngineArgs and fill in what ``vllm.LLM`` fills in."""
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)} - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        hint = " (give the model as Pool(model=...))" if "model" in unknown else ""
        raise ValueError(f"unknown vllm engine options {unknown}{hint}: each must be a vllm.EngineArgs "
                         f"field, or one of mpdp's own: {sorted(_OWN_OPTIONS)}")
    kwargs = dict(options)
    kwargs.setdefault("disable_log_stats", True)      # as vllm.LLM: no per-step stats
    kwargs["seed"] = int(kwargs.get("seed") or 0) + placement.index
    # vllm.LLM turns these from plain dicts into config objects; EngineArgs alone does not.
    from vllm.config import ProfilerConfig, StructuredOutputsConfig

    for key, cls in (("structured_outputs_config", StructuredOutputsConfig), ("profiler_config", ProfilerConfig)):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = cls(**kwargs[key])
    if isinstance(kwargs.get("compilation_config"), int) and not isinstance(kwargs["compilation_config"], bool):
        from vllm.config import CompilationConfig
        from vllm.config.compilation import CompilationMode

        kwargs["compilation_config"] = CompilationConfig(mode=CompilationMode(kwargs["compilation_config"]))
    return kwargs


class _EventPublisher:
    """Where this engine's KV-cache events go: vLLM's ZmqEventPublisher binds them, the pool's
    listener connects. Local: ipc in a private folder. Another node: tcp on every interface (vLLM
    binds only an endpoint with a wildcard), announced at the node's address; the events carry
    token ids and travel unencrypted, like vLLM's own (keep such a cluster's network private).
    The topic names the worker and a random tag of this engine, so a restarted worker's events are
    never taken for its predecessor's."""

    def __init__(self, kind: str, index: int):
        import secrets

        from mpdp.engines.kv_endpoints import local_endpoints

        if kind not in ("ipc", "tcp"):
            raise ValueError(f"kv_events must be 'ipc' or 'tcp', not {kind!r}")
        self.kind = kind
        self.topic = f"mpdp-kv/{index}/{secrets.token_hex(6)}"
        if kind == "ipc":
            self.endpoint, self.replay = local_endpoints()
            self.public, self.public_replay = self.endpoint, self.replay
        else:
            port, replay_port = _free_port(), _free_port()
            self.endpoint, self.replay = f"tcp://*:{port}", f"tcp://*:{replay_port}"
            host = _node_address()
            self.public, self.public_replay = f"tcp://{host}:{port}", f"tcp://{host}:{replay_port}"

    def config(self):
        from vllm.config.kv_events import KVEventsConfig

        return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=self.endpoint,
                              replay_endpoint=self.replay, topic=self.topic)

    def announce(self, block_size: int) -> dict[str, Any]:
        return {"topic": self.topic, "endpoint": self.public, "replay_endpoint": self.public_replay,
                "block_size": block_size}

    def cleanup(self) -> None:
        from mpdp.engines.kv_endpoints import remove_ipc_folder

        remove_ipc_folder(self.endpoint)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001  (not under Ray: the host's own address)
        import socket

        return socket.gethostbyname(socket.gethostname())


@functools.lru_cache(maxsize=1)
def _engine_args_fields() -> frozenset[str] | None:
    """The field names of ``vllm.EngineArgs`` (a dataclass) from ``vllm/engine/arg_utils.py``'s
    syntax tree: annotated names in the class body, ClassVars left out. Importing the module
    would import torch and initialise CUDA in the caller."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")     # the top-level package only: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "engine" / "arg_utils.py"
        if path.is_file():
            break
    else:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return frozenset(
                item.target.id for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                and "ClassVar" not in ast.unparse(item.annotation))
    return None


def _largest_cuda_graph(config) -> int | None:
    """The largest batch vLLM captured a CUDA graph for (None: none captured, eager)."""
    try:
        from vllm.config.compilation import CUDAGraphMode

        comp = config.compilation_config
        if config.model_config.enforce_eager or comp.cudagraph_mode == CUDAGraphMode.NONE:
            return None
        size = comp.max_cudagraph_capture_size
        return int(size) if size else None
    except Exception:  # noqa: BLE001  (another vLLM's config: no hint, the controller probes without)
        return None


def _allow_children() -> None:
    """vLLM starts its engine core (and, for tensor parallelism, its GPU workers) as
    ``multiprocessing`` children, which a daemonic process may not have. mpdp's workers are plain
    interpreters (not daemonic), but an engine built inside a daemonic ``multiprocessing.Process``
    (a test, another launcher) stops being one here, instead of failing with "daemonic processes
    are not allowed to have children"; its owner still has to clean up after it."""
    proc = multiprocessing.current_process()
    if proc.daemon:
        proc._config["daemon"] = False   # the setter refuses once started; this is what it sets


def _structured_outputs(response_format: Any):
    """OpenAI ``response_format`` -> vLLM 0.26 ``StructuredOutputsParams`` (as the OpenAI server maps it,
    ``vllm/entrypoints/openai/engine/protocol.py: structured_outputs_from_response_format``)."""
    from vllm.sampling_params import StructuredOutputsParams

    parsed = json_format(response_format)
    if parsed is None:
        return None
    kind, schema = parsed
    return StructuredOutputsParams(json_object=True) if kind == "json_object" else StructuredOutputsParams(json=schema)


def _result(request_id: int, out, records) -> EngineResult:
    """A finished vllm RequestOutput -> EngineResult (plain types only: it goes out as msgpack)."""
    choices = sorted(out.outputs, key=lambda c: c.index)
    if any(c.finish_reason == "error" for c in choices):
        return EngineResult.failure(request_id, RuntimeError("vLLM failed this request (finish_reason 'error')"))
    logprobs = None
    if any(c.logprobs is not None for c in choices):
        logprobs = [records(c) for c in choices]
    return EngineResult(
        id=request_id,
        texts=[c.text for c in choices],
        finish_reasons=[_FINISH.get(c.finish_reason, "stop") for c in choices],
        prompt_tokens=len(out.prompt_token_ids or ()),
        completion_tokens=sum(len(c.token_ids) for c in choices),
        logprobs=logprobs,
        cached_tokens=_cached_tokens(out),
    )


_VLLM_MAX_TOKENS = 16      # SamplingParams' own default, where neither the request nor the model says
_SEAM_CONTEXT = 8          # prompt tokens a continuation's streamed tokens are decoded after


@dataclasses.dataclass(slots=True)
class _Head:
    """What a continued stream had generated: its token ids, their text, the part of that text
    not yet delivered, and its finish reason where it had already ended."""

    ids: list[int]
    text: str
    owed: str
    finish: str | None

    @property
    def count(self) -> int:
        return len(self.ids)

    def result(self, request_id: int, prompt_tokens: int) -> EngineResult:
        return EngineResult(id=request_id, texts=[self.text], finish_reasons=[self.finish],
                            prompt_tokens=prompt_tokens, completion_tokens=len(self.ids))


class _Accumulated:
    """A streamed request's text so far, per choice: DELTA outputs carry only what is new. A
    continuation starts from its ``_Head``: its text and tokens, the owed part sent first.

    A partial's token ids stop where its text can: the ids of a character not yet whole (a CJK
    character or an emoji over several byte tokens; vLLM sends no text for it yet) wait for the
    partial that completes it. So a stream whose worker dies continues from a character boundary:
    a prompt ending inside a character would make vLLM's detokenizer send that character's bytes
    as text of their own (and a primed DecodeStream, the prompt's text again)."""

    def __init__(self, prompt_tokens: int, records, head: _Head | None = None, token_bytes=None):
        self.prompt_tokens, self.records = prompt_tokens, records
        self.token_bytes = token_bytes      # token id -> its bytes (None: ids go out as they come)
        self.held: dict[int, list[int]] = {}
        self.cached_tokens: int | None = None
        self.texts: dict[int, list[str]] = {}
        self.tokens: dict[int, int] = {}
        self.reasons: dict[int, str] = {}
        self.logprobs: dict[int, list] = {}
        self.owed = ""
        if head is not None:
            self.texts[0], self.tokens[0], self.owed = [head.text], head.count, head.owed

    def add(self, out) -> None:
        cached = _cached_tokens(out)
        if cached is not None:             # set once the prompt is scheduled; kept from then on
            # (a continuation's prompt holds its streamed tokens: only the prompt's own count)
            self.cached_tokens = min(cached, self.prompt_tokens)
        for c in out.outputs:
            self.texts.setdefault(c.index, []).append(c.text)
            self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
            if c.finish_reason is not None:
                self.reasons[c.index] = c.finish_reason
            if c.logprobs is not None:
                self.logprobs.setdefault(c.index, []).extend(self.records(c))

    def partial(self, request_id: int, out) -> EngineResult:
        n = max(self.texts) + 1 if self.texts else 1
        new = {c.index: c.text for c in out.outputs}
        if self.owed:
            new[0], self.owed = self.owed + new.get(0, ""), ""
        ids = {c.index: self._whole(c.index, c.token_ids) for c in out.outputs}
        return EngineResult(id=request_id, texts=[new.get(i, "") for i in range(n)],
                            finish_reasons=[""] * n, prompt_tokens=self.prompt_tokens,
                            completion_tokens=sum(self.tokens.values()), finished=False,
                            token_ids=[ids.get(i, []) for i in range(n)])

    def _whole(self, index: int, new) -> list[int]:
        """The ids held back before and ``new``, but those of a trailing character not yet whole."""
        ids = self.held.pop(index, []) + list(new)
        if self.token_bytes is None or not ids:
            return ids
        cut = len(ids) - _partial_tokens(ids, self.token_bytes)
        if cut < len(ids):
            self.held[index] = ids[cut:]
        return ids[:cut]

    def final(self, request_id: int, out) -> EngineResult:
        if "error" in self.reasons.values():
            return EngineResult.failure(request_id, RuntimeError("vLLM failed this request (finish_reason 'error')"))
        order = sorted(self.texts)
        return EngineResult(
            id=request_id, texts=["".join(self.texts[i]) for i in order],
            finish_reasons=[_FINISH.get(self.reasons.get(i), "stop") for i in order],
            prompt_tokens=self.prompt_tokens, completion_tokens=sum(self.tokens.values()),
            logprobs=[self.logprobs.get(i, []) for i in order] if self.logprobs else None,
            cached_tokens=self.cached_tokens)


def _partial_tokens(ids: list[int], token_bytes) -> int:
    """How many of the last ``ids`` to hold so that the rest ends where a UTF-8 character does
    (0: all of them do). A token may end one character and start the next, so the cut goes back
    token by token until the bytes before it end whole."""
    for held in range(min(len(ids), 8) + 1):   # a character is at most 4 bytes: a few tokens at most
        cut = len(ids) - held
        if _ends_whole(b"".join(token_bytes(t) for t in ids[max(0, cut - 4):cut])):
            return held
    return 0                                   # not UTF-8 as far as can be seen: nothing held


def _ends_whole(tail: bytes) -> bool:
    """Whether ``tail`` ends at a UTF-8 character boundary (an invalid tail counts as whole)."""
    for back in range(1, min(4, len(tail)) + 1):
        byte = tail[-back]
        if byte & 0xC0 == 0x80:                # a continuation byte: the lead is further back
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back >= need
    return True


def _cached_tokens(out) -> int | None:
    """The prompt tokens vLLM took from its prefix cache for this request (RequestOutput.num_cached_tokens)."""
    cached = getattr(out, "num_cached_tokens", None)
    return int(cached) if cached is not None else None


def _records(choice, k: int, of) -> list[dict]:
    """One choice's logprobs as ``engines.logprobs`` records. vLLM gives per position a
    {token id: Logprob} that holds the top ``k`` (ranks 1..k) and always the sampled token."""
    if choice.logprobs is None:
        return []
    out = []
    for token_id, position in zip(choice.token_ids, choice.logprobs):
        position = position or {}
        chosen = position.get(token_id)
        top = sorted(((t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda item: item[1].rank)
        out.append(logprob_record(token_id, of(token_id), float(chosen.logprob) if chosen is not None else None,
                                  [(t, of(t), float(lp.logprob)) for t, lp in top]))
    return out
