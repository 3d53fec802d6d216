"""DSPy on an mpdp pool: ``dspy.LM`` calls become pool requests.

DSPy 3.4 splits an LM into an outer layer (cache, retries, ``n`` fan-out, history, callbacks,
usage tracking) and an *engine* that does one attempt: ``complete(Request) -> Response``. mpdp
plugs in as that engine, so everything DSPy does around a call keeps working unchanged::

    dspy.Predict ─ adapter ─ dspy.LM ──(cache miss)──► MpdpEngine.complete(Request)
                               │                          │ Request → messages + sampling
                               │ cache hit: no request    ▼
                               │                     PoolHandle.pool  (started on first use,
                               │                          │            shared by copies)
                               ◄──── Response ◄── Completion ◄── pool.submit(...).result()

What is here:

- :class:`LM` — the recommended class: a ``dspy.LM`` whose engine is a pool. The pool starts on
  the first call (constructing, copying, deep-copying, saving and loading never start workers)
  and is shared by ``lm.copy()``, ``copy.deepcopy`` of programs, pickles in the same process and
  every thread.
- :class:`MpdpEngine` / :class:`AsyncMpdpEngine` — the engine pair, for ``dspy.LM(model,
  engine=..., async_engine=...)`` directly.
- :class:`PoolLM` — a ``dspy.BaseLM`` with ``forward()`` returning an OpenAI-shaped completion,
  for DSPy 3.3 (deprecated by DSPy 3.4, which still runs it; no DSPy cache there).

Errors are DSPy's: mpdp's ``ContextWindowExceededError`` becomes
``dspy.utils.exceptions.ContextWindowExceededError``; a closed or broken pool becomes
``LMConfigurationError`` (never retried); a request timeout becomes ``LMTimeoutError`` (DSPy
retries it ``num_retries`` times); a request that crashed workers the pool's own number of times
becomes ``LMProviderError`` (not retried again). The mpdp error is kept as ``__cause__``.

Reasoning models (Qwen3 and the like) write ``<think>…</think>`` before the answer: it is always
cut from the answer, and with ``keep_reasoning=True`` kept as the response's thinking part, which
DSPy hands on as ``reasoning_content`` (and to ``dspy.Reasoning`` output fields).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import uuid
import weakref
from typing import Any

import dspy

from mpdp import errors
from mpdp.config import DEFAULT_MODEL, POOL_FIELDS, SAMPLING, TO_CONTEXT, PoolConfig, config_with, split_settings
from mpdp.defaults import sampling_defaults
from mpdp.openai_api.response import finish_reason

try:                                   # DSPy >= 3.4: the engine route
    from dspy import lm15
    from dspy.lm15 import Message, Request, Response, TextPart, ThinkingPart, Usage
except ImportError:                    # DSPy 3.3: only PoolLM works
    lm15 = None

logger = logging.getLogger("mpdp")

__all__ = ["LM", "MpdpEngine", "AsyncMpdpEngine", "PoolLM", "PoolHandle", "split_reasoning", "dspy_defaults"]

PROVIDER = "mpdp"
# "Not given": the LM picks its defaults for the engine it runs on (dspy_defaults); None stays
# meaningful ("leave it to the engine"), as in dspy.LM.
AUTO: Any = type("Auto", (), {"__repr__": lambda self: "AUTO"})()

# The sampling keywords (mpdp.config.SAMPLING) that cannot pass through DSPy 3.4's Request: given
# to LM() they become defaults of the pool's engine instead.
_POOL_ONLY = frozenset({"ignore_eos", "chat_template_kwargs"})
# Keywords DSPy carries in a canonical Request (so they are part of its cache key and can be given
# per call): the other sampling keywords (temperature and max_tokens are LM()'s own arguments),
# and DSPy's own names.
DSPY_CARRIED = (frozenset(SAMPLING) - _POOL_ONLY - {"temperature", "max_tokens"}) | {
    "top_logprobs", "rollout_id", "reasoning_effort", "max_completion_tokens"}
# dspy.LM's own constructor keywords that may reach LM(**kwargs) (e.g. from a saved state).
DSPY_LM_KEYWORDS = frozenset({
    "provider", "finetuning_model", "launch_kwargs", "train_kwargs", "use_developer_role",
    "prompt_cache",
})
# What the engines tell DSPy they take (DSPy's JSONAdapter sends response_format only where listed).
_SUPPORTED_PARAMS = (frozenset(SAMPLING) - _POOL_ONLY) | {"top_logprobs"}
# The Request.config fields copied as they are (stop and response_format are converted; n is DSPy's
# fan-out of single requests).
_REQUEST_SCALARS = tuple(k for k in SAMPLING if k not in _POOL_ONLY | {"n", "stop", "response_format"})
# DSPy call keywords that are not sampling (PoolLM sees them in its kwargs).
_NOT_SAMPLING = frozenset({"num_retries", "rollout_id", "cache", "api_key", "api_base", "base_url"})


# ─── The pool, started lazily and shared ─────────────────────────────────────


class PoolHandle:
    """One pool, started on first use, shared by every engine, copy and pickle that holds it.

    ``copy.deepcopy`` returns the handle itself (programs are deep-copied all the time by DSPy's
    optimizers; a copy must not mean a second pool), and a pickle carries only the config and a key:
    unpickled or loaded in the same process it finds the live handle again, in another process it
    starts its own pool on first use. ``config`` is the pool's ``PoolConfig``, the one record of
    its settings (JSON data: it goes into saved programs).
    """

    _live: "weakref.WeakValueDictionary[str, PoolHandle]" = weakref.WeakValueDictionary()
    _live_lock = threading.Lock()

    def __init__(self, config: PoolConfig, pool: Any = None, key: str | None = None):
        self.config = config
        self.key = key or uuid.uuid4().hex
        self.owned = pool is None           # a pool passed in is borrowed: never closed here
        self._pool = pool
        self._lock = threading.Lock()
        self._closed = False
        self._default_engine: str | None = None
        with PoolHandle._live_lock:
            PoolHandle._live[self.key] = self

    @classmethod
    def restore(cls, key: str, config: PoolConfig) -> "PoolHandle":
        """The live handle with this key in this process, or a new (not started) one."""
        with cls._live_lock:
            handle = cls._live.get(key)
        return handle if handle is not None and not handle._closed else cls(config, key=key)

    @property
    def started(self) -> bool:
        return self._pool is not None

    @property
    def engine_name(self) -> str:
        """The engine the pool runs (or will run: the pool's own default when none was named)."""
        if self._pool is not None:
            return self._pool.engine
        if self.config.engine is not None:
            return self.config.engine
        if self._default_engine is None:       # not written into the config: a saved program decides anew
            from mpdp.pool import default_engine

            self._default_engine = default_engine()
        return self._default_engine

    @property
    def pool(self):
        """The pool, started now if it was not (one start, whatever the number of threads)."""
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise errors.PoolClosed(f"the mpdp pool for {self.config.model!r} was closed")
            if self._pool is None:
                logger.info("starting the mpdp pool for %s (engine %s)", self.config.model,
                            self.config.engine or "auto")
                self._pool = self.start()
            return self._pool

    def start(self):
        """A new pool from the config (the one place a DSPy LM starts one)."""
        from mpdp.pool import Pool

        return Pool(config=self.config)

    def close(self) -> None:
        """Close an owned pool; later calls fail with PoolClosed. A borrowed pool is left to its owner."""
        if not self.owned:
            return
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.close()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_restore_handle, (self.key, self.config.to_dict()))

    def __repr__(self) -> str:
        state = "started" if self.started else "not started"
        return f"PoolHandle({self.config.model!r}, engine={self.config.engine!r}, {state})"


def _restore_handle(key: str, config: dict) -> PoolHandle:
    return PoolHandle.restore(key, PoolConfig.from_dict(config))


def config_of_pool(pool: Any, model: str | None = None) -> PoolConfig:
    """The PoolConfig of a pool someone else started (for saving an LM that borrows it). Its model
    stays the pool's: a loader elsewhere starts that one (the LM's own name, which its responses
    carry, is the engine's ``name``); ``model`` names only a pool that has no config."""
    config = getattr(pool, "config", None)
    if isinstance(config, PoolConfig):
        return PoolConfig.from_dict(config.to_dict())     # a copy: the LM's record is its own
    return PoolConfig(model=getattr(pool, "model", None) or model or DEFAULT_MODEL,
                      engine=getattr(pool, "engine", None), num_workers=getattr(pool, "num_workers", None),
                      sampling=dict(getattr(pool, "defaults", None) or {}))


def lm_config(model: str | None, engine: str | None, config: PoolConfig | dict | None,
              kwargs: dict[str, Any], door_keywords: frozenset[str] = frozenset()) -> tuple[PoolConfig, dict]:
    """(the pool's config, the door's own keywords) from a DSPy LM's keywords: a keyword naming a
    PoolConfig field is a pool setting, one in ``door_keywords`` stays the LM's, any other is a
    sampling default of the pool (TypeError when it is none of these)."""
    if isinstance(config, dict):
        config = PoolConfig.from_dict(config)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in door_keywords}
    settings, sampling = split_settings(kwargs)
    if model is not None:
        settings["model"] = model
    if engine is not None:
        settings["engine"] = engine
    return config_with(config, settings, sampling), own


