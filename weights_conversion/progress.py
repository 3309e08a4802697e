"""Progress bars for the long parts of a conversion (reading and writing weights), off unless turned on.

A caller turns them on around a block with `shown`; the readers and writers report through `bar`, which is a
no-op when the bars are off, so library code stays quiet unless its user asked for output.

Example:

    >>> from weights_conversion import progress
    >>> with progress.shown(False), progress.bar("reading", total=3) as advance:
    ...     for _ in range(3):
    ...         advance(1)
"""

import contextlib
import contextvars
import sys

_SHOWN = contextvars.ContextVar("weights_conversion_progress_shown", default=False)


@contextlib.contextmanager
def shown(enabled=True):
    """Shows (or hides) the conversion's progress bars inside the block, on stderr."""
    token = _SHOWN.set(bool(enabled))
    try:
        yield
    finally:
        _SHOWN.reset(token)


@contextlib.contextmanager
def bar(description, total, unit="B"):
    """Yields ``advance(n)``; a tqdm bar of ``total`` units (bytes by default) when bars are shown."""
    if not _SHOWN.get():
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
              file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as progress_bar:
        yield progress_bar.update
