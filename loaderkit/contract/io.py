"""Small, checked file readers shared by the pipeline and format plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse a JSON file, raising :class:`CorruptCheckpointError` that names it on failure."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{what} {path} is not valid UTF-8 JSON: {exc}", path=path) from exc
    except RecursionError:
        raise CorruptCheckpointError(f"{what} {path} nests JSON too deeply to be a real file", path=path) from None
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {what} {path}: {exc}", path=path) from exc
