"""`kosmos2 <subcommand>`: one console script, thin subcommands.

Each area of the package owns a light module with `register(subparsers)`; the handler it installs imports the
heavy parts (torch, spaCy, ...) only when it runs, so `kosmos2 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "kosmos2.commands",  # ground, info, convert
    "kosmos2.train.cli",  # train
    "kosmos2.data.grit_cli",  # grit build
    "kosmos2.eval.cli",  # eval refcoco | flickr30k | synthetic
    "kosmos2.server.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kosmos2", description="Kosmos-2: grounded captions, referring expressions and boxes."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an area not built yet
            if not (e.name and (name == e.name or name.startswith(e.name + "."))):
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe's buffer: its reader may have gone (`kosmos2 ground ... | head`)
        return code
    except BrokenPipeError:
        # the reader of our output has gone: stop quietly, as a shell tool would on SIGPIPE (128 + 13)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
