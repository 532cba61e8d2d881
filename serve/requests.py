"""What the CPU model accepts: every prompt of a batch, within the artifact's own limits.

A request is checked whole before any token is generated. What the client must change (empty or
non-UTF-8 text, a prompt longer than build.max_input_len, max_tokens past build.max_seq_len) is a
ClientError, which the model answers as Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
with this module's message; nothing of kiln's internals reaches the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

PAD_ID = -1   # output_ids rows of a batch are padded to the longest with this


class ClientError(ValueError):
    """A request the client must change."""


@dataclass(frozen=True)
class Limits:
    max_input_len: int      # prompt tokens
    max_seq_len: int        # prompt plus generated tokens
    default_max_tokens: int

    def as_parameters(self) -> dict[str, str]:
        return {"max_input_len": str(self.max_input_len), "max_seq_len": str(self.max_seq_len),
                "default_max_tokens": str(self.default_max_tokens)}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "Limits":
        return cls(int(params["max_input_len"]), int(params["max_seq_len"]), int(params["default_max_tokens"]))


def max_prompt_bytes(tokenizer, max_tokens: int) -> int:
    """More bytes than any text of `max_tokens` tokens can have: the longest vocabulary entry, written out
    (a byte-level or SentencePiece entry is never shorter in UTF-8 than the bytes it stands for), times the
    count. Special tokens the tokenizer adds cost no input bytes, so the bound holds with them."""
    longest = max((len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab()), default=1)
    return max_tokens * max(longest, 4)   # 4: one UTF-8 character even when the vocabulary is all single bytes


def artifact_limits(artifact: Path, default_max_tokens: int) -> Limits:
    """The build section of the artifact's recipe (recipe.json), capped by the model's own context."""
    config = json.loads((Path(artifact) / "hf" / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    try:
        build = json.loads((Path(artifact) / "recipe.json").read_text()).get("build", {})
    except (OSError, ValueError):   # versions published before recipe.json: the recipe defaults
        build = {}
    max_seq_len = min(int(build.get("max_seq_len", 2048)), int(context or 2**31))
    max_input_len = min(int(build.get("max_input_len", 1024)), max_seq_len - 1)
    return Limits(max_input_len, max_seq_len, default_max_tokens)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_tokens: int


def checked_prompts(texts: Sequence, max_tokens: Sequence | None, limits: Limits,
                    encode: Callable[[str], list[int]], max_prompt_bytes: int | None = None) -> list[Prompt]:
    """One Prompt per batch row of `text_input` (and `max_tokens`, when sent); ClientError for any bad row.

    A prompt longer than `max_prompt_bytes` is refused by its size before it is decoded or tokenized: a
    100 MB prompt took the tokenizer minutes and 20 GB, holding every other client meanwhile.
    """
    if len(texts) == 0:
        raise ClientError("text_input holds no prompt")
    if max_tokens is not None and len(max_tokens) != len(texts):
        raise ClientError(f"max_tokens has {len(max_tokens)} rows for {len(texts)} prompts: send one per prompt")
    prompts = []
    for row, raw in enumerate(texts):
        where = f"text_input[{row}]" if len(texts) > 1 else "text_input"
        size = len(raw) if isinstance(raw, bytes) else len(str(raw).encode("utf-8", "surrogatepass"))
        if max_prompt_bytes is not None and size > max_prompt_bytes:
            raise ClientError(f"{where} is {size} bytes; this artifact takes at most {limits.max_input_len} tokens "
                              f"(its recipe's build.max_input_len), and no text over {max_prompt_bytes} bytes fits "
                              "in that many of its tokenizer's tokens")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise ClientError(f"{where} is not UTF-8 text (byte {exc.start}): send the prompt as UTF-8") from None
        if not text.strip():
            raise ClientError(f"{where} is empty: send the prompt text")
        ids = encode(text)
        if len(ids) > limits.max_input_len:
            raise ClientError(f"{where} is {len(ids)} tokens; this artifact takes at most {limits.max_input_len} "
                              "(its recipe's build.max_input_len)")
        room = limits.max_seq_len - len(ids)
        if max_tokens is None:
            wanted = min(limits.default_max_tokens, room)
        else:
            wanted = int(max_tokens[row])
            if not 1 <= wanted <= room:
                raise ClientError(f"max_tokens{f'[{row}]' if len(texts) > 1 else ''} is {wanted}; with this "
                                  f"{len(ids)}-token prompt it must be 1 to {room} (build.max_seq_len "
                                  f"{limits.max_seq_len} less the prompt)")
        prompts.append(Prompt(ids, wanted))
    return prompts


def padded(rows: list[list[int]]) -> list[list[int]]:
    """Token-id rows of one length (the longest), padded with PAD_ID, as a batched output tensor needs."""
    width = max((len(r) for r in rows), default=0)
    return [r + [PAD_ID] * (width - len(r)) for r in rows]
