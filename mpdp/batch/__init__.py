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

from mpdp.cli_args import add_pool_arguments, positive as _positive, seconds as _seconds

HELP = "run a JSONL file of requests (simple or OpenAI batch format) through a pool"
EPILOG = """\
input formats (detected from the first line; one file holds one):
  simple   {"id", "prompt" | "messages", <sampling fields>}  ->  {"id", "text", "finish_reason", "usage"}
  openai   {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}
           ->  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
  Other fields (metadata, an answer) are copied to the output line. A request that fails alone
  gets an error line in its place.

stopping and resuming:
  SIGINT/SIGTERM abort what is in flight and keep what is written; --resume skips the ids the
  output already has (a torn last line is cut off) and appends the rest.

files:
  The output may not be the input (one file however named: a symlink, a hard link). A run locks
  its output until it exits: a second run on it exits 2 naming the first. --input - (or a pipe,
  /dev/stdin) is read once into a private temporary file, then checked and run.

exit codes: 0 all done, 1 some requests failed, 2 a usage or input mistake (found before any
worker starts), 130/143 stopped by SIGINT/SIGTERM.
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

    pool = p.add_argument_group("pool")
    add_pool_arguments(pool)
    pool.add_argument("--launcher", default="local", choices=("local", "ray"),
                      help="where workers run: this machine, or a Ray cluster (default: %(default)s)")
    pool.add_argument("--ray-address", default=None, metavar="ADDRESS",
                      help="the Ray cluster for --launcher ray, e.g. HEAD_IP:6379 (default: RAY_ADDRESS, "
                           "else a running local cluster)")

    sampling = p.add_argument_group("sampling defaults (each line may override them)")
    sampling.add_argument("--max-tokens", type=int, default=256, help="(default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s, greedy)")
    sampling.add_argument("--top-p", type=float, default=None, help="(default: the engine's, 1.0)")
    sampling.add_argument("--top-k", type=int, default=None, help="(default: the engine's, off)")
    sampling.add_argument("--seed", type=int, default=None, help="(default: none)")

    job = p.add_argument_group("job")
    job.add_argument("--window", type=_positive, default=8192, metavar="N",
                     help="requests in flight at most; results wait in it for earlier ones (default: %(default)s)")
    job.add_argument("--fsync-every", type=_seconds, default=5.0, metavar="SECONDS",
                     help="fsync the output this often; SIGKILL loses at most that much (default: %(default)s)")
    job.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    from mpdp.batch.job import run as run_job

    return run_job(args)
