"""Errors that are the user's to fix, as opposed to bugs.

`kosmos2 <verb>` prints a `UserError` (and the library's `ValueError` / `OSError` messages, which name the
input, what is wrong and what to do) as one line, `kosmos2 <verb>: <message>`, and exits with its
`exit_code`: 2 for a malformed command line (`UsageError`), 1 for a bad input or a runtime failure. Any other
exception is a bug: one line that says so, and the traceback with `--debug` or `KOSMOS2_DEBUG=1`.

Python callers catch them as usual: the concrete errors (`ImageError`, `PromptError`,
`UnsupportedTaskError`) are also `ValueError`s.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave cannot be used; the message says which input, what is wrong, what to do."""

    exit_code = 1


class UsageError(UserError):
    """A command-line argument is malformed or contradicts another (exit status 2, as argparse uses)."""

    exit_code = 2


class PromptError(UserError, ValueError):
    """A prompt's markup does not fit the model's vocabulary or grid (unknown tag, unclosed phrase, ...)."""


class UnsupportedTaskError(UserError, ValueError):
    """The model states the tasks it was trained for, and the one asked for is not among them."""
