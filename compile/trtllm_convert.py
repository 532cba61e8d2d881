"""A TensorRT-LLM checkpoint derived on the compile host from the HF checkpoint, by TensorRT-LLM's own converter.

A build under `calibration.offload: disk` writes hf/ only: ModelOpt's TensorRT-LLM exporter assembles the whole
state dict, which is what offload exists to avoid. For target trtllm-engine the compile host, which has
TensorRT-LLM (and, holding GPUs for the model, the memory to match), converts hf/ the way its LLM API loads a
pre-quantized checkpoint (tensorrt_llm/llmapi/llm_utils.py, ModelLoader._update_from_hf_quant_config and
_load_model_from_hf): quant_algo and kv_cache_quant_algo from hf_quant_config.json, every other field of it set on
the QuantConfig, then MODEL_MAP[architecture].from_hugging_face(hf, dtype, mapping, quant_config,
load_model_on_cpu=True) and save_checkpoint per rank. trtllm-build then takes that folder as it takes trtllm/.

The conversion runs in TensorRT-LLM's interpreter (KILN_TRTLLM_PYTHON), which reads config.json with
transformers 4.57: kiln hands it a view of hf/ whose config.json carries the 4.x RoPE keys
(compile/trtllm_config.transformers4_config), every other file linked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kiln.common.errors import KilnError

CONVERT_LOG = "convert.log"
QUANT_CONFIG = "hf_quant_config.json"


def hf_view(hf_dir: Path, view: Path) -> Path:
    """`view`: hf/'s files linked, config.json rewritten with transformers 4's RoPE keys."""
    from kiln.compile.trtllm_config import transformers4_config

    view.mkdir(parents=True, exist_ok=True)
    for path in Path(hf_dir).iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    (view / "config.json").write_text(json.dumps(transformers4_config(config), indent=2))
    return view


def convert_argv(python: str, hf_dir: Path, out: Path, dtype: str, tp_size: int) -> list[str]:
    return [python, "-m", "kiln.compile.trtllm_convert", str(hf_dir), str(out), dtype, str(tp_size)]


def convert_hf_checkpoint(hf_dir: Path, out: Path, scratch: Path, dtype: str, tp_size: int, progress) -> list[str]:
    """Write the TensorRT-LLM checkpoint of `hf_dir` into `out` with TensorRT-LLM's converter; returns the
    command (the engine record keeps it). A failure is one KilnError naming the log."""
    from kiln.common.foreign_python import env_for, trtllm_python

    python = trtllm_python()
    argv = convert_argv(python, hf_view(hf_dir, scratch / "hf"), out, dtype, tp_size)
    out.mkdir(parents=True, exist_ok=True)
    log_path = scratch / CONVERT_LOG
    with progress.task(f"TensorRT-LLM converts hf/ to a checkpoint ({tp_size} rank(s))", total=None), \
            log_path.open("w") as log:
        returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env_for(python)).returncode
    if returncode != 0:
        tail = "\n  ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
        raise KilnError(f"TensorRT-LLM's from_hugging_face could not convert {hf_dir} ({python}, exit {returncode}):"
                        f"\n  {tail}")
    missing = [name for name in ("config.json", *(f"rank{r}.safetensors" for r in range(tp_size)))
               if not (out / name).is_file()]
    if missing:
        raise KilnError(f"TensorRT-LLM's converter left {out} without {', '.join(missing)}")
    return argv


def _quant_config(hf_dir: Path):
    """TensorRT-LLM's QuantConfig for a pre-quantized checkpoint, as its LLM API derives it."""
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.quantization.mode import QuantAlgo

    quant = dict(json.loads((hf_dir / QUANT_CONFIG).read_text())["quantization"])
    config = QuantConfig()
    config.quant_algo = QuantAlgo(quant.pop("quant_algo"))
    kv_cache = quant.pop("kv_cache_quant_algo", None)
    config.kv_cache_quant_algo = QuantAlgo(kv_cache) if kv_cache else None
    quant.pop("quantized_layers", None)   # mixed precision: refused under offload, which is what comes here
    for key, value in quant.items():
        setattr(config, key, value)
    return config


def _main(hf_dir: str, out: str, dtype: str, tp_size: str) -> None:
    """Run in KILN_TRTLLM_PYTHON: convert `hf_dir` one rank at a time (one rank's weights resident)."""
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import MODEL_MAP

    folder = Path(hf_dir)
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    quant_config = _quant_config(folder)
    tp = int(tp_size)
    for rank in range(tp):
        model = MODEL_MAP[architecture].from_hugging_face(
            str(folder), dtype=dtype, mapping=Mapping(world_size=tp, rank=rank, tp_size=tp),
            quant_config=quant_config, load_model_on_cpu=True)
        model.save_checkpoint(out, save_config=rank == 0)
        del model
        print(f"rank {rank} of {tp} written to {out}", flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
