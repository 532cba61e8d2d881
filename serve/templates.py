"""Fill TensorRT-LLM's Triton templates (`${name}` placeholders) into complete model configs.

kiln does not author the GPU models' tensor lists: they must match the `model.py` files and the
backend of one TensorRT-LLM release, so they come from that release's
`triton_backend/all_models`. kiln substitutes what it knows, then parses the result with
Triton's own protobuf schema. A mandatory value kiln lacks is an error; an optional parameter
it has no value for is removed, never left as `${...}` or as an empty string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from kiln.common.errors import UserInputError

PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
# A placeholder standing for a whole value (a number, a type, a bool), not inside a string.
_BARE = re.compile(r'(?<!")\$\{(\w+)\}(?!")')


class TemplateError(UserInputError):
    """A template kiln cannot fill completely: exit 2, nothing written."""


@dataclass(frozen=True)
class FilledConfig:
    config: mc.ModelConfig
    dropped: tuple[str, ...]    # optional parameters the template offers that kiln left unset


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def fill_config(template: Path, values: dict[str, str], mandatory: frozenset[str] = frozenset()) -> FilledConfig:
    """Substitute `values` into one config.pbtxt template and parse it as a Triton ModelConfig."""
    template = Path(template)
    text = template.read_text()
    empty = sorted(name for name, value in values.items() if value is None or str(value) == "")
    if empty:
        raise ValueError(f"empty values for {', '.join(empty)}: kiln never writes an empty parameter")
    unknown = set(PLACEHOLDER.findall(text)) - set(values)
    needed = sorted((unknown & mandatory) | {m for m in _BARE.findall(text) if m in unknown})
    if needed:
        raise TemplateError(f"{template}: needs {', '.join(needed)}, which kiln has no value for (fix: use the "
                            "templates of the TensorRT-LLM release that built the artifact; kiln fills the values "
                            "that release documents)")
    filled = PLACEHOLDER.sub(lambda m: _quoted(str(values[m[1]])) if m[1] in values else m[0], text)
    try:
        config = text_format.Parse(filled, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise TemplateError(f"{template}: not a Triton model config once filled ({exc}) (fix: point --templates "
                            "at TensorRT-LLM's triton_backend/all_models)") from None
    dropped = []
    for key in list(config.parameters):
        found = PLACEHOLDER.search(config.parameters[key].string_value)
        if found:
            dropped.append(found[1])
            del config.parameters[key]
    leftover = PLACEHOLDER.search(text_format.MessageToString(config))
    if leftover:
        raise TemplateError(f"{template}: needs {leftover[1]}, which kiln has no value for, outside the "
                            "optional parameters")
    return FilledConfig(config, tuple(sorted(dropped)))
