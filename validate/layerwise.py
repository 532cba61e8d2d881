"""Validation one decoder layer at a time, for models larger than memory.

The model's own forward runs with its decoder layers swapped for stand-ins, in three passes:

1. capture (per batch of samples): the stand-ins record what the model hands each layer (masks,
   rotary embeddings, positions) and the first layer's input, and the forward stops at the last layer;
2. layer by layer: each decoder layer is built from disk, runs every batch's hidden states with that
   batch's recorded arguments, and is dropped before the next one is built;
3. replay (per batch): the last stand-in returns the last layer's output, so the model's own final
   norm and output head run on it (`last_hidden_states` checks the head as it does for a whole model).

Everything between the decoder layers is the model's own code, so each family's masks (sliding windows,
Gemma's per-layer types) are made as the model makes them. Resident: one decoder layer, the embeddings,
norm and head, and every sample's hidden states (samples x positions x hidden, float32). The embeddings and
head stay memory-mapped from the files as stored (pages the kernel reads as they are used and may drop again),
and a large head is decoded to float32 a slice of vocabulary rows at a time (heads.HEAD_ROWS_BYTES).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kiln.validate.heads import BATCH_TOKENS, OutputHead, last_hidden_states
from kiln.validate.reference_loader import StreamedModel


class _ReachedLastLayer(Exception):
    """Raised by the last stand-in while capturing: nothing after it needs to run."""


class _StandIn(nn.Module):
    """In a decoder layer's place: `on_call(hidden, args, kwargs)` decides what comes out. Attributes the
    model's forward reads from its layers (Gemma's `attention_type`) come from the layer it stands in for."""

    def __init__(self, template: nn.Module, on_call: Callable):
        super().__init__()
        object.__setattr__(self, "_template", template)   # not a submodule: its (meta) weights are not ours
        object.__setattr__(self, "_on_call", on_call)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_template"), name)

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        return self._on_call(hidden, args, kwargs)


def _swap(layers: nn.ModuleList, modules: list[nn.Module]) -> None:
    for index, module in enumerate(modules):
        layers[index] = module


@torch.no_grad()
def streamed_head_outputs(streamed: StreamedModel, samples: torch.Tensor, on_layer: Callable[[int], None] = lambda i: None):
    """(i, SampleLogits) for each row of `samples` [n, positions], as `heads.head_outputs` gives them for a whole
    model, with one decoder layer resident at a time; `on_layer(i)` after layer i has run every sample."""
    model, layers = streamed.model, streamed.layers
    templates = list(layers)
    count = len(templates)
    head = OutputHead.of(model)
    per_batch = max(1, BATCH_TOKENS // samples.shape[1])
    batches = [samples[start:start + per_batch] for start in range(0, samples.shape[0], per_batch)]
    hidden: list[torch.Tensor | None] = []
    calls: list[list] = []
    try:
        for ids in batches:
            hidden.append(None)
            calls.append(_capture(model, layers, templates, ids, hidden))
        for index in range(count):
            layer = streamed.load_layer(index)
            for b, recorded in enumerate(calls):
                args, kwargs = recorded[index]
                out = layer(hidden[b], *args, **kwargs)
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"{type(layer).__name__} returns {type(out).__name__}, not the hidden states "
                                     "tensor, so kiln cannot run it one layer at a time")
                hidden[b] = out
            del layer
            on_layer(index)
        for b, ids in enumerate(batches):
            final = hidden[b]
            _swap(layers, [_StandIn(t, lambda h, a, k: h) for t in templates[:-1]]
                  + [_StandIn(templates[-1], lambda h, a, k, final=final: final)])
            rows = last_hidden_states(model, ids, head)
            hidden[b] = None
            for offset, row in enumerate(rows):
                yield b * per_batch + offset, head.sample(row)
    finally:
        _swap(layers, templates)


def _capture(model: nn.Module, layers: nn.ModuleList, templates: list[nn.Module], ids: torch.Tensor,
             hidden: list) -> list:
    """Each layer's (args, kwargs) for this batch; the first layer's input goes to hidden[-1]."""
    recorded: list = [None] * len(templates)

    def recorder(index: int):
        def on_call(h, args, kwargs):
            if index == 0:
                hidden[-1] = h
            recorded[index] = (args, kwargs)
            if index == len(templates) - 1:
                raise _ReachedLastLayer
            return h
        return on_call

    _swap(layers, [_StandIn(t, recorder(i)) for i, t in enumerate(templates)])
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _ReachedLastLayer:
        return recorded
    raise ValueError(f"{type(model).__name__}: its forward did not call its last decoder layer, so kiln cannot "
                     "run it one layer at a time")
