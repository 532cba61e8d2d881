"""kiln's streamed safetensors writer (quantize/safetensors_layout.save_file_streamed), which the exports write
through: byte for byte what `safetensors.torch.save_file` writes, for every dtype the exports hold."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.quantize.safetensors_layout import save_file_streamed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 48, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale": torch.tensor(0.0123),           # 0-d, as ModelOpt exports
        "model.layers.0.mlp.up_proj.weight": torch.randint(0, 255, (32, 24), generator=g, dtype=torch.uint8),
        "model.layers.0.mlp.up_proj.weight_scale": torch.rand(32, 3, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=g).to(torch.float16),
        "lm_head.weight": torch.randn(8, 16, generator=g),
        "transformer.layers.0.attention.qkv.weights_scaling_factor": torch.rand(1, generator=g),
        "counts": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "int8.w": torch.randint(-128, 127, (4, 4), generator=g, dtype=torch.int8),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "caf\u00e9 \"quoted\"": torch.ones(2, dtype=torch.int32),
        "transposed": torch.randn(6, 4, generator=g).t(),                           # not contiguous
    }


# One metadata key at most, as the exporters write it: safetensors orders several by a Rust HashMap (measured: not
# by name), which no writer could reproduce, and neither its own writes from run to run.
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"note": "\u00e9 \"x\""}])
def test_the_streamed_writer_writes_safetensors_own_bytes(tmp_path, metadata):
    tensors = _tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata=metadata)
    save_file_streamed(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8))
