"""Where the weights that calibration rewrites go under disk offload: files in the offload folder.

AWQ, GPTQ and SmoothQuant rewrite the weights they quantize (scaled columns, GPTQ's corrected weights), and
export rewrites some again (AWQ's pre-quant scales folded into the norms). On a disk-offloaded layer ModelOpt
0.47 writes the new tensor into the offload loader's `state_dict`, which is a plain dict in host memory (its
accelerate plugin warns "writing updates back to disk offload files is TODO"): every rewritten layer of a model
larger than memory would stay resident. kiln hands the loader a `state_dict` that keeps each tensor written to it
in a file of the offload folder instead. accelerate's loader gives `state_dict` priority over the source's
safetensors, so the next time the layer runs it reads the rewritten weights back from that file.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path

WRITEBACK_DIR = "written-back"


class WrittenBack(MutableMapping):
    """A tensor mapping that holds entries it is given at the start in memory and keeps every later write in a
    safetensors file under `folder` (read back whole, as accelerate's hook wants a tensor it can move)."""

    def __init__(self, folder: Path, resident: dict | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._resident = dict(resident or {})
        self._files: dict[str, Path] = {}
        self.bytes_written = 0

    def __setitem__(self, key: str, tensor) -> None:
        from safetensors.torch import save_file

        self._resident.pop(key, None)
        path = self._files.get(key) or self.folder / f"{len(self._files):07d}.safetensors"
        tensor = tensor.detach().contiguous().cpu()
        save_file({"tensor": tensor}, str(path))
        self._files[key] = path
        self.bytes_written += tensor.nbytes

    def __getitem__(self, key: str):
        from safetensors.torch import load_file

        if key in self._resident:
            return self._resident[key]
        return load_file(str(self._files[key]))["tensor"]

    def __delitem__(self, key: str) -> None:
        if key in self._resident:
            del self._resident[key]
        else:
            self._files.pop(key).unlink()

    def __contains__(self, key: object) -> bool:
        return key in self._resident or key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter([*self._resident, *self._files])

    def __len__(self) -> int:
        return len(self._resident) + len(self._files)


def write_back_to_disk(model, offload_folder: Path) -> list[WrittenBack]:
    """Give every accelerate offload loader of `model` a WrittenBack state dict under `offload_folder`; returns
    them (one per loader; accelerate shares one among all the offloaded modules), to count what was written."""
    loaders = {}
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        loader = getattr(weights_map, "dataset", None)
        if loader is not None and hasattr(loader, "state_dict") and hasattr(loader, "index"):
            loaders[id(loader)] = loader
    written = []
    for number, loader in enumerate(loaders.values()):
        if not isinstance(loader.state_dict, WrittenBack):
            loader.state_dict = WrittenBack(offload_folder / WRITEBACK_DIR / str(number), loader.state_dict)
        written.append(loader.state_dict)
    return written
