"""The one reader of loaderkit's boolean environment variables."""

from __future__ import annotations

import os

from ..errors import UsageError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool | None = False) -> bool | None:
    """The boolean value of environment variable ``name``.

    ``1/true/yes/on`` are true and ``0/false/no/off`` false, in any case; unset or empty gives
    ``default``. Anything else is a :class:`loaderkit.errors.UsageError` naming the variable,
    so a typo never silently means the opposite.
    """
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise UsageError(
        f"environment variable {name}={os.environ.get(name)!r} is not a boolean; "
        f"use one of {', '.join(TRUE)} or {', '.join(FALSE)}"
    )
