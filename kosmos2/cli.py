"""`kosmos2 <subcommand>`: one console script, thin subcommands.

Each area of the package owns a light module with `register(subparsers)`; the handler it installs imports the
heavy parts (torch, spaCy, ...) only when it runs, so `kosmos2 --help` stays fast.

Errors (README "Exit codes"): every failure is one line on stderr, `kosmos2 <verb>: <message>`, and the exit
status says what kind it was:

    0    success
    1    a bad input or a runtime failure (unreadable image, bad model directory, ...), or a bug
    2    a malformed command line (unknown option, --batch-size 0, --sample --temperature 0, ...)
    130  interrupted (Ctrl-C);  141: the reader of our output went away (`kosmos2 ground ... | head`)

A bug (an exception that is neither a `kosmos2.errors.UserError` nor a `ValueError` / `OSError` message of the
library) is also one line, marked "internal error". `--debug` (accepted by every subcommand) or the
environment variable KOSMOS2_DEBUG=1 prints the traceback above the line. Warnings are one line each too,
`kosmos2 <verb>: warning: <message>`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "kosmos2.commands",  # ground, draw, info, convert
    "kosmos2.train.cli",  # train
    "kosmos2.train.finetune",  # finetune
    "kosmos2.data.grit_cli",  # grit build
    "kosmos2.eval.cli",  # eval refcoco | flickr30k | synthetic
    "kosmos2.server.cli",  # serve
]
DEBUG_ENV = "KOSMOS2_DEBUG"  # "1": print tracebacks, as --debug does
EXIT_USAGE = 2  # argparse's status for a malformed command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`kosmos2 ground: argument --batch-size: ...`), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kosmos2",
        description="Kosmos-2: grounded captions, referring expressions and boxes.",
        epilog="Exit status: 0 success, 1 bad input or runtime error, 2 bad command line. Errors are one "
        f"line; --debug (or {DEBUG_ENV}=1) shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an area not built yet
            if not (e.name and (name == e.name or name.startswith(e.name + "."))):
                raise
            continue
        module.register(subparsers)
    _prepare(parser)
    return parser


def _prepare(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand `--debug` and record its name (`kosmos2 eval synthetic`) for error messages."""
    parser.set_defaults(_verb=parser.prog)
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in children:
        for sub in set(action.choices.values()):
            _prepare(sub)
    if parser.prog != "kosmos2":
        with contextlib.suppress(argparse.ArgumentError):  # a subcommand that defines its own --debug
            parser.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS,
                help="print the traceback of an error",
            )


def main(argv: list[str] | None = None) -> int:
    """Run `kosmos2 ARGS`; return the exit status. A malformed command line raises SystemExit(2) (argparse's
    behaviour, after one line on stderr); everything else returns its status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verb = getattr(args, "_verb", "kosmos2")
    if extra:  # named by the subcommand they were given to, not by the top-level parser
        parser.exit(EXIT_USAGE, f"{verb}: unrecognized arguments: {' '.join(extra)} (see `{verb} --help`)\n")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    debug = debug_enabled(args)
    try:
        with _one_line_warnings(verb):
            code = args.func(args)
        sys.stdout.flush()  # a pipe's buffer: its reader may have gone (`kosmos2 ground ... | head`)
        return int(code or 0)
    except BrokenPipeError:
        # the reader of our output has gone: stop quietly, as a shell tool would on SIGPIPE (128 + 13)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _report(verb, "interrupted", debug)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # a handler's `raise SystemExit(message)` or SystemExit(status)
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        _report(verb, str(e.code), debug)
        return 1
    except Exception as e:  # noqa: BLE001 - every error ends as one line; --debug shows where it came from
        code, message = classify(e)
        _report(verb, message, debug)
        return code


def debug_enabled(args: argparse.Namespace) -> bool:
    """--debug given, or KOSMOS2_DEBUG set (to anything but "" or "0")."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def classify(error: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) of an exception raised by a command."""
    from kosmos2.errors import UserError

    if isinstance(error, UserError):
        return error.exit_code, str(error)
    if isinstance(error, (ValueError, OSError, MemoryError)) or type(error).__name__ == "OutOfMemoryError":
        # the library's ValueError / OSError messages name the input and the fix (STYLE.md)
        text = str(error)
        if isinstance(error, OSError) and error.filename and error.strerror:
            text = f"{error.filename!r}: {error.strerror}"
        return 1, text or type(error).__name__
    return 1, (
        f"internal error: {type(error).__name__}: {error}; this is a bug: rerun with --debug (or "
        f"{DEBUG_ENV}=1) for the traceback and report it"
    )


def one_line(verb: str, message: str) -> str:
    """`kosmos2 <verb>: <message>` on one line (a message's own line breaks become spaces)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if text.startswith(verb + ":"):  # a handler that already named itself
        text = text[len(verb) + 1 :].lstrip()
    return f"{verb}: {text}"


def _report(verb: str, message: str, debug: bool) -> None:
    sys.stdout.flush()
    if debug:
        traceback.print_exc()
    print(one_line(verb, message), file=sys.stderr, flush=True)


@contextlib.contextmanager
def _one_line_warnings(verb: str) -> Iterator[None]:
    """Show each warning as `kosmos2 <verb>: warning: <message>` instead of Python's two-line format."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(one_line(verb, f"warning: {message}"), file=file or sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
