"""Model configs built as Triton's own protobuf messages, written in its text format.

Building `ModelConfig` messages (the schema tritonclient ships) instead of filling text
templates means a misspelt field fails here, and no `${placeholder}` can survive.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

DTYPES = {"BYTES": mc.TYPE_STRING, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64, "BOOL": mc.TYPE_BOOL,
          "FP32": mc.TYPE_FP32, "UINT64": mc.TYPE_UINT64}


def tensor(container, name: str, dtype: str, dims, optional: bool = False):
    entry = container.add()
    entry.name, entry.data_type = name, DTYPES[dtype]
    entry.dims.extend(dims)
    if optional:
        entry.optional = True
    return entry


def set_parameters(config: mc.ModelConfig, parameters: dict[str, str]) -> None:
    for key, value in parameters.items():
        if value is None or value == "":
            raise ValueError(f"model {config.name}: parameter {key} has no value; kiln never writes an empty one")
        config.parameters[key].string_value = str(value)


def write_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    path = Path(model_dir) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
