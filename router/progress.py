"""Progress bars for long offline work (replay's embedding and passes, predictor training).

Why a context instead of a parameter: the work that takes long sits several calls deep (a training loop
inside a replay pass), and only the command line knows whether anyone is watching. `llm-router replay`
opens a `showing()` block; inside it, `bar()` draws on stderr when stderr is a terminal. Everywhere else
(the service, the scheduled training job, tests, piped or captured output) `bar()` draws nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO, TypeVar

T = TypeVar("T")

_STREAM: ContextVar[TextIO | None] = ContextVar("llm_router_progress_stream", default=None)


@contextmanager
def showing(stream: TextIO | None = None) -> Iterator[bool]:
    """Draw the bars opened inside this block on `stream` (default: stderr), if it is a terminal; yields
    whether they are drawn."""
    stream = stream or sys.stderr
    token = _STREAM.set(stream if stream.isatty() else None)
    try:
        yield _STREAM.get() is not None
    finally:
        _STREAM.reset(token)


def _ignore(n: float = 1) -> None:
    """`update` of a bar nobody sees."""


@contextmanager
def bar(description: str, total: float | None = None, unit: str = "it") -> Iterator[Callable[[float], object]]:
    """A bar of `total` steps (None: a counter) that vanishes when done; yields its `update(n)`."""
    stream = _STREAM.get()
    if stream is None:
        yield _ignore
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit=unit, file=stream, leave=False, dynamic_ncols=True) as progress:
        yield progress.update


def ticking(items: Sequence[T], description: str, unit: str = "prompt") -> Iterator[T]:
    """`items` one by one, with a bar that moves a step per item (a replay pass over its stream)."""
    with bar(description, len(items), unit) as update:
        for item in items:
            yield item
            update(1)
