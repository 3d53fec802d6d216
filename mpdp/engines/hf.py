"""The ``hf`` engine: plain transformers on CPU (or one GPU), batched, a short slice of work per call.

Requests wait in a queue; when no batch runs, up to ``max_batch_size`` rows (a request with
``n`` choices is ``n`` rows) are left-padded and prefilled together, then every ``step()``
decodes one token for each live row with the KV cache. While a batch runs, waiting requests
that fit join it: they are prefilled alone, in steps that alternate with the running batch's
decoding steps, and their cache is merged in (left-padded) once their prefill is done.
A row leaves the batch (and its cache slice is dropped) as soon as its request is done, and
the request is returned in that step. Pad columns are masked and positions count only real
tokens, so greedy text batched equals greedy text alone (tests check it; only float rounding
in differently shaped matmuls could ever tell them apart).

A streamed request sent again after its worker died carries a ``continuation``: each choice's
tokens already streamed become its first generated tokens (prefilled after the prompt, counted in
max_tokens, seen by penalties, stop strings and the JSON grammar), so decoding goes on exactly
where it stopped and the text is decoded over all of them: no space is lost or added at the seam,
and only characters past the delivered ones are streamed. At temperature 0, and with a seed, the
text is that of an uninterrupted run (a choice's generator is moved past the draws already made;
the prompt and streamed tokens are prefilled in one pass where the dead worker decoded them one by
one: only float rounding could ever tell them apart).

Prefill is chunked: one ``step()`` prefills at most ``max_prefill_tokens`` (rows x columns,
padding included), so a long prompt (7,000 tokens: ~14 s in one step on 2 cores, ~18 s in
steps of at most 2 s with a budget of 512) is many short steps, and new requests join between
them. The default budget, 256, leaves room for a machine whose cores other processes also use
(torch's threads then slow down several times).

Step budget (``step_timeout``, after which one call counts as a hung engine): 120 s per 256
tokens of work a step may do (``max(max_prefill_tokens, max_batch_size)``) per billion
parameters (at least 1 of each): 120 s for SmolLM2-135M with the defaults, whose steps take
~0.1-0.5 s on 2 quiet cores. Heartbeats come from their own thread, so a slow step is never
taken for a dead worker.

Params: max_tokens (default 16; ``"context"`` = up to the context limit), temperature (default 1.0
as in vLLM; 0, or below 1e-5 as vLLM rounds it, = greedy argmax), top_p, top_k, n, seed, stop,
ignore_eos, presence_penalty and frequency_penalty (subtracted from the logits over the
generated tokens, as vLLM does), logprobs (k in 0..20: the chosen token's logprob plus the top
k, from the raw model distribution; per choice a list of ``engines.logprobs`` records),
chat_template_kwargs, and ``response_format`` as vLLM's OpenAI server
takes it: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object) or
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``. JSON formats are
enforced while decoding with xgrammar: each row has its own grammar matcher, whose token
bitmask is applied to the logits before the token is chosen (greedy or sampled), so the
output always parses, unless max_tokens cuts it (finish_reason "length", as in vLLM).

Options: max_batch_size (16), max_prefill_tokens (256), dtype ("float32"), max_model_len (the
config's), device (a GPU when the placement has one, else "cpu"), json_any_whitespace (False:
the grammar allows only compact JSON, because a small model given free whitespace can fill
max_tokens with newlines; True allows any whitespace, as vLLM does by default). Unknown
options raise ValueError.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from mpdp.config import TO_CONTEXT
from mpdp.engines.base import (ContextWindowExceeded, Engine, EngineRequest, EngineResult, WorkerPlacement,
                               json_format)
from mpdp.engines.logprobs import record as logprob_record, token_bytes

MAX_LOGPROBS = 20
OPTIONS = frozenset({"max_batch_size", "max_prefill_tokens", "dtype", "max_model_len", "device",
                     "json_any_whitespace"})
# vLLM treats a temperature below this as greedy (vllm/sampling_params.py, _SAMPLING_EPS); dividing
# logits by 1e-40 would overflow to inf and make the softmax NaN.
SAMPLING_EPS = 1e-5


@dataclass(eq=False)
class _Request:
    id: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None
    seed: int | None
    n: int
    grammar: Any = None  # xgrammar CompiledGrammar for a JSON response_format, else None
    rows: list["_Row"] = field(default_factory=list)
    stream: bool = False   # report new text every decoding step (partial results)
    dead: bool = False   # aborted, or failed (then reported once, at once)


@dataclass(eq=False)
class _Row:
    """One choice of one request: its generated tokens and how it ended."""

    req: _Request
    generator: Any  # torch.Generator, only when sampling
    matcher: Any = None  # xgrammar GrammarMatcher, only with a JSON response_format
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    sent: int = 0        # characters already streamed
    reported: int = 0    # tokens already streamed (their ids go with the partial results)


def step_budget(parameters: int, max_prefill_tokens: int, max_batch_size: int) -> float:
    """Seconds one engine call may run before it counts as hung (see the module docstring)."""
    billions = parameters / 1e9
    work = max(max_prefill_tokens, max_batch_size) / 256
    return HFEngine.step_timeout * max(1.0, billions) * max(1.0, work)


class HFEngine(Engine):
    name = "hf"

    loads_weights = True
    continues_streams = True
    ready_timeout = 300.0            # the first start converts the embedded GGUF file
    step_timeout = 120.0             # the least; scaled per instance (see the module docstring)
    option_names = OPTIONS

    def __init__(self, model: str, options: dict[str, Any], placement: WorkerPlacement):
        super().__init__(model, options, placement)
        self.check_options(options)
        # Imported here: the parent process imports this class without paying for torch.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Progress bars would fill the worker's stderr tail, which the pool shows on crashes.
        hf_logging.disable_progress_bar()
        self._torch = torch
        torch.set_num_threads(max(1, placement.num_threads))
        from mpdp.models import resolve_model

        folder = resolve_model(model)      # a folder already (the pool resolved it); a name when used alone
        dtype = self.options.get("dtype", "float32")
        dtype = getattr(torch, "float32" if dtype == "auto" else dtype) if isinstance(dtype, str) else dtype
        device = self.options.get("device", "cuda" if placement.gpus and torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._token_bytes = token_bytes(self.tokenizer)   # each token's own bytes, for logprobs
        # We check lengths ourselves (add); silence the tokenizer's "sequence too long" warning.
        self.tokenizer.model_max_length = sys.maxsize
        self.hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        # transformers >= 5.2x calls the KV cache argument `cache`; older ones `past_key_values`.
        params = inspect.signature(self.hf_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        config = self.hf_model.config
        self.max_batch_size = _positive(self.options, "max_batch_size", 16)
        self.max_prefill_tokens = _positive(self.options, "max_prefill_tokens", 256)
        self.step_timeout = step_budget(sum(p.numel() for p in self.hf_model.parameters()),
                                        self.max_prefill_tokens, self.max_batch_size)
        self._max_len = int(self.options.get("max_model_len") or config.max_position_embeddings)
        self.vocab_size = config.vocab_size
        eos = self.hf_model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.waiting: list[_Request] = []
        self.done: list[_Request] = []        # continued requests whose every choice had already ended
        self.batch: _Batch | None = None      # decoding
        self.incoming: _Batch | None = None   # being prefilled, chunk by chunk
        self._prefilled = False  # the last step prefilled while a batch runs: the next one decodes
        self._grammars = _Grammars(self.tokenizer, self.vocab_size, sorted(self.eos_ids),
                                   bool(self.options.get("json_any_whitespace", False)),
                                   threads=placement.num_threads)

    # -- Engine interface ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 2 * self.max_batch_size  # a running batch plus the next one waiting

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.done) or self.batch is not None or self.incoming is not None

    def abort(self, request_ids: list[int]) -> None:
        ids = set(request_ids)
        self.waiting = [r for r in self.waiting if r.id not in ids]
        for batch in (self.batch, self.incoming):
            for row in batch.rows if batch is not None else ():
                if row.req.id in ids:
                    row.req.dead = True  # its rows leave the batch at the next step
        if self.batch is not None and all(row.req.dead for row in self.batch.rows):
            self.batch = None
        if self.incoming is not None and all(row.req.dead for row in self.incoming.rows):
            self.incoming = None

    def add(self, request: EngineRequest) -> None:
        req = self._prepare(request)
        (self.waiting if _open_rows(req) else self.done).append(req)

    def step(self) -> list[EngineResult]:
        if self.done:
            done, self.done = self.done, []
            return [self._result(req) for req in done]
        with self._torch.inference_mode():
            if self.incoming is None:
                self.incoming = self._next_incoming()
            # Prefill chunks alternate with decoding steps, so running rows keep moving.
            if self.incoming is not None and (self.batch is None or not self._prefilled):
                self._prefilled = self.batch is not None
                return self._prefill_step()
            self._prefilled = False
            if self.batch is None:
                return []
            results = self._advance(self.batch, self.batch.decode())
            if not self.batch.rows:
                self.batch = None
        return results

    def close(self) -> None:
        self.batch = self.incoming = None
        self.waiting = []
        self.hf_model = None

    def _next_incoming(self) -> "_Batch | None":
        """The rows to prefill next: a fresh batch, or newcomers that fit beside the running one."""
        if not self.waiting:
            return None
        if self.batch is None:
            return self._take_batch(self.max_batch_size, first_always=True)
        if self.batch.can_join() and self._fits():
            return self._take_batch(self.max_batch_size - len(self.batch.rows))
        return None

    def _prefill_step(self) -> list[EngineResult]:
        """One chunk of the incoming prefill; on its last chunk the rows get their first token
        and join (or become) the running batch."""
        new = self.incoming
        logits = new.prefill_chunk(self.max_prefill_tokens)
        if logits is None:
            return []
        self.incoming = None
        results = self._advance(new, logits)
        if new.rows:
            if self.batch is None:
                self.batch = new
            else:
                self.batch.merge(new)
        return results

    # -- requests ----------------------------------------------------------------------------

    def _prepare(self, request: EngineRequest) -> _Request:
        """Validate and tokenize now, so bad input fails this request alone at add()."""
        p = request.params
        ids = self._prompt_ids(request)
        if not ids:
            raise ValueError("the prompt is empty (0 tokens)")
        if len(ids) >= self._max_len:
            raise ContextWindowExceeded(
                f"the prompt has {len(ids)} tokens, but the model's context limit (max_model_len) "
                f"is {self._max_len} tokens")
        if p.get("max_tokens", 0) in (None, TO_CONTEXT):
            max_tokens = self._max_len - len(ids)  # as vLLM's None: until the context is full
        else:
            max_tokens = _int(p, "max_tokens", 16, low=1)
        if len(ids) + max_tokens > self._max_len:
            raise ContextWindowExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together "
                f"{len(ids) + max_tokens} > the context limit (max_model_len) of {self._max_len} "
                f"tokens; lower max_tokens to at most {self._max_len - len(ids)}")
        grammar = self._grammars.compile(p.get("response_format"))
        stop = p.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {p.get('stop')!r}")
        logprobs = p.get("logprobs")
        if logprobs is not None:
            logprobs = int(logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
        temperature = _float(p, "temperature", 1.0, low=0.0)
        if temperature < SAMPLING_EPS:
            temperature = 0.0
        top_p = _float(p, "top_p", 1.0, low=0.0)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        seed = p.get("seed")
        req = _Request(
            id=request.id, prompt_ids=ids, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=_int(p, "top_k", 0, low=-1), stop=stop,
            ignore_eos=bool(p.get("ignore_eos", False)),
            presence_penalty=_float(p, "presence_penalty", 0.0),
            frequency_penalty=_float(p, "frequency_penalty", 0.0),
            logprobs=logprobs, seed=None if seed is None else int(seed), n=_int(p, "n", 1, low=1),
            grammar=grammar, stream=bool(request.stream))
        for i in range(req.n):
            generator = None
            if req.temperature > 0:
                # One generator per choice: a seeded request samples the same text whatever
                # else shares its batch; choices of one request get different streams.
                generator = self._torch.Generator(device=self.device)
                generator.manual_seed((req.seed if req.seed is not None else random.getrandbits(62)) + i)
            req.rows.append(_Row(req, generator, self._grammars.matcher(grammar)))
        if request.continuation is not None:
            self._continue(req, request.continuation)
        return req

    def _continue(self, req: _Request, continuation: list) -> None:
        """Each choice resumes after the tokens it already streamed, as if this engine had made them."""
        if len(continuation) != req.n:
            raise ValueError(f"the continuation has {len(continuation)} choices, the request n={req.n}")
        for row, (tokens, sent) in zip(req.rows, continuation):
            if len(tokens) > req.max_tokens or not all(0 <= t < self.vocab_size for t in tokens):
                raise ValueError("the continuation's token ids are not a start of this request's output")
            for t in tokens:
                if row.matcher is not None and not row.matcher.accept_token(t):
                    raise ValueError(f"the continuation's token {t} breaks the response_format grammar")
            row.tokens, row.sent, row.reported = list(tokens), sent, len(tokens)
            if row.generator is not None and tokens:
                # One draw per token sampled so far, so a seeded choice goes on as it would have.
                # A draw takes the same randomness whatever the probabilities (of one vocabulary
                # size), so drawing from a uniform one moves the generator where it was.
                uniform = self._torch.ones(self.vocab_size, device=self.device)
                for _ in tokens:
                    self._torch.multinomial(uniform, 1, generator=row.generator)
            if tokens:
                self._check_finish(row)     # a choice that had ended ends the same way again

    def _prompt_ids(self, request: EngineRequest) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("exactly one of prompt, messages, prompt_token_ids must be given")
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return ids
        if request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise TypeError(f"prompt must be a str, got {type(request.prompt).__name__}")
            return self.tokenizer(request.prompt).input_ids
        kwargs = {"add_generation_prompt": True, **(request.params.get("chat_template_kwargs") or {})}
        messages = _text_messages(request.messages)
        # Render to text, then tokenize without adding special tokens (the template has them),
        # as vLLM does; 5.x's tokenize=True would return a BatchEncoding anyway.
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:
            # Jinja errors (a template raising, an undefined name from chat_template_kwargs) are
            # this request's fault: fail it alone instead of the worker's loop.
            raise ValueError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(text, str):
            raise ValueError(f"the chat template gave {type(text).__name__}, not text "
                             "(check chat_template_kwargs)")
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _fits(self) -> bool:
        return len(self.batch.rows) + len(_open_rows(self.waiting[0])) <= self.max_batch_size

    def _take_batch(self, room: int, first_always: bool = False) -> "_Batch":
        rows = []
        # Whole requests only (their n rows together), in arrival order; a fresh batch takes
        # the first request even if its n alone is over max_batch_size. (A continued request's
        # choices that had already ended take no row.)
        while self.waiting and ((first_always and not rows)
                                or len(rows) + len(_open_rows(self.waiting[0])) <= room):
            rows.extend(_open_rows(self.waiting.pop(0)))
        return _Batch(self, rows)

    # -- one token for every row --------------------------------------------------------------

    def _advance(self, batch: "_Batch", logits) -> list[EngineResult]:
        """Append one chosen token to every row of ``batch``; drop the rows that are done."""
        torch = self._torch
        logits = logits.float()
        chosen, failures = self._choose(batch.rows, logits)
        results, finished_reqs = [], []
        for i, (row, token, row_logits) in enumerate(zip(batch.rows, chosen, logits)):
            req = row.req
            if req.dead:
                continue
            if i not in failures and row.matcher is not None and not row.matcher.accept_token(token):
                failures[i] = RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
            if i in failures:
                # This row's own arithmetic failed: the request fails alone, the batch goes on.
                req.dead = True
                results.append(EngineResult.failure(req.id, failures[i]))
                continue
            row.tokens.append(token)
            if req.logprobs is not None:
                row.logprobs.append(self._logprob_entry(row_logits, token, req.logprobs))
            self._check_finish(row)
            # A request's rows are all in this batch or already gone, so exactly its last
            # row to finish sees them all finished: the request is reported once.
            if row.finish_reason is not None and all(r.finish_reason for r in req.rows):
                finished_reqs.append(req)
        results += [self._result(req) for req in finished_reqs]
        done = {id(req) for req in finished_reqs}
        results += [p for req in {id(r.req): r.req for r in batch.rows}.values()
                    if req.stream and not req.dead and id(req) not in done
                    and (p := self._partial(req)) is not None]
        keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None and not row.req.dead]
        if len(keep) < len(batch.rows):
            batch.select(keep)  # finished rows stop costing compute
        batch.last_tokens = torch.tensor([[row.tokens[-1]] for row in batch.rows], dtype=torch.long,
                                         device=self.device)
        return results

    def _choose(self, rows: list[_Row], logits) -> tuple[list[int], dict[int, Exception]]:
        """The next token of every row, and the rows whose sampling failed (index -> error)."""
        torch = self._torch
        logits = logits.clone()   # the raw logits stay for logprobs, as vLLM reports them
        for i, row in enumerate(rows):
            req = row.req
            if (req.presence_penalty or req.frequency_penalty) and row.tokens:
                counts = torch.bincount(torch.tensor(row.tokens, device=logits.device),
                                        minlength=logits.shape[-1]).to(logits.dtype)
                logits[i] -= req.frequency_penalty * counts + req.presence_penalty * (counts > 0)
        self._grammars.mask(rows, logits)   # -inf wherever a row's grammar forbids the token
        # Greedy rows: one argmax for the whole batch, the same op generate(do_sample=False) uses.
        chosen = logits.argmax(dim=-1).tolist()
        failures: dict[int, Exception] = {}
        for i, row in enumerate(rows):
            if row.req.temperature > 0 and not row.req.dead:
                try:
                    chosen[i] = self._sample(logits[i], row)
                except Exception as exc:   # e.g. torch's "invalid multinomial distribution"
                    failures[i] = exc
        return chosen, failures

    def _sample(self, logits, row: _Row) -> int:
        torch = self._torch
        req = row.req
        logits = logits / req.temperature
        if 0 < req.top_k < logits.shape[-1]:
            kth = torch.topk(logits, req.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p, and always the top token: a
            # top_p below float32's resolution (1e-300 rounds to 0) would otherwise drop them all.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= req.top_p
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator).item())

    def _logprob_entry(self, logits, token: int, k: int) -> dict:
        logp = self._torch.log_softmax(logits, dim=-1)
        top = []
        if k:
            values, ids = logp.topk(k)
            top = [(int(t), self._token_bytes(int(t)), float(v)) for v, t in zip(values, ids)]
        return logprob_record(token, self._token_bytes(token), float(logp[token]), top)

    def _check_finish(self, row: _Row) -> None:
        req = row.req
        if row.tokens[-1] in self.eos_ids and not req.ignore_eos:
            row.finish_reason = "stop"
        elif row.matcher is not None and row.matcher.is_terminated():
            row.finish_reason = "stop"   # the JSON is complete (its stop token was accepted)
        elif req.stop:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cuts = [text.find(s) for s in req.stop if s in text]
            if cuts:
                row.text, row.finish_reason = text[:min(cuts)], "stop"
                return
        if row.finish_reason is None and len(row.tokens) >= req.max_tokens:
            row.finish_reason = "length"
        if row.finish_reason is not None and row.text is None:
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def _partial(self, req: _Request) -> EngineResult | None:
        """The text each choice decoded since the last partial. Held back: a trailing incomplete
        character, and as many characters as a stop string could still need, so that what was
        streamed is always a prefix of the final text."""
        hold = max((len(s) for s in req.stop), default=1) - 1
        deltas, token_ids = [], []
        for row in req.rows:
            token_ids.append(row.tokens[row.reported:])
            row.reported = len(row.tokens)
            if row.finish_reason is not None:
                deltas.append("")
                continue
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).rstrip("\ufffd")
            upto = max(row.sent, len(text) - hold)
            deltas.append(text[row.sent:upto])
            row.sent = upto
        if not any(deltas):
            for row, ids in zip(req.rows, token_ids):   # not reported: they go with the next one
                row.reported -= len(ids)
            return None
        return EngineResult(id=req.id, texts=deltas, finish_reasons=[""] * len(deltas),
                            prompt_tokens=len(req.prompt_ids),
                            completion_tokens=sum(len(r.tokens) for r in req.rows), finished=False,
                            token_ids=token_ids)

    def _result(self, req: _Request) -> EngineResult:
        return EngineResult(
            id=req.id, texts=[r.text for r in req.rows], finish_reasons=[r.finish_reason for r in req.rows],
            prompt_tokens=len(req.prompt_ids), completion_tokens=sum(len(r.tokens) for r in req.rows),
            logprobs=[r.logprobs for r in req.rows] if req.logprobs is not None else None)


class _Batch:
    """Running rows with their left-padded attention mask, positions and KV cache.

    Left padding keeps every row's newest token in the last column, so one decoding step is
    one forward over a [rows, 1] input. Pad columns are masked out and positions count only
    real tokens, so a row computes what it would compute alone (up to float rounding).
    """

    def __init__(self, engine: HFEngine, rows: list[_Row]):
        torch = engine._torch
        self.engine, self.rows = engine, rows
        self.cache = self.last_tokens = None
        # A row's context: its prompt, then the tokens it already generated (a continued stream's).
        contexts = [r.req.prompt_ids + r.tokens if r.tokens else r.req.prompt_ids for r in rows]
        width = max(map(len, contexts), default=0)
        ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, prompt in enumerate(contexts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        self.input_ids, self.mask = ids.to(engine.device), mask.to(engine.device)
        # Pads get position 1 (as generate() does); they are masked anyway.
        self.positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        self.prefilled = 0   # prompt columns already in the cache

    def prefill_chunk(self, budget: int):
        """Prefill the next columns, at most ``budget`` tokens (rows x columns); the last
        column's logits once the whole prompt is in the cache, else None."""
        torch = self.engine._torch
        if not self.rows:
            return torch.zeros((0, self.engine.vocab_size), dtype=torch.float32, device=self.engine.device)
        width = self.input_ids.shape[1]
        start = self.prefilled
        end = min(width, start + max(1, budget // len(self.rows)))
        # The first chunk has no cache: the model makes its own (a DynamicCache) and returns it;
        # later chunks attend to it through the mask over every column so far.
        logits = self._forward(self.input_ids[:, start:end], self.positions[:, start:end], self.mask[:, :end])
        self.prefilled = end
        if end < width:
            return None
        self.positions, self.input_ids = self.positions[:, -1:], None
        return logits

    def decode(self):
        self.mask = self.engine._torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
        self.positions = self.positions + 1
        return self._forward(self.last_tokens, self.positions, self.mask)

    def _forward(self, input_ids, positions, mask):
        engine = self.engine
        kwargs = {} if self.cache is None else {engine.cache_kwarg: self.cache}
        out = engine.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1, **kwargs)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[:, -1, :]

    def can_join(self) -> bool:
        """Merging edits the cache tensors: only for plain full-attention layers we know."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def select(self, keep: list[int]) -> None:
        index = self.engine._torch.tensor(keep, dtype=self.engine._torch.long, device=self.engine.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        if not keep:
            self.cache = None
            return
        self.cache.batch_select_indices(index)
        # Columns that are padding in every remaining row (a long prompt left) cost attention
        # for nothing: cut them.
        start = int(self.mask.any(0).int().argmax())
        if start and self.can_join():
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def merge(self, other: "_Batch") -> None:
        """Append ``other``'s rows, left-padding the shorter side's mask and cache."""
        torch = self.engine._torch
        pad = torch.nn.functional.pad
        width = max(self.mask.shape[1], other.mask.shape[1])
        a, b = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            # [rows, heads, seq, head_dim]: pad the seq dimension on the left.
            mine.keys = torch.cat([pad(mine.keys, (0, 0, a, 0)), pad(theirs.keys, (0, 0, b, 0))])
            mine.values = torch.cat([pad(mine.values, (0, 0, a, 0)), pad(theirs.values, (0, 0, b, 0))])
        self.mask = torch.cat([pad(self.mask, (a, 0)), pad(other.mask, (b, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.rows = self.rows + other.rows


class _Grammars:
    """``response_format`` -> an xgrammar grammar, and each row's matcher and token mask.

    xgrammar is imported and its tokenizer table built on the first JSON request only. The
    compiler caches grammars, so DSPy's one schema per signature is compiled once per worker.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], any_whitespace: bool,
                 threads: int = 1):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self.any_whitespace, self.threads = any_whitespace, threads
        self._xgr = self._compiler = None

    def compile(self, fmt: Any):
        """The compiled grammar for this response_format (the shapes the vllm engine maps), or None."""
        parsed = json_format(fmt)
        if parsed is None:
            return None
        kind, schema = parsed
        if kind == "json_object":
            schema = {"type": "object"}   # what vLLM compiles for json_object
        compiler = self._load()
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            return compiler.compile_json_schema(text, any_whitespace=self.any_whitespace)
        except Exception as exc:   # xgrammar raises RuntimeError and friends for a bad schema
            raise ValueError(f"response_format: xgrammar cannot compile this JSON schema: {exc}") from exc

    def matcher(self, grammar: Any):
        return None if grammar is None else self._xgr.GrammarMatcher(grammar)

    def mask(self, rows: list[_Row], logits) -> None:
        """Set to -inf, in place, every logit the row's grammar does not allow next."""
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None and not row.req.dead]
        if not constrained:
            return
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for i in constrained:
            rows[i].matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=constrained)

    def _load(self):
        if self._compiler is None:
            try:
                import xgrammar
            except ImportError as exc:
                raise ValueError("response_format json_object/json_schema on the hf engine needs the "
                                 "xgrammar package (pip install 'mpdp[cpu]')") from exc
            # The model's logits width (config.vocab_size) can exceed the tokenizer's; the mask
            # must cover it. Our EOS ids are the grammar's stop tokens: it ends on them alone.
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_ids)
            self._xgr = xgrammar
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=max(1, self.threads))
        return self._compiler


def _text_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style content parts -> plain strings (text templates like SmolLM2's need str)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"each message needs a 'role', got {m!r}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise ValueError(f"the hf engine accepts only text content parts, got {part!r}")
                parts.append(part.get("text", ""))
            m = {**m, "content": "".join(parts)}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


def _open_rows(req: _Request) -> list[_Row]:
    """The choices still to decode (all of them, except in a continued request)."""
    return [r for r in req.rows if r.finish_reason is None]


def _positive(options: dict, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the hf engine option {key} must be a positive int, got {value!r}")
    return value


def _int(params: dict, key: str, default: int, low: int | None = None) -> int:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")
    return value


def _float(params: dict, key: str, default: float, low: float | None = None) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")
    return float(value)
