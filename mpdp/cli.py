"""The command line: ``mpdp COMMAND ...``. A thin front: each subcommand lives in its own module.

A subcommand module has ``HELP`` (one line), optionally ``EPILOG`` (the end of its ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``
(the exit code); its top level must import nothing heavy, since every module is imported to
build ``--help``. Adding a subcommand is one line in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "generate": "mpdp.batch",
    "serve": "mpdp.server.cli",
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpdp", description="mpdp: several GPUs (or CPU workers) as one LLM inference pool")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=getattr(module, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:            # --help (0) or a usage mistake (2): the exit code, as run()'s
        return exc.code if isinstance(exc.code, int) else 2
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
