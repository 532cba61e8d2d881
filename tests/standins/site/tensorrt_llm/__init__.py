"""Stand-in for the parts of TensorRT-LLM's Python API that kiln's engine check calls.

For kiln's contract tests only. Signatures follow TensorRT-LLM (LLM, SamplingParams,
runtime.ModelRunnerCpp); unknown keyword arguments fail, as they would there.
Logits come from transformers on CPU: `LLM` runs the exported checkpoint through
kiln's reference runtime; the engine runner runs $KILN_STANDIN_MODEL. Adding
$KILN_STANDIN_LOGIT_NOISE (a standard deviation) makes an engine fail its gates.
"""
import json
import os

__version__ = os.environ.get("KILN_STANDIN_TRTLLM", "1.2.0")

_LLM_ARGS = {"tensor_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_config",
             "cuda_graph_config", "lora_config", "backend"}


def mpi_rank() -> int:
    return 0


def record(entry: dict) -> None:
    log = os.environ.get("KILN_STANDIN_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")


def perturb(logits):
    import torch

    noise = float(os.environ.get("KILN_STANDIN_LOGIT_NOISE", "0") or 0)
    if noise:
        generator = torch.Generator().manual_seed(0)
        logits = logits + noise * torch.randn(logits.shape, generator=generator)
    return logits


class SamplingParams:
    def __init__(self, max_tokens: int = 32, return_context_logits: bool = False, **kwargs):
        unknown = set(kwargs) - {"temperature", "top_k", "top_p", "end_id", "pad_id"}
        if unknown:
            raise TypeError(f"SamplingParams got unexpected arguments {sorted(unknown)}")
        self.max_tokens, self.return_context_logits = max_tokens, return_context_logits


class _Output:
    def __init__(self, context_logits):
        self.context_logits = context_logits


class LLM:
    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - _LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected arguments {sorted(unknown)}")
        kv = kwargs.get("kv_cache_config") or {}
        if kv.get("dtype") not in (None, "auto", "fp8", "nvfp4"):
            raise ValueError(f"kv_cache_config.dtype {kv.get('dtype')!r} is not a KV cache dtype")
        record({"tool": "LLM", "model": model, "kwargs": kwargs})
        from kiln.validate.reference_loader import load_reference_model

        self._model = load_reference_model(model)

    def generate(self, prompts, sampling_params: SamplingParams):
        import torch

        from kiln.validate.metrics import logits_of

        if not sampling_params.return_context_logits:
            raise ValueError("stand-in: kiln's engine check needs return_context_logits=True")
        return [_Output(perturb(logits_of(self._model, torch.tensor(ids, dtype=torch.long)))) for ids in prompts]