def dspy_defaults(engine: str) -> dict[str, Any]:
    """The sampling defaults of a DSPy LM on this engine: the ``dspy_hf`` and ``dspy`` rows of
    ``mpdp.defaults`` (the README's table, which says why); None: the engine's own."""
    row = sampling_defaults("dspy_hf" if engine == "hf" else "dspy")
    return {"temperature": row.get("temperature"), "max_tokens": row.get("max_tokens")}


def resolve_defaults(engine: str, temperature: Any, max_tokens: Any) -> tuple[Any, Any]:
    """``temperature`` / ``max_tokens`` with AUTO replaced by the engine's DSPy default."""
    defaults = dspy_defaults(engine)
    return (defaults["temperature"] if temperature is AUTO else temperature,
            defaults["max_tokens"] if max_tokens is AUTO else max_tokens)


# ─── Request → pool call, Completion → Response ──────────────────────────────


def split_reasoning(text: str, tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str | None, str]:
    """(reasoning, answer) from ``<think>reasoning</think>answer``; (None, text) when there is none.

    Handles the template that opens ``<think>`` in the prompt (only ``</think>`` is generated) and
    the generation cut by max_tokens inside the reasoning (all of it is reasoning, no answer).
    """
    start, end = tags
    head = text.lstrip()
    opened = head.startswith(start)
    if opened:
        head = head[len(start):]
    cut = head.find(end)
    if cut < 0:
        return (head.strip(), "") if opened else (None, text)
    return head[:cut].strip(), head[cut + len(end):].lstrip()


def _unsupported(what: str, feature: str | None = None) -> lm15.UnsupportedFeatureError:
    return lm15.UnsupportedFeatureError(f"mpdp: {what}", provider=PROVIDER, feature=feature)


def _text(parts, where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ThinkingPart):
            continue                      # earlier turns' reasoning is not sent back
        else:
            raise _unsupported(f"{where}.parts[{i}] is a {part.type} part; the pool takes text only",
                               f"{where}.parts[{i}]")
    return "\n".join(texts)


