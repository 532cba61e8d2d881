"""Logits from a built TensorRT-LLM artifact, one sample at a time (GPU hosts only).

tensorrt_llm is imported here and nowhere else in validate/, inside the functions,
so that importing kiln never needs it. Registered by target name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kiln.compile import Target

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _import_tensorrt_llm():
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise RuntimeError(f"tensorrt_llm is not importable ({exc}); the engine check runs on a GPU host with "
                           "TensorRT-LLM installed (see compile/README.md)") from None
    return tensorrt_llm


def engine_logits(sm_dir: Path, hf_dir: Path, end_id: int, pad_id: int) -> LogitsFn:
    """trtllm-engine: the C++ runtime over rank<N>.engine; context logits need --gather_context_logits."""
    tensorrt_llm = _import_tensorrt_llm()
    from tensorrt_llm.runtime import ModelRunnerCpp

    runner = ModelRunnerCpp.from_dir(engine_dir=str(sm_dir), rank=tensorrt_llm.mpi_rank())

    def logits(ids: torch.Tensor) -> torch.Tensor:
        outputs = runner.generate(batch_input_ids=[ids.to(torch.int32)], max_new_tokens=1, end_id=end_id,
                                  pad_id=pad_id, return_dict=True, output_sequence_lengths=True)
        if not outputs or "context_logits" not in outputs:
            return None  # not the leader rank of a multi-GPU engine: only rank 0 receives outputs
        return outputs["context_logits"][0, : ids.numel()].float().cpu()

    return logits


def llm_api_logits(sm_dir: Path, hf_dir: Path, end_id: int, pad_id: int) -> LogitsFn:
    """trtllm-pytorch: the LLM API on the HF checkpoint with this SM's options file."""
    import yaml

    from kiln.compile import LLM_API_OPTIONS

    _import_tensorrt_llm()
    from tensorrt_llm import LLM, SamplingParams

    options = yaml.safe_load((Path(sm_dir) / LLM_API_OPTIONS).read_text())
    llm = LLM(model=str(hf_dir), **options)
    params = SamplingParams(max_tokens=1, return_context_logits=True)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        (output,) = llm.generate([ids.tolist()], params)
        return output.context_logits.float().cpu()

    return logits


RUNTIMES: dict[Target, Callable[..., LogitsFn]] = {
    Target.trtllm_engine: engine_logits,
    Target.trtllm_pytorch: llm_api_logits,
}
