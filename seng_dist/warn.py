"""Warnings that point at the user's line, however deep inside SENG they are raised."""

from __future__ import annotations

import inspect
import os
import warnings

import torch

_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


class SENGWarning(UserWarning):
    """Every warning SENG gives: filter them by category
    (``warnings.filterwarnings("ignore", category=seng_dist.SENGWarning)``)."""


class SENGDeprecationWarning(SENGWarning, FutureWarning):
    """A deprecated name was used (it still works). A ``FutureWarning``, the category Python
    gives deprecations meant for a library's users: a ``DeprecationWarning`` is hidden by
    Python's default filters unless the call is in ``__main__``, so a training loop in a
    module of its own would never show it."""


def warn(message: str, category: type[SENGWarning] = SENGWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside
    seng_dist and torch (e.g. the user's ``opt.step()`` or ``SENG(...)`` line)."""
    level = 2  # the caller of this function
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
