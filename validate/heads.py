"""A model's logits a block of positions at a time: its body's last hidden states, then its output head.

A sample's float32 logits are positions x vocabulary: 512 x 262,144 is 537 MB for Gemma 3, and a
baseline kept them on disk for every sample (17 GB for 32 samples). The last hidden states are
positions x hidden size (1.3 MB there), and the head turns a block of them into logits when the
metrics need that block. The model runs with `logits_to_keep=1`, so transformers computes one
position's logits, which also checks that the head kiln applies is the model's own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.validate.records import LOGIT_BLOCK_BYTES

BLOCK_BYTES = LOGIT_BLOCK_BYTES   # the head is a matrix product per block: larger blocks keep it fast
# Samples run through a body together while their hidden states and attention stay small: batching
# makes the CPU's matrix products faster (measured 18 % on a 0.45B model, 1 -> 4 samples of 256 tokens).
BATCH_TOKENS = 1024
# The output head decodes its 16-bit weight to float32 for each block of positions: a 262,144 x 5,376 head
# (Gemma 3 27B) would take 5.6 GB in float32 beside its 2.8 GB as stored, so past this size it decodes and
# applies a slice of vocabulary rows at a time.
HEAD_ROWS_BYTES = 1 << 28


@dataclass(frozen=True)
class SampleLogits:
    """One sample's float32 logits [positions, vocab] on the CPU, produced one block of positions at a time."""

    positions: int
    vocab: int
    block: Callable[[int, int], torch.Tensor]   # (start, stop) -> float32 logits [stop - start, vocab]
    hidden: torch.Tensor | None = None          # the last hidden states they come from, when a head makes them

    @classmethod
    def full(cls, logits: torch.Tensor) -> "SampleLogits":
        """Logits someone computed whole (a TensorRT-LLM engine, vLLM's prompt logprobs)."""
        logits = logits.to(torch.float32)
        return cls(logits.shape[0], logits.shape[1], lambda start, stop: logits[start:stop])

    def blocks(self, positions: int | None = None):
        """(start, stop) ranges covering the first `positions` positions, each block under BLOCK_BYTES."""
        positions = self.positions if positions is None else positions
        size = max(16, BLOCK_BYTES // (4 * max(self.vocab, 1)))
        return [(start, min(start + size, positions)) for start in range(0, positions, size)]

    def materialise(self) -> torch.Tensor:
        return torch.cat([self.block(start, stop) for start, stop in self.blocks()])


class OutputHead:
    """The model's output layer (and Gemma's final soft-capping) as a function of last hidden states."""

    def __init__(self, module: nn.Module, softcap: float | None, vocab: int):
        self.module, self.softcap, self.vocab = module, softcap, vocab
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"]
        self.device = tensors[0].device if tensors else torch.device("cpu")

    @classmethod
    def of(cls, model: nn.Module) -> "OutputHead":
        config = model.config.get_text_config()
        return cls(model.get_output_embeddings(), getattr(config, "final_logit_softcapping", None), config.vocab_size)

    def detached(self, folder: Path) -> "OutputHead":
        """A copy whose tensors no longer alias the model's (the quantize stage goes on to change that model).

        Its tensors wait in `folder` until the head is first used: held in memory, a 32,000 x 2,048 head
        was 0.13 GB beside the quantize stage's export, the build's memory peak."""
        path = folder / "output-head.safetensors"   # not torch.save: it would write a view's whole storage
        tensors = _tensors(self.module)   # non-persistent buffers too: a float32-math view stores its weight so
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(path))
        skeleton = copy.deepcopy(self.module, {id(t): _on_meta(t) for t in tensors.values()})
        return _HeadOnDisk(skeleton, path, self.device, self.softcap, self.vocab)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device)
        rows = getattr(self.module, "plain_rows", None)
        if rows is None or rows.numel() * 4 <= HEAD_ROWS_BYTES:
            logits = self.module(hidden)
        else:
            step = max(1, HEAD_ROWS_BYTES // (4 * rows.shape[1]))
            bias = self.module.bias
            hidden = hidden.to(torch.float32)
            logits = hidden.new_empty((*hidden.shape[:-1], rows.shape[0]))
            for start in range(0, rows.shape[0], step):
                logits[..., start:start + step] = nn.functional.linear(
                    hidden, rows[start:start + step].to(torch.float32),
                    None if bias is None else bias[start:start + step])
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.to(device="cpu", dtype=torch.float32)

    def sample(self, hidden: torch.Tensor) -> SampleLogits:
        """One sample's logits from its last hidden states [positions, hidden]."""
        return SampleLogits(hidden.shape[0], self.vocab, lambda start, stop: self(hidden[start:stop]), hidden)


class _HeadOnDisk(OutputHead):
    """An output head whose tensors are read from a file the first time it is called."""

    def __init__(self, skeleton: nn.Module, path: Path, device: torch.device, softcap: float | None, vocab: int):
        self._skeleton, self._path, self.device, self.softcap, self.vocab = skeleton, path, device, softcap, vocab
        self._module = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            for name, tensor in load_file(str(self._path), device=str(self.device)).items():
                owner, _, key = name.rpartition(".")
                module = self._skeleton.get_submodule(owner)
                table = module._parameters if key in module._parameters else module._buffers
                table[key] = nn.Parameter(tensor, table[key].requires_grad) if table is module._parameters else tensor
            self._module, self._skeleton = self._skeleton, None
        return self._module


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    return {name: tensor for name, tensor in named if tensor is not None}


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_like(tensor, device="meta")
    return nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


@torch.no_grad()
def last_hidden_states(model: nn.Module, ids: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """The body's last hidden states [batch, positions, hidden] (float32, on the CPU) for token ids [batch, positions].

    Raises ValueError when `head` does not give the model's own logits for the last position: an
    architecture that changes its logits after the head in a way kiln does not know.
    """
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(
        output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]))
    embedding = model.get_input_embeddings().weight
    device = embedding.device if embedding.device.type != "meta" else ids.device
    try:
        try:
            last_logits = model(input_ids=ids.to(device), logits_to_keep=1).logits[:, -1]
        except TypeError:   # remote code that predates logits_to_keep: its full logits, once, then dropped
            captured.clear()
            last_logits = model(input_ids=ids.to(device)).logits[:, -1]
    finally:
        hook.remove()
    hidden = captured[-1].to(device="cpu", dtype=torch.float32)
    mine = head(hidden[:, -1])
    theirs = last_logits.to(device="cpu", dtype=torch.float32)
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{type(model).__name__}: its logits are not its output layer applied to its last hidden "
                         "states, so kiln cannot validate it a block of positions at a time")
    return hidden


def head_outputs(model: nn.Module, samples: torch.Tensor):
    """(i, SampleLogits) for each row of `samples` [n, positions], the body run on batches of rows."""
    head = OutputHead.of(model)
    per_batch = max(1, BATCH_TOKENS // samples.shape[1])
    for start in range(0, samples.shape[0], per_batch):
        hidden = last_hidden_states(model, samples[start:start + per_batch], head)
        for offset, rows in enumerate(hidden):
            yield start + offset, head.sample(rows)
