"""One family for errors the user can fix, so that callers tell bad input from bugs.

A :class:`UserInputError` means the input is wrong, not the code: a file, folder, option or value
that the message names, with what it should be and how to fix it. Every such error of the house
derives from it (weights and checkpoint files, ground truths, CSVs and split files, run folders,
options, ...). It subclasses ``ValueError``, so ``except ValueError`` keeps catching them.

Command-line entry points print one line for an error :func:`is_user_error` accepts and let
anything else raise with its traceback: a bug must not look like bad input. This module imports
nothing, so every layer of the house (the pure retrieval core included) can use it.
"""
from __future__ import annotations

__all__ = ["OptionError", "UserInputError", "USER_ERRORS", "is_user_error", "one_line", "user_error_line"]


class UserInputError(ValueError):
    """Input the user can fix; the message names the file, key or value and the fix."""


class OptionError(UserInputError):
    """A configuration value (a constructor argument, a YAML option, a command-line flag) that is
    unknown, of the wrong type or out of range."""


#: What a command-line entry point reports in one line: the user-input family, and a path that is
#: missing or not accessible (every path a run touches comes from its configuration, and the
#: message names it: the fix is the path, not the code).
USER_ERRORS: tuple[type[BaseException], ...] = (UserInputError, FileNotFoundError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was explicitly raised ``from`` (its ``__cause__`` chain), is
    one of :data:`USER_ERRORS`.

    The chain covers wrappers that add where it happened (``raise RetrievalEvaluationError(...)
    from exc``); an error merely raised while handling another (``__context__``) is not followed.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, USER_ERRORS):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def one_line(exc: BaseException) -> str:
    """``exc``'s message with every run of whitespace (newlines included) made one space; the
    exception's class name when the message is empty."""
    return " ".join(str(exc).split()) or type(exc).__name__


def user_error_line(exc: BaseException) -> str:
    """For a command line's ``except Exception as exc``: :func:`one_line` of ``exc`` when it is bad
    input (:func:`is_user_error`); anything else is re-raised, so a bug keeps its traceback and never
    looks like bad input."""
    if not is_user_error(exc):
        raise exc
    return one_line(exc)
