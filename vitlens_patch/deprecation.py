"""Renamed keywords that keep working for one release, with a ``DeprecationWarning``.

Below every layer, so any public function can keep an old keyword without a parameter of that name
in its signature (``metric=`` is a faithfulness metric only: the logits score is ``score=``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

Function = TypeVar("Function", bound=Callable)


def renamed_keywords(**renames: str) -> Callable[[Function], Function]:
    """Decorator: each keyword ``old=`` in ``renames`` (``old="new"``) is passed on as ``new=``
    with a ``DeprecationWarning``; giving both raises ``TypeError`` as a repeated argument would.

    Example: ``@renamed_keywords(metric="score")`` keeps ``trace_layers(..., metric="prob")``
    working while the signature only has ``score``.
    """

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{function.__name__}() got both {new}= and its deprecated name {old}=")
                warnings.warn(
                    f"{function.__name__}({old}=...) is deprecated and will be removed in the next "
                    f"release: use {new}=",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate
