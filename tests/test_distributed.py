"""Calibration across processes (issue 41): `calibration.processes: 2` runs the quantize stage as two gloo ranks
under torchrun on this host. A max-calibrated format comes out byte for byte as one process makes it; AWQ within a
bound measured here; a rank that dies ends the build in one line, within seconds, with nothing cached."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kiln import quantize
from kiln.common.progress import SILENT
from tests.recipes import KILN, write_recipe

WINDOWS = torch.randint(0, 2048, (8, 64), generator=torch.Generator().manual_seed(0))


def _quantize(model: Path, out: Path, quant: str, kv: str, processes: int,
              windows=WINDOWS) -> quantize.CheckpointRecord:
    request = quantize.QuantizeRequest(quant=quantize.QuantFormat(quant), kv_cache=quantize.KVCacheFormat(kv),
                                       group_size=None, dtype="bfloat16", tp_size=1, processes=processes)
    out.mkdir(parents=True)
    return quantize.run(request, model, windows, out, SILENT)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_two_ranks_make_the_one_process_fp8_checkpoint_byte_for_byte(tmp_path, test_model):
    one = _quantize(test_model, tmp_path / "one", "fp8", "fp8", 1, WINDOWS[:4, :32])
    two = _quantize(test_model, tmp_path / "two", "fp8", "fp8", 2, WINDOWS[:4, :32])
    assert one.distributed is None
    assert two.distributed == {"processes": 2, "backend": "gloo", "samples_per_rank": [2, 2]}
    assert two.calibration_samples == 4   # every window, though each rank saw half
    for part in (quantize.HF_DIR, quantize.TRTLLM_DIR):
        assert _digests(tmp_path / "two" / part) == _digests(tmp_path / "one" / part) != {}


@pytest.mark.slow
def test_awq_on_two_ranks_stays_within_the_measured_bound(tmp_path, test_model):
    """AWQ-lite searches its scales on each rank's own windows (ModelOpt averages only the activation statistics),
    so rank 0's choice may differ from one process's: the fewer windows a rank has, the more. Measured on the test
    model with 4 windows of 64 tokens a rank: scales within 2 %, at most 3.2 % of any layer's packed weight bytes
    differ (with 2 windows of 32: 10 % and 21 %); the bound asserted is 2.5x the former."""
    from safetensors.torch import load_file

    _quantize(test_model, tmp_path / "one", "int4_awq", "none", 1)
    _quantize(test_model, tmp_path / "two", "int4_awq", "none", 2)
    one = load_file(tmp_path / "one" / quantize.HF_DIR / "model.safetensors")
    two = load_file(tmp_path / "two" / quantize.HF_DIR / "model.safetensors")
    assert one.keys() == two.keys()
    scales = [((one[k].float() - two[k].float()).abs().max() / one[k].float().abs().max()).item()
              for k in one if k.endswith("weight_scale")]
    packed = [(one[k] != two[k]).float().mean().item() for k in one if one[k].dtype == torch.uint8]
    assert scales and packed
    assert max(scales) < 0.05 and max(packed) < 0.10, (max(scales), max(packed))


def _rank_process(rank: int) -> int | None:
    """The pid of a live calibration rank (torchrun sets RANK in its workers' environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kiln.quantize.distributed" in command and f"RANK={rank}".encode() in environ \
                and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_build_in_one_line_and_caches_nothing(tmp_path, test_model):
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}},
                          calibration={"builtin": "python-docs-train", "samples": 64, "seq_len": 256, "processes": 2})
    home = tmp_path / "home"
    env = {**os.environ, "KILN_HOME": str(home), "KILN_PROGRESS_INTERVAL_S": "0.2"}
    build = subprocess.Popen([str(KILN), "build", str(recipe)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    lines = []
    for line in build.stderr:
        lines.append(line.rstrip())
        # rank 0 has calibrated a window: both ranks are inside ModelOpt's calibration, between collectives
        if killed_at is None and "on 2 processes" in line and " 0/" not in line and "started" not in line:
            pid = _rank_process(1)
            assert pid is not None, "rank 1 is not running while rank 0 calibrates"
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
    build.wait(timeout=120)
    assert killed_at is not None, "\n".join(lines[-20:])
    assert time.monotonic() - killed_at < 30
    assert build.returncode == 1
    assert lines[-1].startswith("kiln: fp8: calibration across 2 processes failed: rank 1 of 2 ended (killed by "
                                "SIGKILL); nothing was cached"), lines[-5:]
    assert not list((home / "cache").rglob("kiln.json"))
    assert _rank_process(0) is None and _rank_process(1) is None   # no rank outlives the build


@pytest.mark.parametrize("calibration, variant, message", [
    ({"processes": 3, "samples": 2}, {"quant": "fp8"}, "processes: 3 with samples: 2: each rank needs at least one "
     "sample (fix: processes: 1, or fewer processes than samples, offload: none and resumable: auto)"),
    ({"processes": 2, "offload": "disk"}, {"quant": "fp8"}, "offload: disk is for one process (each rank holds the "
     "model)"),
    ({"processes": 2, "resumable": True}, {"quant": "int4_awq"}, "resumable calibration saves layers from one process"),
    ({"processes": 2}, {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": 6}},
     "variants.v: quant auto's size search calibrates in one process, not across calibration.processes: 2 (fix: "
     "processes: 1, or a ModelOpt format)"),
    ({"processes": 2}, {"quant": "int4_awq", "backend": "llmcompressor"}, "variants.v: backend llmcompressor "
     "calibrates in one process"),
    ({"processes": 0}, {"quant": "fp8"}, "calibration.processes"),
])
def test_recipes_ranks_cannot_calibrate_are_refused_in_one_line(tmp_path, calibration, variant, message):
    import yaml

    from kiln.common.errors import RecipeErrors
    from kiln.pipeline.recipe.loader import load_recipe

    recipe = write_recipe(tmp_path, "/nonexistent/model", {"v": variant})
    text = yaml.safe_load(recipe.read_text())
    text["calibration"].update(calibration)
    recipe.write_text(yaml.safe_dump(text))
    with pytest.raises(RecipeErrors) as refused:
        load_recipe(recipe)
    assert len(refused.value.problems) == 1 and message in refused.value.problems[0], refused.value.problems
