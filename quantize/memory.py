"""The quantize stage's peak memory, from config.json alone (kiln.common.memory.ModelShape), fitted to
bench/scale.py's peaks (0.17B-1.07B Llama, FP8): the source weights in the recipe's dtype and one calibration
window's activations; then ModelOpt's exports, which hold the quantized state dict (linear layers at the format's
bits, the rest at 16) and its serialised copy beside the model: weights + 2 x exported. Under
`calibration.offload: disk`, one decoder layer read from disk at a time, and what the format's algorithm keeps
beside it (GPTQ's Hessians, AWQ's rewritten layer)."""

from __future__ import annotations

from kiln.common.memory import GB, RUNTIME_BYTES, DiskOffload, ModelShape, OffloadedWeights, StageMemory, on_gpus_first
from kiln.quantize.formats import FORMATS


def exported_bytes(shape: ModelShape, formats) -> int:
    """The largest exported checkpoint of `formats`: linear layers at the format's bits, the rest at 16."""
    return max(int(shape.linear_params * FORMATS[f].weight_bits / 8 + shape.other_params * 2) for f in formats)


def min_weight_bits(formats) -> float:
    return min(FORMATS[f].weight_bits for f in formats)


def offload_folder_writes(formats, offload: DiskOffload) -> list[str]:
    """What disk offload writes to its folder besides reading: converted weights, layers calibration rewrites."""
    rewrites = any(FORMATS[f].rewrites_weights for f in formats)
    return [what for what, written in (("converted weights", offload.writes_folder),
                                       ("the layers calibration rewrites", rewrites)) if written]


def peak_memory(shape: ModelShape, dtype_bytes: int, formats, calibration_tokens: int, gpu_caps: tuple[int, ...] = (),
                offload: DiskOffload | None = None) -> tuple[StageMemory, StageMemory]:
    """(calibrate, export): each step's peak host and GPU memory for `formats` (QuantFormat), a calibration batch of
    `calibration_tokens` per step (seq_len x batch_size) and GPUs of `gpu_caps` usable bytes (empty on the CPU)."""
    calib_work = calibration_tokens * (4 * shape.max_hidden * 4 + shape.vocab * dtype_bytes)
    if offload is not None:
        return _offloaded(shape, dtype_bytes, formats, calib_work, gpu_caps, offload)
    weights = shape.params * dtype_bytes
    exported = exported_bytes(shape, formats)
    host, gpu = on_gpus_first(weights + calib_work, 0, gpu_caps)
    calibrate = StageMemory("quantize (calibrate)", host, gpu,
                            f"{weights / GB:.2f} GB of weights + {calib_work / GB:.2f} GB of activations")
    host, gpu = on_gpus_first(weights, 2 * exported, gpu_caps)
    export = StageMemory("quantize (export)", host, gpu,
                         f"{weights / GB:.2f} GB of weights + 2 x {exported / GB:.2f} GB exported state")
    return calibrate, export


def _offloaded(shape: ModelShape, dtype_bytes: int, formats, calib_work: int, gpu_caps: tuple[int, ...],
               offload: DiskOffload) -> tuple[StageMemory, StageMemory]:
    placed = OffloadedWeights.of(shape, dtype_bytes, gpu_caps, offload)
    exported_layer = exported_bytes(shape, formats) // max(shape.layers, 1)
    shard = min(offload.shard_bytes, exported_layer * shape.layers)
    layer_state, state = 0, ""
    if any(FORMATS[f].layer_by_layer_under_offload for f in formats):
        # GPTQ a layer at a time: the layer's Hessians (in_features^2 float32 per linear: six read the hidden
        # state, one the MLP's) and every calibration window's inputs to the layer and outputs from it.
        hessians = 4 * (6 * shape.hidden ** 2 + shape.max_hidden ** 2)
        layer_state = hessians + 2 * offload.calibration_tokens * shape.hidden * dtype_bytes
        state = f" + {layer_state / GB:.2f} GB of one layer's GPTQ Hessians and inputs"
    # A rewritten layer is read back from its written-back files (anonymous memory, its bytes) and rewritten in a
    # float32 working copy (twice them), while calibrating and again while folding and exporting. Fitted: INT4-AWQ
    # on the 1.07B Llama measured 0.87 / 1.22 GB of anonymous memory calibrating / exporting, against 0.73 /
    # 1.03 GB estimated without this term.
    rewrite = 3 * placed.layer if any(FORMATS[f].rewrites_weights for f in formats) else 0
    rewritten = f" + {rewrite / GB:.2f} GB of the layer being rewritten" if rewrite else ""
    resident = RUNTIME_BYTES + placed.resident + placed.layer
    return (
        StageMemory("quantize (calibrate)", resident + calib_work + layer_state + rewrite, placed.on_gpus,
                    f"{placed.kept} + one {placed.layer / GB:.3f} GB layer{placed.disk} + {calib_work / GB:.2f} GB of "
                    f"activations{state}{rewritten}", placed.on_disk),
        StageMemory("quantize (export)", resident + 2 * exported_layer + shard + rewrite, placed.on_gpus,
                    f"{placed.kept} + one layer exported + a {shard / GB:.2f} GB shard buffer{placed.disk}{rewritten}",
                    placed.on_disk),
    )
