"""Backend llmcompressor: llm-compressor's oneshot makes a compressed-tensors checkpoint (hf/, no trtllm/).

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, which kiln's environment
cannot hold, so oneshot runs in its own interpreter (KILN_LLMCOMPRESSOR_PYTHON, or kiln's own when
llm-compressor imports there) through `llmcompressor_worker`. The stage's inputs and outputs are
those of the ModelOpt backend: token samples in, hf/ + kiln.json out, the same cache, gates and
registry after it.
"""

from __future__ import annotations

import json
import tempfile
import time
from fnmatch import translate
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.foreign_python import LLMCOMPRESSOR_PYTHON_ENV, env_for, run_logged, tool_python
from kiln.common.versions import ABSENT, installed_versions
from kiln.quantize import distributed
from kiln.quantize.checkpoint import HF_DIR, CheckpointRecord, QuantizeRequest, save_tokenizer
from kiln.quantize.families import Family
from kiln.quantize.formats import FORMATS, Backend
from kiln.quantize.llmcompressor_worker import TOOLS, OneshotJob
from kiln.quantize.placement import Placement

MAKE_ENV = "make llmcompressor-env"   # builds build/llmcompressor-env with the pinned llm-compressor


def llmcompressor_python() -> str:
    """The interpreter that runs oneshot; refused, with the fix, when llm-compressor is not in it."""
    python = tool_python(LLMCOMPRESSOR_PYTHON_ENV)
    if installed_versions(("llmcompressor",), python)["llmcompressor"] == ABSENT:
        raise UserInputError(f"backend llmcompressor needs llm-compressor, which {python} does not have (fix: set "
                             f"{LLMCOMPRESSOR_PYTHON_ENV} to a Python with llmcompressor==0.14.0.1; `{MAKE_ENV}` "
                             "builds one under build/)")
    return python


def tool_versions() -> dict[str, str]:
    """What the stage's cache key records: the versions in the interpreter that runs oneshot."""
    return installed_versions(TOOLS, tool_python(LLMCOMPRESSOR_PYTHON_ENV))


def ignored_modules(exclude: tuple[str, ...]) -> tuple[str, ...]:
    """lm_head (kept in 16 bits by both backends) and the recipe's fnmatch patterns as compressed-tensors regexes."""
    return ("lm_head", *(f"re:{translate(pattern)}" for pattern in exclude))


def require() -> None:
    llmcompressor_python()


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress, placement: Placement,
        on_loaded, family: Family, source_config: dict, resume_dir: Path | None = None) -> CheckpointRecord | None:
    """oneshot in llm-compressor's interpreter; `on_loaded` and `resume_dir` are ModelOpt's (that interpreter loads
    the model itself, so the baseline is computed by validate from its own load, and its calibration is not
    resumable). With `request.ranks` > 1, its ranks under torchrun (quantize/distributed.launch; `placement` says
    whether they are GPUs); None on a node other than 0."""
    from safetensors.torch import save_file

    spec = FORMATS[request.quant]
    mapping = spec.llmcompressor
    python = llmcompressor_python()
    label = f"{request.quant.value} (llm-compressor {'+'.join(mapping.modifiers)} {mapping.scheme})"
    with tempfile.TemporaryDirectory(prefix="kiln-oneshot-") as scratch:
        scratch = Path(scratch)
        save_file({"input_ids": calibration.contiguous()}, scratch / "calibration.safetensors")
        job = OneshotJob(model_dir=str(model_dir), calibration=str(scratch / "calibration.safetensors"),
                         out_dir=str(out_dir / HF_DIR), modifiers=mapping.modifiers, scheme=mapping.scheme,
                         ignore=ignored_modules(request.exclude), dtype=request.dtype,
                         smoothing_strength=request.alpha, max_shard_size=request.max_shard_size,
                         trust_remote_code=request.trust_remote_code)
        job.write(scratch / "job.json")
        started = time.monotonic()
        worker = ["kiln.quantize.llmcompressor_worker", str(scratch / "job.json")]
        if request.ranks > 1:   # llm-compressor's own data-parallel oneshot, a rank a process
            if not distributed.launch(request, python, worker, env_for(python), progress, placement):
                return None   # a node other than 0: it calibrated its share, node 0 writes
        else:
            with progress.task(f"calibrate and export {label}", total=None):
                run_logged([python, "-m", *worker], python, scratch / "llmcompressor.log",
                           f"llm-compressor for {request.quant.value}")
        result = json.loads((scratch / "result.json").read_text())
    save_tokenizer(model_dir, out_dir / HF_DIR, request.trust_remote_code)
    (out_dir / HF_DIR / "recipe.yaml").unlink(missing_ok=True)  # llm-compressor's own; kiln.json says what ran
    record = CheckpointRecord(
        quant=request.quant.value, kv_cache=request.kv_cache.value, algorithm="+".join(mapping.modifiers),
        group_size=request.group_size, dtype=request.dtype, tp_size=request.tp_size,
        calibration_samples=int(calibration.shape[0]), calibration_seq_len=int(calibration.shape[1]),
        tools=result["tools"], seconds={**{k: round(v, 3) for k, v in result["seconds"].items()},
                                        "total": round(time.monotonic() - started, 3)},
        export_quant_algo=mapping.export_label, alpha=request.alpha, exclude=list(request.exclude),
        placement={"device": result["device"]}, family=family.model_type, trtllm_checkpoint=False,
        backend=Backend.llmcompressor.value, distributed=result.get("distributed"),
    )
    record.write(out_dir, model_dir)
    return record
