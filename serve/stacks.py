"""The serving stacks kiln starts, by the name `--runtime` takes: one row per stack.

A row names its implementation (a class with kiln.serve.stack.Stack's methods) as "module:Class", imported
when the stack is used: `kiln --help` reads the rows without importing Triton's client. Adding a stack
(SGLang) is its module plus a row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from kiln.common.errors import UserInputError


@dataclass(frozen=True)
class StackRow:
    name: str
    help: str                # what `--runtime NAME` serves
    implementation: str      # "kiln.serve.module:Class"

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
             "kiln.serve.vllm_server:VllmStack"),
)}


def stack_named(name: str):
    """The stack `--runtime NAME` starts (a kiln.serve.stack.Stack); one line naming the choices otherwise."""
    row = STACKS.get(name)
    if row is None:
        raise UserInputError(f"--runtime {name}: not one of {', '.join(STACKS)}")
    return row.load()


def runtime_help() -> str:
    """`--runtime`'s help: each stack's own sentence."""
    return " ".join(f"{name}: {row.help}" for name, row in STACKS.items())
