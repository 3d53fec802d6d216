"""``mpdp generate``: run a JSONL file of requests through a pool, resumably.

Reads the simple format (``{"id", "prompt" | "messages", ...}``) or OpenAI batch lines
(``{"custom_id", "method", "url", "body"}``), writes one result a line in input order, and can
be stopped (SIGINT, SIGTERM, even SIGKILL) and finished later with ``--resume``. The parts:
``formats`` (lines in and out), ``checks`` (everything found before a worker starts),
``files`` (the output is not the input, the output's lock, a pipe read once), ``output`` (resume
scan, torn-line repair, durable writes that count what is on disk), ``window`` (input order),
``progress`` (the bar and the worker table), ``job`` (the run, signals, exit codes).

This module is what the command line needs to list the subcommand: it imports nothing heavy.
"""

from __future__ import annotations

import argparse

from mpdp.cli_args import add_pool_arguments, add_sampling_arguments, positive as _positive, seconds as _seconds

HELP = "run a JSONL file of requests (simple or OpenAI batch format) through a pool"
EPILOG = """\
input formats (detected from the first line; one file holds one):
  simple   {"id", "prompt" | "messages", <sampling fields>}  ->  {"id", "text", "finish_reason", "usage"}
  openai   {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}
           ->  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
  OpenAI bodies follow mpdp serve's rules (a body the server refuses fails here too; no stream).
  Other fields (metadata, an answer) are copied to the output line. A line that fails alone (a
  bad value, url or model: found before any worker starts) gets an error line in its place:
  simple {"id", "error", "param"}; openai response.body null and the error object in "error".

stopping and resuming:
  SIGINT/SIGTERM abort what is in flight and keep what is written; --resume skips the ids the
  output already has (a torn last line is cut off) and appends the rest.

files:
  The output may not be the input (one file however named: a symlink, a hard link). A run locks
  its output until it exits: a second run on it exits 2 naming the first. --input - (or a pipe,
  /dev/stdin) is read once into a private temporary file, then checked and run.

exit codes: 0 all done, 1 some requests failed, 2 a usage or input mistake (found before any
worker starts: flags, engine options, files, every line's shape), 130/143 stopped by SIGINT/SIGTERM.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("files")
    files.add_argument("--input", required=True, metavar="FILE",
                       help="JSONL requests, simple or OpenAI batch format (detected); - reads standard input")
    files.add_argument("--output", required=True, metavar="FILE", help="JSONL results, one a line, in input order")
    again = files.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="append to an existing output the results of the ids it does not have yet")
    again.add_argument("--overwrite", action="store_true", help="replace an existing output")

    add_pool_arguments(p)                  # every PoolConfig field, as mpdp serve has them
    add_sampling_arguments(p, "generate")  # defaults: mpdp.defaults, the "generate" row

    job = p.add_argument_group("job")
    job.add_argument("--window", type=_positive, default=8192, metavar="N",
                     help="requests in flight at most; results wait in it for earlier ones (default: %(default)s)")
    job.add_argument("--fsync-every", type=_seconds, default=5.0, metavar="SECONDS",
                     help="fsync the output this often; SIGKILL loses at most that much (default: %(default)s)")
    job.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    from mpdp.batch.job import run as run_job

    return run_job(args)
