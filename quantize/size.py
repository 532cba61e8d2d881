"""How big an exported checkpoint is: its bytes, and the bits it spends per decoder weight.

Bits per weight counts what a format really costs in the decoder's linear layers: every stored tensor
of such a layer (packed codes, scales, zero points, activation scales) against the layer's weight count
in the source model. Embeddings and lm_head stay out: they are left unquantized by every format, and on
a small model they would hide the difference between formats. The unquantized 16-bit model is 16.0.
Only safetensors headers are read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.quantize.headers import safetensors_header


@dataclass(frozen=True)
class CheckpointSize:
    checkpoint_bytes: int          # every *.safetensors file of the exported checkpoint
    linear_weights: int            # weights of the decoder's linear layers in the source model
    bits_per_weight: float | None  # stored bits of those layers per weight; None when none was found

    def as_dict(self) -> dict:
        return asdict(self)


def _headers(folder: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        found.update(safetensors_header(path))
    return found


def _stored_bytes(info: dict) -> int:
    start, end = info["data_offsets"]
    return end - start


def decoder_linear_weights(source_dir: Path) -> dict[str, int]:
    """The weight count of each of the source model's decoder linear layers, by module name: what bits per
    weight is counted over."""
    linears = {}
    for name, info in _headers(source_dir).items():
        if ".layers." in name and name.endswith(".weight") and len(info["shape"]) == 2:
            linears[name[: -len(".weight")]] = info["shape"][0] * info["shape"][1]
    return linears


def checkpoint_size(hf_dir: Path, source_dir: Path) -> CheckpointSize:
    """The exported checkpoint in `hf_dir` measured against the source model in `source_dir`."""
    linears = decoder_linear_weights(source_dir)
    stored = sum(_stored_bytes(info) for name, info in _headers(hf_dir).items()
                 if name.rsplit(".", 1)[0] in linears)
    weights = sum(linears.values())
    total = sum(path.stat().st_size for path in Path(hf_dir).glob("*.safetensors"))
    return CheckpointSize(total, weights, round(stored * 8 / weights, 4) if weights and stored else None)
