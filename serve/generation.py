"""Greedy generation with kiln's reference runtime: the model that validated the checkpoint, serving it.

Used by the CPU Triton model (serve/cpu_model/model.py) and by anyone who wants the same
tokens without a server (tests, bench/serve.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from kiln.serve.requests import max_prompt_bytes


@dataclass(frozen=True)
class Piece:
    token_id: int
    text: str           # the text this token completes (may be "" mid-character)


class ReferenceGenerator:
    def __init__(self, hf_dir: Path, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        from kiln.validate import load_reference_model

        self.model = load_reference_model(Path(hf_dir), trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        self.eos_token_id = self.tokenizer.eos_token_id
        # transformers 5.2x renamed past_key_values to cache (the old name warns until 5.40).
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def max_prompt_bytes(self, max_tokens: int) -> int:
        return max_prompt_bytes(self.tokenizer, max_tokens)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Next tokens by argmax, one forward pass per token over the KV cache; stops at EOS."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        cache = None
        for _ in range(max_new_tokens):
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache})
            token = int(out.logits[0, -1].argmax())
            yield token
            if token == self.eos_token_id:
                return
            cache, ids = out[self._cache_arg], torch.tensor([[token]], dtype=torch.long)

    def stream(self, prompt: str | list[int], max_new_tokens: int,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[Piece]:
        """Tokens with the text each adds; text is released only once it decodes cleanly. `prompt` is text
        or its token ids; generation stops early once `cancelled()` says the client has gone."""
        generated: list[int] = []
        emitted = ""
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        for token in self.greedy_ids(ids, max_new_tokens):
            if cancelled():
                return
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            fresh = text[len(emitted):] if not text.endswith("\ufffd") else ""
            emitted += fresh
            yield Piece(token, fresh)

    def complete(self, prompt: str | list[int], max_new_tokens: int,
                 cancelled: Callable[[], bool] = lambda: False) -> tuple[list[int], str]:
        pieces = list(self.stream(prompt, max_new_tokens, cancelled))
        return [p.token_id for p in pieces], "".join(p.text for p in pieces)


@torch.no_grad()
def greedy_without_cache(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """The same greedy decoding by recomputing the whole sequence each step: slow, and independent of the cache."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        ids.append(token)
    return out