def request_messages(request: Request) -> list[dict[str, str]]:
    """The Request's conversation as chat messages (system / user / assistant)."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text(request.system, "system")
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        content = _text(message.parts, f"messages[{i}]")
        if message.role in ("user", "assistant"):
            messages.append({"role": message.role, "content": content})
        elif message.role == "developer":
            if not messages:
                messages.append({"role": "system", "content": content})
            else:   # chat templates take a system message first only
                messages.append({"role": "user", "content": f"[developer] {content}"})
        else:
            raise _unsupported(f"messages[{i}] has role {message.role!r}; tool calls are not supported",
                               f"messages[{i}]")
    return messages


def request_sampling(request: Request, defaults: dict[str, Any]) -> dict[str, Any]:
    """The pool's sampling keywords for this Request (the pool's defaults fill what it leaves out)."""
    config = request.config
    if request.tools or config.tool_choice is not None:
        raise _unsupported("tools are not supported", "tools")
    for name in ("service_tier", "store", "probabilities"):
        if getattr(config, name) is not None:
            raise _unsupported(f"config.{name} has no meaning for a local pool", f"config.{name}")
    if config.extensions:
        key = sorted(config.extensions)[0]
        raise _unsupported(f"the extension {key!r} is not supported", f"config.extensions.{key}")
    sampling: dict[str, Any] = {}
    for name in _REQUEST_SCALARS:
        value = getattr(config, name, None)
        if value is not None:
            sampling[name] = value
    if config.stop:
        sampling["stop"] = list(config.stop)
    if config.response_format is not None:
        fmt = config.response_format
        if fmt["type"] == "json_schema":   # lm15's shape → the OpenAI shape the pool takes
            fmt = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "response"), "schema": fmt["schema"],
                **({"strict": fmt["strict"]} if "strict" in fmt else {})}}
        sampling["response_format"] = fmt
    if config.reasoning is not None:
        # The chat templates of reasoning models (Qwen3) take this switch; the rest ignore it.
        kwargs = dict(defaults.get("chat_template_kwargs") or {})
        kwargs["enable_thinking"] = not config.reasoning.is_off
        sampling["chat_template_kwargs"] = kwargs
    return sampling


def _token_logprobs(records: Any) -> tuple[lm15.TokenLogprob, ...] | None:
    """The pool's logprobs of one choice (``engines.logprobs`` records, the same for every engine)
    as lm15 tokens."""
    if not records or any(r["logprob"] is None for r in records):
        return None               # a missing score: report none rather than guess
    return tuple(lm15.TokenLogprob(token=r["token"], logprob=float(r["logprob"]), bytes=tuple(r["bytes"]),
                                   token_id=r["token_id"],
                                   top=tuple(lm15.TopLogprob(token=t["token"], logprob=float(t["logprob"]),
                                                             bytes=tuple(t["bytes"]), token_id=t["token_id"])
                                             for t in r["top_logprobs"]))
                 for r in records)


def _lm15_finish_reason(reason: str) -> str:
    # OpenAI's reasons (mapped once, for every door); vLLM's "abort" is lm15's "error".
    reason = finish_reason(reason)
    return reason if reason in ("stop", "length") else "error"


def completion_response(completion: Any, model: str, *, keep_reasoning: bool,
                        tags: tuple[str, str] = ("<think>", "</think>")) -> Response:
    """An lm15 Response from the pool's Completion (its first choice: DSPy asks one at a time)."""
    reasoning, answer = split_reasoning(completion.text, tags)
    parts: list[Any] = [TextPart(answer)]
    if keep_reasoning and reasoning:
        parts.insert(0, ThinkingPart(reasoning))
    logprobs = None
    if completion.logprobs:
        logprobs = _token_logprobs(completion.logprobs[0])
    return Response(
        id=None, model=model, message=Message.assistant(parts),
        finish_reason=_lm15_finish_reason(completion.finish_reason),
        usage=Usage(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens),
        logprobs=logprobs, provider_data={"mpdp": {"worker": completion.worker}},
    )


# errors.classify's kinds as the lm15 errors DSPy projects to its public ones.
_LM15_ERRORS = {} if lm15 is None else {
    errors.INVALID: lm15.InvalidRequestError, errors.NOT_FOUND: lm15.InvalidRequestError,
    errors.CONTEXT: lm15.ContextLengthError, errors.UNAVAILABLE: lm15.ConfigurationError,
    errors.TIMEOUT: lm15.TimeoutError, errors.ENGINE: lm15.ProviderError}


