"""safetensors files read and written a tensor at a time, at offsets their headers fix.

Reading: each tensor is read with pread into memory it owns (not memory-mapped), so a process's resident memory is
the tensors it holds, whatever the size of the files it reads.
Writing: the file is laid out before any tensor is computed, then filled a tensor at a time at fixed offsets.

The layout is the safetensors library's own (measured on 0.8: tensors sorted by dtype, widest first, then by
name; the JSON header in that order, padded with spaces to 8 bytes), so a file filled this way has the bytes
`safetensors.torch.save_file` would write for the same tensors, and any worker may write any tensor whenever it
is ready: host memory holds the tensors being computed, never a shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from kiln.quantize.headers import header_and_data_start

# safetensors' Dtype enum in declaration order: the library lays tensors out by this, descending.
DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
               "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
TORCH_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
                "float8_e8m0fnu": "F8_E8M0", "int16": "I16", "float16": "F16", "bfloat16": "BF16", "int32": "I32",
                "float32": "F32", "float64": "F64", "int64": "I64"}


def safetensors_dtype(dtype) -> str:
    """The safetensors name of a torch dtype."""
    return TORCH_DTYPES[str(dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file is, from the file's header alone."""

    path: Path
    dtype: str          # safetensors' name
    shape: tuple[int, ...]
    start: int          # absolute file offset
    nbytes: int

    def read(self, fd: int | None = None):
        """The tensor, read into memory of its own (`fd`: the file, already open for reading)."""
        import torch

        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        handle = os.open(self.path, os.O_RDONLY) if fd is None else fd
        try:
            while done < self.nbytes:
                got = os.preadv(handle, [view[done:]], self.start + done)
                if got == 0:
                    raise OSError(f"{self.path}: ends before tensor bytes {self.start}-{self.start + self.nbytes}")
                done += got
        finally:
            if fd is None:
                os.close(handle)
        dtype = getattr(torch, next(name for name, short in TORCH_DTYPES.items() if short == self.dtype))
        return buffer.view(dtype).reshape(self.shape)


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, from its header."""
    header, start = header_and_data_start(path)
    return {name: StoredTensor(Path(path), entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                               entry["data_offsets"][1] - entry["data_offsets"][0]) for name, entry in header.items()}


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes go in its file."""

    name: str
    dtype: str          # safetensors' name (BF16, F8_E4M3, ...)
    shape: tuple[int, ...]
    start: int          # absolute file offset
    nbytes: int


@dataclass(frozen=True)
class ShardLayout:
    """One safetensors file: its header bytes and each tensor's slot."""

    file: str
    header: bytes       # the 8-byte length and the padded JSON header
    slots: dict[str, Slot]

    @property
    def size(self) -> int:
        return len(self.header) + sum(slot.nbytes for slot in self.slots.values())

    @classmethod
    def of(cls, file: str, tensors: list[tuple[str, str, tuple[int, ...], int]],
           metadata: dict[str, str] | None = None) -> "ShardLayout":
        """The layout of `tensors` ((name, safetensors dtype, shape, bytes) each) as safetensors would write them."""
        ordered = sorted(tensors, key=lambda t: (-DTYPE_ORDER.index(t[1]), t[0]))
        entries, offsets, at = {}, [], 0
        if metadata is not None:
            entries["__metadata__"] = metadata
        for name, dtype, shape, nbytes in ordered:
            entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
            offsets.append((name, dtype, tuple(shape), at, nbytes))
            at += nbytes
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        header = struct.pack("<Q", len(text)) + text
        slots = {name: Slot(name, dtype, shape, len(header) + start, nbytes)
                 for name, dtype, shape, start, nbytes in offsets}
        return cls(file, header, slots)

    def create(self, folder: Path) -> Path:
        """The file at its full size with its header written (the tensors' bytes still zero). Its blocks are allocated
        first: writes into a sparse file's holes ran 30x slower here (3.6 GB in 28 s against 0.6 s, ext4)."""
        path = Path(folder) / self.file
        with open(path, "wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, self.size)
            except OSError:   # a filesystem without fallocate: a sparse file, slower to fill
                handle.truncate(self.size)
            handle.write(self.header)
        return path
