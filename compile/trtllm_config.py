"""On a compile host, TensorRT-LLM's own mapping decides the checkpoint config.

Before `trtllm-build`, kiln asks TensorRT-LLM's `MODEL_MAP[architecture].config_class.from_hugging_face`
(in the interpreter that has tensorrt_llm, KILN_TRTLLM_PYTHON) for the config of the source model, and
compares every field the family table lists, plus the common ones, with the checkpoint's `config.json`.
A mismatch stops the build, naming the field: the engine would be built from a config TensorRT-LLM
itself would not have written.

The source config is the one the quantize stage kept (`source-config.json`). TensorRT-LLM 1.2 reads it
with transformers 4.57, which knows `rope_theta` / `rope_scaling` but not transformers 5's
`rope_parameters`: kiln writes the 4.x keys beside a 5.x-only config so that both read the same RoPE.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.quantize import trtllm_values_agree


def transformers4_config(source: dict) -> dict:
    """The source config with transformers 4's RoPE keys where only transformers 5's `rope_parameters` is set."""
    config = dict(source)
    params = dict(config.get("rope_parameters") or {})
    if params and "rope_theta" not in config:
        config["rope_theta"] = params.pop("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            config["rope_scaling"] = params
    return config


def trtllm_mapping(source_config: dict, dtype: str, tp_size: int) -> dict:
    """TensorRT-LLM's own config for the source model, from its interpreter."""
    from kiln.common.foreign_python import env_for, trtllm_python

    python = trtllm_python()
    with tempfile.TemporaryDirectory(prefix="kiln-hf-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(transformers4_config(source_config), indent=2))
        done = subprocess.run([python, "-m", "kiln.compile.trtllm_config", folder, dtype, str(tp_size)],
                              capture_output=True, text=True, env=env_for(python), timeout=300)
    if done.returncode != 0:
        tail = "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise KilnError(f"TensorRT-LLM's from_hugging_face failed for the source config ({python}):\n  {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_against_trtllm(trtllm_dir: Path, source_config: dict, field_names: tuple[str, ...], tp_size: int) -> dict:
    """Refuse a checkpoint config that differs from TensorRT-LLM's own mapping in any listed field.
    Returns {field: value} of what was compared, for the engine record."""
    checkpoint = json.loads((Path(trtllm_dir) / "config.json").read_text())
    theirs = trtllm_mapping(source_config, checkpoint.get("dtype", "bfloat16"), tp_size)
    compared = {}
    for field in field_names:
        if field not in theirs:
            raise KilnError(f"TensorRT-LLM's {checkpoint.get('architecture')} config has no field {field!r}; kiln's "
                            "family table lists it (fix: update the family table for this TensorRT-LLM version)")
        if not trtllm_values_agree(field, checkpoint.get(field), theirs[field]):
            raise KilnError(f"{trtllm_dir}/config.json: {field} is {checkpoint.get(field)!r}, but TensorRT-LLM's own "
                            f"from_hugging_face gives {theirs[field]!r} for the source model; the engine would not be "
                            "the model that was validated (fix: rebuild the checkpoint with this kiln, or report it)")
        compared[field] = theirs[field]
    return compared


def _main(folder: str, dtype: str, tp_size: str) -> None:
    """Run in KILN_TRTLLM_PYTHON: print TensorRT-LLM's config for the HF config in `folder` as JSON."""
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import MODEL_MAP

    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    config_class = MODEL_MAP[architecture].config_class
    tp = int(tp_size)
    config = config_class.from_hugging_face(folder, dtype=dtype, mapping=Mapping(world_size=tp, tp_size=tp))
    if isinstance(config, tuple):   # some LLaMAConfig versions return (config, original HF config)
        config = config[0]
    print(json.dumps(config.to_dict(), default=str))


if __name__ == "__main__":
    _main(*sys.argv[1:])
