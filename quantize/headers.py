"""Read a safetensors file's header (names, dtypes, shapes, offsets) without loading any tensor."""

from __future__ import annotations

import json
from pathlib import Path


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}}; the optional __metadata__ entry is dropped."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    return header
