"""Read a safetensors file's header (names, dtypes, shapes, offsets) without loading any tensor."""

from __future__ import annotations

import json
from pathlib import Path


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}}; the optional __metadata__ entry is dropped."""
    return header_and_data_start(path)[0]


def header_and_data_start(path: Path) -> tuple[dict[str, dict], int]:
    """safetensors_header, and the file offset its data_offsets count from (8 bytes of length, then the header)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length
