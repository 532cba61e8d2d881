"""The serving stacks kiln starts, by the name `--stack` takes (`--runtime`, its older name): one row per stack.

A stack is what serves (a server process and its model layout); a recipe's `runtimes:` are loaders, which
read a checkpoint format (kiln.quantize.Runtime). A row that serves through one of those loaders names it,
and every repository it writes is gated by the runtimes table once, before anything is laid out
(kiln.serve.repository). A row names its implementation (a class with kiln.serve.stack.Stack's methods) as
"module:Class", imported when the stack is used: `kiln --help` reads the rows without importing Triton's
client. Adding a stack (SGLang) is its module plus a row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from kiln.common.errors import UserInputError
from kiln.quantize import Runtime


@dataclass(frozen=True)
class StackRow:
    name: str
    help: str                # what `--stack NAME` serves
    implementation: str      # "kiln.serve.module:Class"
    # The loader it serves the checkpoint through, gated by the runtimes table; None: the stack decides what it
    # serves itself (cpu: kiln's reference runtime reads every format kiln writes; gpu: the engines and LLM-API
    # options compile built, whose own checks gated them per SM).
    loader: Runtime | None = None

    def load(self):
        module, _, cls = self.implementation.partition(":")
        return getattr(importlib.import_module(module), cls)()


STACKS: dict[str, StackRow] = {row.name: row for row in (
    StackRow("cpu", "kiln's reference runtime in Triton's python backend (any artifact, any host).",
             "kiln.serve.cpu_repo:CpuStack"),
    StackRow("gpu", "TensorRT-LLM's own Triton models for the artifact's target (engines: the in-flight-batching "
                    "ensemble; trtllm-pytorch: the llmapi model), filled from --templates.",
             "kiln.serve.gpu_repo:GpuStack"),
    StackRow("vllm", "triton-repo writes a model for Triton's vLLM backend (model.json from the artifact); serve "
                     "starts `vllm serve` (OpenAI-compatible) where vLLM is installed (KILN_VLLM_PYTHON).",
             "kiln.serve.vllm_server:VllmStack", loader=Runtime.vllm),
)}


def stack_row(name: str) -> StackRow:
    """The row of the stack `--stack NAME` names; one line naming the choices otherwise."""
    row = STACKS.get(name)
    if row is None:
        raise UserInputError(f"--stack {name}: not one of {', '.join(STACKS)}")
    return row


def stack_named(name: str):
    """The stack `--stack NAME` starts (a kiln.serve.stack.Stack)."""
    return stack_row(name).load()


def stack_help() -> str:
    """`--stack`'s help: each stack's own sentence."""
    return " ".join(f"{name}: {row.help}" for name, row in STACKS.items())
