"""An exported checkpoint's tensors as the reference runtime reads them: every tensor as stored, and which of
them the decoded layers took, so that what is left loads as the model's plain parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn


class CheckpointTensors:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self._taken: set[str] = set()

    @classmethod
    def read(cls, hf_dir: Path, where: Callable[[str], bool] | None = None) -> "CheckpointTensors":
        """The checkpoint's tensors, sharded or not, as stored (no dtype conversion): every one, or those whose
        name `where` accepts (only their bytes are read: one decoder layer of a model larger than memory)."""
        from safetensors import safe_open

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors in the checkpoint")
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                tensors.update((k, f.get_tensor(k)) for k in f.keys() if where is None or where(k))
        return cls(tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def take(self, *names: str) -> None:
        """These tensors are used by a decoded layer: not the model's plain parameters."""
        self._taken.update(names)

    def take_layer(self, prefix: str, keep: tuple[str, ...] = ()) -> None:
        """Every tensor of the layer `prefix`, except names ending in `keep` (K/V scales its attention reads)."""
        self._taken.update(k for k in self.tensors if k.startswith(f"{prefix}.") and not k.endswith(keep))

    def rename(self, renames: dict[str, str]) -> None:
        """The export's names to the architecture's, for tensors no decoded layer took."""
        for old, new in renames.items():
            if old not in self._taken:
                self.tensors[new] = self.tensors.pop(old)

    def untaken(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k not in self._taken}


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