def lm15_error(exc: BaseException, what: str) -> BaseException:
    """The lm15 error DSPy projects to the right public error, with mpdp's as ``__cause__``;
    an error that is not a request's (a bug) stays itself, its own cause untouched (raise the
    result without ``from``: ``raise exc from exc`` would make it its own cause)."""
    cls = _LM15_ERRORS.get(errors.classify(exc).kind)
    if cls is None:
        return exc
    error = cls(f"{what}: {type(exc).__name__}: {exc}", provider=PROVIDER)
    error.__cause__ = exc
    return error


# ─── The engines ─────────────────────────────────────────────────────────────


class _EngineBase:
    """What the sync and async engines share: the handle, the conversions, and saving."""

    supports_function_calling = False
    # Both real engines enforce json_object and json_schema while decoding (vLLM's structured
    # outputs, xgrammar on hf), so DSPy's JSONAdapter sends the signature's schema.
    supports_response_schema = True

    def __init__(self, pool: Any = None, *, config: PoolConfig | None = None, handle: PoolHandle | None = None,
                 keep_reasoning: bool = False, request_timeout: float | None = None,
                 reasoning_tags: tuple[str, str] = ("<think>", "</think>"), name: str | None = None):
        if handle is None:
            if config is None:
                config = config_of_pool(pool) if pool is not None else PoolConfig()
            handle = PoolHandle(config, pool=pool)
        self.handle = handle
        self.keep_reasoning = bool(keep_reasoning)
        self.request_timeout = request_timeout
        self.reasoning_tags = tuple(reasoning_tags)
        self.name = name       # the LM's model name, where it is not the pool's (an LM on a borrowed pool)

    @property
    def supports_reasoning(self) -> bool:
        # Only when the reasoning is handed back: otherwise DSPy would drop its own reasoning field.
        return self.keep_reasoning

    @property
    def supported_params(self) -> frozenset[str]:
        # DSPy's JSONAdapter sends response_format only where this lists it.
        return _SUPPORTED_PARAMS

    @property
    def model(self) -> str:
        return self.name or self.handle.config.model

    def _pool(self):
        """The pool, started if need be; failures as the lm15 errors DSPy reports without retrying."""
        try:
            return self.handle.pool
        except ImportError:
            raise                            # a missing engine package stays an ImportError
        except errors.MpdpError as exc:      # closed, or no worker could start
            raise lm15_error(exc, "the mpdp pool is unavailable")
        except Exception as exc:             # a bad configuration (the pool's ValueError/TypeError)
            raise lm15.ConfigurationError(f"the mpdp pool could not start: {type(exc).__name__}: {exc}",
                                          provider=PROVIDER) from exc

    def _submit(self, request: Request):
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        messages = request_messages(request)
        sampling = request_sampling(request, self.handle.config.sampling.to_dict())
        pool = self._pool()
        try:
            return pool.submit(messages=messages, timeout=self.request_timeout, **sampling)
        except Exception as exc:
            raise lm15_error(exc, "the mpdp pool refused the request")

    def _response(self, completion) -> Response:
        return completion_response(completion, self.model, keep_reasoning=self.keep_reasoning,
                                   tags=self.reasoning_tags)

    # Saving: DSPy records the class path and this state; load_state finds the live handle again.
    def dump_state(self) -> dict[str, Any]:
        return {"key": self.handle.key, "config": self.handle.config.to_dict(),
                "keep_reasoning": self.keep_reasoning, "request_timeout": self.request_timeout,
                "reasoning_tags": list(self.reasoning_tags), "name": self.name}

    @classmethod
    def load_state(cls, state: dict[str, Any]):
        saved = state.get("config") or state["spec"]       # "spec": saved by an earlier mpdp
        handle = PoolHandle.restore(state["key"], PoolConfig.from_dict(saved))
        return cls(handle=handle, keep_reasoning=state.get("keep_reasoning", False),
                   request_timeout=state.get("request_timeout"),
                   reasoning_tags=tuple(state.get("reasoning_tags") or ("<think>", "</think>")),
                   name=state.get("name"))

    def __deepcopy__(self, memo):
        return self                        # stateless around the shared handle

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.handle!r})"


