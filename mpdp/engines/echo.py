"""The echo engine: the completion is the prompt itself. For tests of the plumbing, never for features.

Text is the prompt (for chat: the last message's content) cut to ``max_tokens`` characters;
one character counts as one token (with ``logprobs``: each of logprob 0; ``max_tokens="context"``:
the whole prompt, or what the ``max_model_len`` option leaves of it). Options:

- ``delay_s``: each request finishes this many seconds after it arrived (holds requests in flight);
- ``capacity``: the credit it advertises (default 4096);
- ``max_model_len``: a context in characters: ``add`` raises ContextWindowExceeded when the prompt
  plus ``max_tokens`` does not fit (as the real engines do), and READY reports it;
- ``faults``: when true, a prompt ``"!fault:<kind>"`` makes the engine fail in that way, so the
  failure tests can crash a real worker: ``exit`` (``os._exit(3)``), ``kill`` (SIGKILL itself),
  ``segv`` (SIGSEGV itself), ``raise`` (an exception in ``step``), ``hang`` (``step`` never returns),
  ``slow:<seconds>`` (one ``step`` computes that long in Python, holding the GIL as pure Python
  code does, then the request is echoed: a slow engine, which must not be taken for a hung one),
  ``reject`` (``add`` raises ValueError: a bad request, not a crash), ``addfail`` (``add`` raises
  an exception of no standard class, as vLLM's own request errors are: still the request's
  failure alone), ``badresult`` (``step``
  returns a result of the wrong shape: a protocol violation the dispatcher must survive). The prompt ``"!held"``
  answers at once with the ids of the other requests the engine holds (``"3 7"``), so a test
  can see that a cancelled or timed-out request was really aborted inside the engine.

A streamed request (``EngineRequest.stream``) comes back in pieces of ``stream_piece``
characters (default 4), one piece per step, before its final result: the same path a real
engine's per-step deltas take. Each piece carries its characters' code points as token ids, and a
stream sent again with a ``continuation`` (its worker died) goes on after the characters already
delivered, as the real engines do.
"""

from __future__ import annotations

import heapq
import os
import resource
import signal
import time

from mpdp.config import TO_CONTEXT
from mpdp.engines.base import ContextWindowExceeded, Engine, EngineRequest, EngineResult, WorkerPlacement
from mpdp.engines.logprobs import record as logprob_record

FAULT_PREFIX = "!fault:"
HELD_PROBE = "!held"


class EchoAddError(Exception):
    """What ``!fault:addfail`` raises from ``add``: neither ValueError nor TypeError."""


