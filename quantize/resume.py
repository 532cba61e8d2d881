"""Calibration that survives a kill (issue 39.3): ModelOpt's per-layer checkpoints, trusted only with kiln's digests.

ModelOpt 0.47 calibrates a decoder layer at a time when its algorithm config says `layerwise: {enable: true}`, and
with `checkpoint_dir` it saves each finished layer there (layer_NNNN/: the layer's quantizer state, its weights when
the algorithm rewrites them (AWQ, GPTQ, SmoothQuant) or only its quantizer buffers (max, mse, local_hessian), the
shape of its output, and the next layer's inputs) and commits it in manifest.json. Run again, it restores layers
0..k-1 from there and calibrates from layer k (modelopt/torch/quantization/utils/layerwise_calib.py). kiln captures
each layer's inputs from the unquantized layers before it, as the whole-model pass sees them, so the checkpoint that
comes out is the whole-model pass's, byte for byte (measured for every format on the test model; tests/test_resume.py).

ModelOpt trusts whatever its manifest names. kiln trusts a layer only once it has recorded the digests of its files
in kiln-resume.json (written atomically at each layer boundary, when ModelOpt next calls kiln's forward loop).
Before a resume every recorded file is hashed again: a missing or altered one discards the folder, and calibration
starts from layer 0, saying why. ModelOpt's manifest is then rewound to the last layer kiln recorded, so a layer
ModelOpt committed but kiln never recorded is calibrated again. The record also carries kiln's own counters at that
boundary (the MoE expert-token table), restored with the layers. Only the last recorded layer's captured inputs are
kept: ModelOpt resumes from those alone, and every layer's would take the calibration set's activations per layer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kiln.common.digest import file_sha256
from kiln.common.fsutil import atomic_write_text

RECORD = "kiln-resume.json"
RECORD_VERSION = 1
DAY0_RECORD = "kiln-day0.json"   # quantize/day0.py's: the plan's digest and each finished output shard's
MANIFEST = "manifest.json"          # ModelOpt's: {last_completed_layer, num_layers, save_every, calib_mutates_weights}
NEXT_INPUTS = "next_inputs.pt"      # ModelOpt's capture of the next layer's inputs, in each layer's folder
AMAX_ONLY = ("max", "mse", "local_hessian")   # ModelOpt's calibrations that change no weight (its whitelist)


def _layer_dir(folder: Path, index: int) -> Path:
    return folder / f"layer_{index:04d}"   # ModelOpt's naming (layerwise_calib._layer_dir)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Resumed:
    """Where a calibration picks up: the first layer still to calibrate, of how many, and kiln's counters then."""

    layer: int
    layers: int
    state: dict = field(default_factory=dict)
    unit: str = "layer"   # "shard": a day-0 build's finished output shards (quantize/day0.py)

    def __str__(self) -> str:
        if self.unit == "shard":
            return f"resumable: {self.layer} of {self.layers} shards written"
        return f"resumable from layer {self.layer} of {self.layers}"


def resume_point(folder: Path | None) -> Resumed | None:
    """What a killed calibration left in `folder`, as recorded (for `kiln plan`, which hashes nothing; the build
    verifies every digest before it trusts a layer)."""
    day0 = _read_json(Path(folder) / DAY0_RECORD) if folder is not None else None
    if day0 and day0.get("shards"):
        return Resumed(len(day0["shards"]), int(day0["total"]), unit="shard")
    record = _read_json(Path(folder) / RECORD) if folder is not None else None
    if not record or record.get("version") != RECORD_VERSION or not record.get("layers"):
        return None
    return Resumed(len(record["layers"]), int(record["num_layers"]), record.get("state") or {})


class LayerCheckpoints:
    """One calibration's checkpoint folder: ModelOpt's files and kiln's record of their digests."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._record: dict | None = None

    def layerwise(self, method: str | None) -> dict:
        """ModelOpt's `layerwise` algorithm entry that saves every layer here (a window of one layer), with each
        layer's inputs taken from the unquantized layers before it."""
        return {"enable": True, "get_qdq_activations_from_prev_layer": False, "checkpoint_dir": str(self.folder),
                "save_every": 1, "calib_mutates_weights": (method or "max") not in AMAX_ONLY}

    def start(self, log) -> Resumed | None:
        """Verify what a previous run left and rewind ModelOpt's manifest to it; None (and an empty folder) when
        there is nothing to trust. `log` hears why a folder was discarded."""
        record = _read_json(self.folder / RECORD)
        problem = self._problem(record) if record else None
        if record is None or problem:
            if problem:
                log(f"calibration checkpoints in {self.folder} are not trusted ({problem}); calibrating from layer 0")
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            self._record = None
            return None
        done = len(record["layers"])
        for stale in self.folder.glob("layer_*"):   # committed by ModelOpt after kiln's last record: done again
            if int(stale.name.split("_")[1]) >= done:
                shutil.rmtree(stale)
        atomic_write_text(self.folder / MANIFEST, json.dumps({**record["manifest"], "last_completed_layer": done - 1}))
        self._record = record
        return Resumed(done, int(record["num_layers"]), record.get("state") or {})

    def _problem(self, record: dict) -> str | None:
        if record.get("version") != RECORD_VERSION or not record.get("layers"):
            return f"{RECORD} is from another kiln or records no layer"
        last = len(record["layers"]) - 1
        expected = [(_layer_dir(self.folder, i) / name, digest)
                    for i, files in enumerate(record["layers"]) for name, digest in files.items()]
        expected.append((_layer_dir(self.folder, last) / NEXT_INPUTS, record["next_inputs"]))
        for path, digest in expected:
            if not path.is_file():
                return f"{path.relative_to(self.folder)} is missing"
            if file_sha256(path) != digest:
                return f"{path.relative_to(self.folder)} does not match its recorded digest"
        return None

    def boundary(self, state: dict) -> int:
        """At a layer boundary (ModelOpt calling kiln's forward loop): record the digests of the layers ModelOpt
        committed since the last record, with kiln's counters as they stand now, and drop the captured inputs no
        resume needs. Returns how many layers are recorded."""
        manifest = _read_json(self.folder / MANIFEST)
        recorded = len(self._record["layers"]) if self._record else 0
        if not manifest or manifest.get("last_completed_layer") is None:
            return recorded
        last = int(manifest["last_completed_layer"])
        next_inputs = _layer_dir(self.folder, last) / NEXT_INPUTS
        if last < recorded or not next_inputs.is_file():
            return recorded
        layers = list(self._record["layers"]) if self._record else []
        for index in range(recorded, last + 1):
            layers.append({path.name: file_sha256(path) for path in sorted(_layer_dir(self.folder, index).iterdir())
                           if path.name != NEXT_INPUTS})
        record = {"version": RECORD_VERSION, "num_layers": int(manifest["num_layers"]), "manifest": manifest,
                  "layers": layers, "next_inputs": file_sha256(next_inputs), "state": state}
        atomic_write_text(self.folder / RECORD, json.dumps(record, indent=1) + "\n")
        self._record = record
        for index in range(last):
            (_layer_dir(self.folder, index) / NEXT_INPUTS).unlink(missing_ok=True)
        return len(layers)
