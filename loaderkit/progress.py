"""Progress bars for long loads and conversions, counting bytes.

A bar is shown on standard error by tqdm when all of these hold:

* the caller did not pass ``progress=False``;
* ``LOADERKIT_PROGRESS`` is not ``0`` (``false``, ``no``, ``off``);
* standard error is a terminal — or ``progress=True`` / ``LOADERKIT_PROGRESS=1`` forces it;
* tqdm is installed.

Loads pass a ``delay``, so a load that finishes within it shows nothing at all.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from .contract.env import env_flag

#: the environment variable that turns bars off (``0``) or forces them on (``1``).
PROGRESS_ENV = "LOADERKIT_PROGRESS"

Update = Callable[[int], object]


def enabled(progress: bool | None = None) -> bool:
    """Whether a bar should be shown: ``progress`` (``None``: decide), the environment, the TTY.

    ``LOADERKIT_PROGRESS=0`` always wins; ``progress=True`` or ``LOADERKIT_PROGRESS=1`` shows a
    bar even when standard error is not a terminal; otherwise a bar needs a terminal.
    """
    env = env_flag(PROGRESS_ENV, None)
    if progress is False or env is False:
        return False
    if progress is True or env is True:
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextlib.contextmanager
def progress_bar(
    total: int, desc: str, *, progress: bool | None = None, delay: float = 0.0
) -> Iterator[Update | None]:
    """A byte-counting bar as a context manager that yields its ``update(nbytes)`` callable.

    Yields ``None`` when no bar is shown (see :func:`enabled`), so callers pass the result on as
    an optional callback. The bar is cleared when the block ends.

    :param total: bytes expected.
    :param desc: the label, e.g. ``"converting model.safetensors"``.
    :param delay: seconds before the bar first appears (tqdm's ``delay``).
    """
    if total <= 0 or not enabled(progress):
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; without it loaderkit still works, silently
        yield None
        return
    bar = tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        delay=delay,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        yield bar.update
    finally:
        bar.close()
