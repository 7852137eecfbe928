"""The base of trainkit's own errors: what the CLI reports as one line, exit status 2.

Why a ground-floor module: every capability raises errors for bad input (a malformed
file, a bad value), and the CLI root must tell them from programming errors without
importing every capability. An error that is a :class:`TrainkitError` means "the input
is wrong, the message says which and why"; anything else is a bug and keeps its
traceback. Code that parses a file catches the parser's own exceptions (``KeyError``,
``struct.error``, ``RecursionError``...) at that boundary and re-raises an
:class:`InputError` naming the file.
"""

from __future__ import annotations

__all__ = ["TrainkitError", "InputError"]


class TrainkitError(Exception):
    """An error whose message is the whole story for the user (no traceback needed)."""


class InputError(TrainkitError, ValueError):
    """A file or value given to trainkit is malformed or refused; the message names it."""
