"""One family for errors the user can fix, so that callers tell bad input from bugs.

A :class:`UserInputError` means the input is wrong, not the code: a file, folder, option or value
that the message names, with what it should be and how to fix it. Every such error of the house
derives from it (weights and checkpoint files, ground truths, CSVs and split files, run folders,
options, ...). It subclasses ``ValueError``, so ``except ValueError`` keeps catching them.

Command-line entry points print one line for an error :func:`is_user_error` accepts and let
anything else raise with its traceback: a bug must not look like bad input. This module imports
only the standard library, so every layer of the house (the pure retrieval core included) can use it.
"""
from __future__ import annotations

import re

__all__ = ["OptionError", "UserInputError", "USER_ERRORS", "is_user_error", "one_line", "reported_error",
           "user_error_line"]


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
    """``exc``'s message on one line: each line break, with the indentation around it, made one space
    (other spaces are kept: a path such as ``"Tour Eiffel  at night"`` is printed as it is); the
    exception's class name when the message is empty."""
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip() or type(exc).__name__


#: Top-level packages and scripts of this house: an error class defined there words its own message.
HOUSE_MODULES = frozenset({"sg_train", "callbacks", "datamodules", "train", "evaluate", "__main__"})


def reported_error(exc: BaseException) -> BaseException:
    """The error of ``exc``'s ``__cause__`` chain whose message the user reads: the outermost one that
    is bad input (:data:`USER_ERRORS`) or defined in this house (a wrapper such as
    ``RetrievalEvaluationError`` adds the resume command). A library's wrapper is passed over: e.g.
    jsonargparse's "Does not validate against any of the Union subtypes ... Given value:
    Namespace(<every option>)" around the :class:`OptionError` a constructor raised."""
    current = exc
    while (current.__cause__ is not None and not isinstance(current, USER_ERRORS)
           and type(current).__module__.partition(".")[0] not in HOUSE_MODULES):
        current = current.__cause__
    return current


def user_error_line(exc: BaseException) -> str:
    """For a command line's ``except Exception as exc``: :func:`one_line` of :func:`reported_error`
    when ``exc`` is bad input (:func:`is_user_error`); anything else is re-raised, so a bug keeps its
    traceback and never looks like bad input."""
    if not is_user_error(exc):
        raise exc
    return one_line(reported_error(exc))