class MpdpEngine(_EngineBase):
    """The synchronous engine: ``dspy.LM(model, engine=MpdpEngine(pool), async_engine=...)``.

    Give it a running ``pool`` to borrow, or a ``config`` (``PoolConfig``) to start one on first use.
    """

    def complete(self, request: Request) -> Response:
        future = self._submit(request)
        try:
            completion = future.result()
        except Exception as exc:
            raise lm15_error(exc, "the mpdp request failed")
        return self._response(completion)

    def stream(self, request: Request):
        # The pool answers whole completions: the stream is that answer as one start/delta/end.
        return lm15.response_to_events(self.complete(request))

    def close(self) -> None:
        self.handle.close()

    def async_engine(self) -> "AsyncMpdpEngine":
        """The async counterpart on the same pool."""
        return AsyncMpdpEngine(handle=self.handle, keep_reasoning=self.keep_reasoning,
                               request_timeout=self.request_timeout, reasoning_tags=self.reasoning_tags,
                               name=self.name)


class AsyncMpdpEngine(_EngineBase):
    """The asynchronous engine (``async_engine=``): awaits the pool's future without a thread."""

    async def complete(self, request: Request) -> Response:
        if not self.handle.started:        # starting workers blocks: keep it off the event loop
            await asyncio.to_thread(self._pool)
        future = self._submit(request)
        try:
            completion = await asyncio.wrap_future(future)   # cancelling the task aborts the request
        except Exception as exc:
            raise lm15_error(exc, "the mpdp request failed")
        return self._response(completion)

    async def stream(self, request: Request):
        for event in lm15.response_to_events(await self.complete(request)):
            yield event

    def close(self) -> None:
        self.handle.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.handle.close)


# ─── The LM ──────────────────────────────────────────────────────────────────


