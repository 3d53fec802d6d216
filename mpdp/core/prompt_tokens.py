"""A request's prompt token ids, in the caller's thread, as the vLLM engine will see them.

Exact cache-aware routing matches a prompt against each engine's cached blocks in the engine's
block units, so text and chat prompts are tokenized before routing, with the model's own
tokenizer (loaded once per pool) and the way ``mpdp/engines/vllm.py`` tokenizes them: a text
prompt with the special tokens (BOS) added; chat through the model's chat template with the
generation prompt, then without special tokens (the template has them). The Rust tokenizer is
called directly: ``PreTrainedTokenizerFast.__call__`` sets truncation and padding on the shared
Rust object at every call, which fails ("Already borrowed") when callers' threads overlap; and
through ``encode_batch``, which releases the GIL while it works (``encode`` holds it), so that
callers tokenize in parallel with each other and with the dispatcher thread.

A prompt this cannot tokenize (no chat template, a template error) gets None: it is routed by
the mirror, and the engine reports its own error as ever.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mpdp")


class PromptTokenizer:
    def __init__(self, model: str, options: dict):
        from transformers import AutoTokenizer

        name = options.get("tokenizer") or model
        self._hf = AutoTokenizer.from_pretrained(
            name, trust_remote_code=bool(options.get("trust_remote_code", False)),
            revision=options.get("tokenizer_revision"))
        self._fast = getattr(self._hf, "backend_tokenizer", None)

    def __call__(self, request) -> list[int] | None:
        try:
            if request.prompt_token_ids is not None:
                return request.prompt_token_ids
            if request.prompt is not None:
                return self._encode(request.prompt, True)
            if request.messages is not None:
                kwargs = {"add_generation_prompt": True}
                kwargs.update((request.params or {}).get("chat_template_kwargs") or {})
                text = self._hf.apply_chat_template(request.messages, tokenize=False, **kwargs)
                return self._encode(text, False)
        except Exception as exc:  # noqa: BLE001  (routing falls back to the mirror for this one)
            log.debug("mpdp: could not tokenize a prompt for routing: %s", exc)
        return None

    def _encode(self, text: str, special: bool) -> list[int]:
        if self._fast is not None:
            return self._fast.encode_batch([text], add_special_tokens=special)[0].ids
        return self._hf.encode(text, add_special_tokens=special)
