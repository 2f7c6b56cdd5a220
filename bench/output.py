"""What every benchmark command does with its result: print the table, write the JSON."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional


def stamp() -> dict[str, str]:
    """When and where a result was measured (UTC minute; architecture, CPUs, Python)."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
    }


def write_json(path: str, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def emit(result: dict[str, Any], text: str, json_path: Optional[str]) -> int:
    """Prints ``text`` (the result's table), writes ``result`` to ``json_path`` if given; exit 0."""
    print(text)
    if json_path:
        write_json(json_path, result)
    return 0