class LM(dspy.LM):
    """A ``dspy.LM`` served by an mpdp pool (recommended).

    ``engine`` names the pool's engine ("vllm", "hf", "echo"; None: "vllm" with vLLM and a GPU,
    else "hf"). Every ``PoolConfig`` field is a keyword here too (``num_gpus``, ``routing``,
    ``max_pending``, ``launcher``, ...), or give ``config=PoolConfig(...)``; ``pool=`` serves
    through an existing pool instead of starting one.
    ``temperature`` and ``max_tokens`` not given: greedy and 256 tokens on the hf engine, the
    model's own temperature and 2048 tokens elsewhere (:func:`dspy_defaults` says why). Sampling
    keywords DSPy carries (temperature, max_tokens, top_p, top_k, stop, seed, penalties,
    logprobs, response_format) are DSPy defaults, part of its cache key and overridable per call;
    others (ignore_eos, chat_template_kwargs) become the pool's defaults, and so does
    ``max_tokens="context"`` (DSPy's requests carry an int; a call's own max_tokens still wins).

    Nothing starts until the first call. Save a program holding this LM as usual; load it with
    ``allow_unsafe_lm_state=True`` (DSPy's gate for any LM class outside DSPy): the loaded LM
    starts its pool on first use, and LMs saved together share one pool again.
    """

    def __init__(self, model: str | None = None, engine: Any = None, *, config: PoolConfig | None = None,
                 pool: Any = None, keep_reasoning: bool = False, request_timeout: float | None = None,
                 async_engine: Any = None, temperature: float | None = AUTO, max_tokens: int | None = AUTO,
                 cache: bool = True, num_retries: int = 3, callbacks=None, model_type: str = "chat", **kwargs):
        if lm15 is None:
            raise ImportError(f"mpdp.dspy.LM needs DSPy >= 3.4 (dspy.LM(engine=...)); this is DSPy "
                              f"{dspy.__version__}: use mpdp.dspy.PoolLM, or upgrade DSPy")
        if isinstance(engine, _EngineBase):       # a loaded state: the engines are already built
            sync_engine = engine
            async_engine = async_engine or engine.async_engine()
            model = model or engine.model
        else:
            if engine is not None and not isinstance(engine, str):
                raise TypeError(f"engine names the pool's engine ('vllm', 'hf', 'echo'), not "
                                f"{type(engine).__name__}; for an engine object use "
                                "dspy.LM(model, engine=..., async_engine=...)")
            if max_tokens == TO_CONTEXT:
                # DSPy's Request carries max_tokens as an int: "up to the context" is the pool's default.
                if pool is not None:
                    raise TypeError("max_tokens='context' cannot travel in DSPy's requests: with pool=, make it "
                                    "the pool's default (Pool(max_tokens='context')) and give this LM "
                                    "max_tokens=None")
                kwargs["max_tokens"], max_tokens = TO_CONTEXT, None
            if pool is not None:
                given = [k for k, v in kwargs.items() if v is not None and k not in DSPY_CARRIED | DSPY_LM_KEYWORDS]
                given = (["engine"] if engine is not None else []) + (["config"] if config else []) + given
                if given:
                    raise TypeError(f"with pool=, {', '.join(given)} belong to the pool itself")
                pool_config = config_of_pool(pool, model)
                kwargs = {k: v for k, v in kwargs.items() if k in DSPY_CARRIED | DSPY_LM_KEYWORDS}
                name = model
            else:
                # Pool settings (PoolConfig fields) and the pool's sampling defaults, checked now:
                # an unknown keyword fails here, not at the first call.
                pool_config, kwargs = lm_config(model, engine, config, kwargs, DSPY_CARRIED | DSPY_LM_KEYWORDS)
                name = None        # the LM's model is the pool's
            model = model or pool_config.model
            sync_engine = MpdpEngine(pool, config=pool_config, keep_reasoning=keep_reasoning,
                                     request_timeout=request_timeout, name=name)
            async_engine = sync_engine.async_engine()
        temperature, max_tokens = resolve_defaults(sync_engine.handle.engine_name, temperature, max_tokens)
        super().__init__(model=model, model_type=model_type, temperature=temperature, max_tokens=max_tokens,
                         cache=cache, callbacks=callbacks, num_retries=num_retries, engine=sync_engine,
                         async_engine=async_engine, **kwargs)

    @property
    def handle(self) -> PoolHandle:
        return self.engine.handle        # dspy.LM.engine: the engine object given (DSPy 3.4)

    @property
    def pool(self):
        """The pool (started now if it was not)."""
        return self.handle.pool

    @property
    def pool_started(self) -> bool:
        return self.handle.started

    def stats(self) -> dict[str, Any] | None:
        """The pool's stats, or None while it has not started."""
        return self.handle.pool.stats() if self.handle.started else None

    def close(self) -> None:
        """Close the pool this LM started (copies share it); a pool passed as ``pool=`` is left open."""
        super().close()
        self.handle.close()


# ─── DSPy 3.3: the legacy BaseLM ─────────────────────────────────────────────