class EchoEngine(Engine):
    name = "echo"
    step_timeout = 30.0     # its steps take microseconds (they sleep at most 2 ms)
    continues_streams = True

    option_names = frozenset({"delay_s", "capacity", "faults", "max_model_len", "stream_piece"})

    def __init__(self, model: str, options: dict, placement: WorkerPlacement):
        super().__init__(model, options, placement)
        self.check_options(options)
        self.delay_s = float(options.get("delay_s", 0.0))
        self._capacity = int(options.get("capacity", 4096))
        self.faults = bool(options.get("faults", False))
        self._max_model_len = int(options["max_model_len"]) if options.get("max_model_len") else None
        self._due: list[tuple[float, int]] = []          # (due time, request id), a heap
        self._held: dict[int, EngineRequest] = {}
        self._pending_fault: str | None = None
        self._probes: set[int] = set()
        self.stream_piece = int(options.get("stream_piece", 4))
        self._streams: dict[int, int] = {}               # streamed request id -> characters sent
        self._bad_results: list[int] = []
        self._counts: tuple[int, int] | None = None      # (held, tokens finished) in the last step

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def add(self, request: EngineRequest) -> None:
        text = _text_of(request)
        if self._max_model_len is not None:
            max_tokens = request.params.get("max_tokens", 16)
            if max_tokens == TO_CONTEXT:
                max_tokens = 1                             # at least one must be left to generate
            if len(text) + max_tokens > self._max_model_len:
                raise ContextWindowExceeded(
                    f"the prompt ({len(text)} tokens) plus max_tokens ({max_tokens}) "
                    f"is more than the model's context of {self._max_model_len} tokens")
        due = time.monotonic() + self.delay_s
        if self.faults and text.startswith(FAULT_PREFIX):
            kind = text[len(FAULT_PREFIX):]
            if kind == "reject":
                raise ValueError("the echo engine was asked to reject this request")
            if kind == "addfail":
                raise EchoAddError("the echo engine failed to add this request on purpose")
            if kind == "badresult":
                self._bad_results.append(request.id)
                return
            self._pending_fault = kind
        elif self.faults and text == HELD_PROBE:
            self._probes.add(request.id)
            due = 0.0
        self._held[request.id] = request
        if request.stream and request.id not in self._probes:
            # A continuation: the characters (one a token) its consumer already has are not sent again.
            self._streams[request.id] = min((c[1] for c in request.continuation or ()), default=0)
        heapq.heappush(self._due, (due, request.id))

    def step(self) -> list[EngineResult]:
        if self._pending_fault and self._pending_fault.startswith("slow:"):
            _compute(float(self._pending_fault[len("slow:"):]))
            self._pending_fault = None
        if self._pending_fault:
            _fail(self._pending_fault)
        if self._bad_results:
            return [EngineResult(id=self._bad_results.pop(), texts="not a list", prompt_tokens="many")]
        running = len(self._held)
        now = time.monotonic()
        if self._due and self._due[0][0] > now:
            # Sleep a little, not until the deadline: the worker must keep answering the dispatcher.
            time.sleep(min(self._due[0][0] - now, 0.002))
            now = time.monotonic()
        out = self._stream_pieces()
        while self._due and self._due[0][0] <= now:
            _, rid = heapq.heappop(self._due)
            req = self._held.pop(rid, None)
            if rid in self._probes:
                self._probes.discard(rid)
                if req is not None:
                    held = " ".join(map(str, sorted(self._held)))
                    out.append(EngineResult(id=rid, texts=[held], finish_reasons=["stop"]))
            elif req is not None:                       # None: aborted meanwhile
                self._streams.pop(rid, None)
                out.append(_echo(req, self._max_model_len))
        self._counts = (running, sum(r.completion_tokens for r in out if r.finished))
        return out

    def step_counts(self) -> tuple[int, int] | None:
        return self._counts

    def _stream_pieces(self) -> list[EngineResult]:
        out = []
        for rid, sent in self._streams.items():
            full = _echo(self._held[rid], self._max_model_len)
            piece = [t[sent:sent + self.stream_piece] for t in full.texts]
            if any(piece):
                self._streams[rid] = sent + self.stream_piece
                out.append(EngineResult(id=rid, texts=piece, finish_reasons=[""] * len(piece),
                                        prompt_tokens=full.prompt_tokens, finished=False,
                                        token_ids=[list(map(ord, t)) for t in piece]))
        return out

    def abort(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            self._held.pop(rid, None)
            self._streams.pop(rid, None)
            self._probes.discard(rid)

    def has_unfinished(self) -> bool:
        return bool(self._held or self._bad_results)


def _text_of(req: EngineRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    if req.messages is not None:
        return req.messages[-1]["content"]
    return " ".join(map(str, req.prompt_token_ids))


def _echo(req: EngineRequest, max_model_len: int | None = None) -> EngineResult:
    text = _text_of(req)
    max_tokens = req.params.get("max_tokens", 16)
    if max_tokens == TO_CONTEXT:      # the whole prompt, cut only by a context it was given
        max_tokens = max_model_len - len(text) if max_model_len else len(text)
    n = req.params.get("n", 1)
    out, reason = (text[:max_tokens], "length") if len(text) > max_tokens else (text, "stop")
    for s in req.params.get("stop") or ():
        cut = out.find(s)
        if cut >= 0:
            out, reason = out[:cut], "stop"
    k = req.params.get("logprobs")
    logprobs = None
    if k is not None:       # one character a token, certain: logprob 0, itself the only alternative
        records = [logprob_record(ord(c), c.encode(), 0.0, [(ord(c), c.encode(), 0.0)][:k]) for c in out]
        logprobs = [records] * n
    return EngineResult(id=req.id, texts=[out] * n, finish_reasons=[reason] * n,
                        prompt_tokens=len(text), completion_tokens=len(out) * n, logprobs=logprobs)


def _compute(seconds: float) -> None:
    """Busy Python code for ``seconds``: no sleep, no native call that would release the GIL."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(range(1000))


def _fail(kind: str) -> None:
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segv":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a test must not leave a core file
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        while True:
            time.sleep(3600)
    raise RuntimeError(f"the echo engine failed on purpose ({kind})")
