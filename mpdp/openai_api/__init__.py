"""OpenAI's API, once, for every door that speaks it: ``mpdp serve`` (HTTP) and the OpenAI batch
lines of ``mpdp generate``.

- ``request``: a request body (chat or completions) -> pool calls (``parse``), every rule
  about its fields in one place; a body the file format forbids (a batch line that streams)
  is refused there too, saying why.
- ``response``: Completions -> response bodies, stream chunks, usage, logprobs, finish
  reasons; exceptions -> error bodies and HTTP statuses (one table over ``errors.classify``).

Pure functions over dicts: no HTTP, no files, no pool.
"""