class _Attrs(dict):
    """An OpenAI-SDK-like object: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PoolLM(dspy.BaseLM):
    """For DSPy 3.3: ``forward()`` returns an OpenAI chat completion (choices, usage, model).

    Prefer :class:`LM` on DSPy 3.4+: it keeps DSPy's cache and retries, which a legacy BaseLM
    gets neither of (DSPy 3.4 runs it through its deprecated LegacyEngine). Here ``n`` is the
    pool's own (one request, n choices), and reasoning is split off as in :class:`LM`.
    """

    _ids = itertools.count()

    def __init__(self, model: str | None = None, engine: str | None = None, *, config: PoolConfig | dict | None = None,
                 pool: Any = None, keep_reasoning: bool = False, request_timeout: float | None = None,
                 temperature: float | None = AUTO, max_tokens: int | None = AUTO, cache: bool = False, **kwargs):
        # A keyword naming a PoolConfig field is a pool setting; the rest are DSPy's call keywords.
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in POOL_FIELDS}
        if pool is not None:
            given = (["engine"] if engine is not None else []) + (["config"] if config else []) + list(settings)
            if given:
                raise TypeError(f"with pool=, {', '.join(given)} belong to the pool itself")
            pool_config = config_of_pool(pool, model)
        else:
            pool_config, _ = lm_config(model, engine, config, settings)
        self.handle = PoolHandle(pool_config, pool=pool)
        self.keep_reasoning = keep_reasoning
        self.request_timeout = request_timeout
        temperature, max_tokens = resolve_defaults(self.handle.engine_name, temperature, max_tokens)
        super().__init__(model=model or pool_config.model, temperature=temperature, max_tokens=max_tokens,
                         cache=cache, **kwargs)

    def _call_args(self, prompt, messages, kwargs):
        if messages is None:
            if prompt is None:
                raise ValueError("give prompt or messages")
            messages = [{"role": "user", "content": prompt}]
        params = {k: v for k, v in {**self.kwargs, **kwargs}.items()
                  if v is not None and k not in _NOT_SAMPLING}
        if "max_completion_tokens" in params:
            params["max_tokens"] = params.pop("max_completion_tokens")
        if params.pop("reasoning_effort", None) == "none":
            params["chat_template_kwargs"] = {**params.get("chat_template_kwargs", {}),
                                              "enable_thinking": False}
        return messages, params

    def _submit(self, prompt, messages, kwargs):
        messages, params = self._call_args(prompt, messages, kwargs)
        try:
            return self.handle.pool.submit(messages=messages, timeout=self.request_timeout, **params)
        except errors.ContextWindowExceededError as exc:
            raise _dspy_context_error(self.model, exc) from exc

    def _openai(self, completion) -> _Attrs:
        choices = []
        for index, (text, reason) in enumerate(zip(completion.choices, completion.finish_reasons)):
            reasoning, answer = split_reasoning(text)
            message = _Attrs(role="assistant", content=answer, tool_calls=None)
            if self.keep_reasoning and reasoning:
                message["reasoning_content"] = reasoning
            choices.append(_Attrs(index=index, message=message, finish_reason=finish_reason(reason),
                                  logprobs=(completion.logprobs or [None] * (index + 1))[index]))
        usage = _Attrs(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                       total_tokens=completion.prompt_tokens + completion.completion_tokens)
        return _Attrs(id=f"mpdp-{os.getpid()}-{next(self._ids)}", object="chat.completion", model=self.model,
                      choices=choices, usage=usage, cache_hit=False, _hidden_params={})

    def forward(self, prompt=None, messages=None, **kwargs):
        future = self._submit(prompt, messages, kwargs)
        try:
            return self._openai(future.result())
        except errors.ContextWindowExceededError as exc:
            raise _dspy_context_error(self.model, exc) from exc

    async def aforward(self, prompt=None, messages=None, **kwargs):
        if not self.handle.started:          # starting workers blocks: keep it off the event loop
            await asyncio.to_thread(lambda: self.handle.pool)
        future = self._submit(prompt, messages, kwargs)
        try:
            return self._openai(await asyncio.wrap_future(future))
        except errors.ContextWindowExceededError as exc:
            raise _dspy_context_error(self.model, exc) from exc

    def close(self) -> None:
        self.handle.close()

    def dump_state(self) -> dict[str, Any]:
        # The constructor's own keywords: BaseLM.load_state calls cls(**state).
        return {**super().dump_state(), "config": self.handle.config.to_dict(), "keep_reasoning": self.keep_reasoning,
                "request_timeout": self.request_timeout}


def _dspy_context_error(model: str, exc: BaseException):
    from dspy.utils.exceptions import ContextWindowExceededError

    return ContextWindowExceededError(model=model, message=str(exc))
