"""Refuse a source model whose weights are not finite, before anything is calibrated.

A NaN or infinity in a source tensor poisons calibration's amax, every metric of every variant and the
baseline itself; on 9edec45 it surfaced as a ValueError that blamed the architecture. Each floating
tensor of the source's safetensors shards is read once, a slice of rows at a time (memory stays bounded
by CHUNK_BYTES whatever the tensor), and the first tensor that holds a non-finite value is named.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.quantize.headers import safetensors_header

CHUNK_BYTES = 64 << 20
_FLOATING = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def refuse_nonfinite_weights(model_dir: Path) -> None:
    """UserInputError naming the file and tensor when a source weight is NaN or infinite."""
    shards = tuple(sorted(Path(model_dir).glob("*.safetensors")))
    found = _first_nonfinite(shards, tuple(p.stat().st_mtime_ns for p in shards))
    if found is not None:
        raise _nonfinite(*found)


def refuse_nonfinite_tensor(path: Path, name: str, tensor) -> None:
    """The same refusal for one tensor already read (the day-0 path checks each as its worker reads it). Its minimum
    and maximum say it in one pass without a mask (NaN propagates, an infinity is an extreme): 45x faster than
    isfinite().all() on a 25M-element bf16 weight here."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor.reshape(-1))
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise _nonfinite(path, name, int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()))


def _nonfinite(path: Path, name: str, nans: int, infs: int) -> UserInputError:
    return UserInputError(f"{path}: tensor {name} holds {nans} NaN and {infs} infinite value(s); kiln will not "
                          "calibrate or measure a model whose weights are not finite (fix: repair or fetch the "
                          "checkpoint again)")


@functools.lru_cache(maxsize=4)   # once per source and process, however many variants it quantizes
def _first_nonfinite(shards: tuple[Path, ...], _mtimes: tuple[int, ...]) -> tuple[Path, str, int, int] | None:
    import torch
    from safetensors import safe_open

    for path in shards:
        header = safetensors_header(path)
        with safe_open(str(path), framework="pt") as handle:
            for name, info in header.items():
                width = _FLOATING.get(info["dtype"])
                if width is None:
                    continue
                shape = info["shape"]
                row_bytes = width * math.prod(shape[1:])
                step = max(1, CHUNK_BYTES // row_bytes)
                rows = shape[0] if shape else 1
                sliced = handle.get_slice(name)
                nans = infs = 0
                for start in range(0, rows, step):
                    part = sliced[start:start + step] if shape else handle.get_tensor(name)
                    if not bool(torch.isfinite(part).all()):
                        nans += int(torch.isnan(part).sum())
                        infs += int(torch.isinf(part).sum())
                if nans or infs:
                    return path, name, nans, infs
    return None
