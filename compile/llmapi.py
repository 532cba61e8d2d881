"""Target trtllm-pytorch: no engine; the HF checkpoint plus LLM-API options per SM.

The options file is what `trtllm-serve --extra_llm_api_options FILE` and Triton's
`llmapi` model read: keyword arguments of `tensorrt_llm.LLM` in YAML.
"""

from __future__ import annotations

from kiln.compile.targets import CheckpointQuant, CompileRequest
from kiln.quantize import kv_cache_of_export


def kv_cache_dtype(quant: CheckpointQuant) -> str:
    """KvCacheConfig.dtype for the checkpoint's kv_cache_quant_algo (the format table's); "auto": the model's."""
    spec = kv_cache_of_export(quant.kv_cache_quant_algo)
    return spec.runtime_dtype if spec is not None else "auto"


def default_cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def llm_api_options(request: CompileRequest, quant: CheckpointQuant) -> dict:
    options: dict = {
        "tensor_parallel_size": request.tp_size,
        "max_batch_size": request.max_batch_size,
        "max_num_tokens": request.max_num_tokens,
        "max_seq_len": request.max_seq_len,
        "kv_cache_config": {
            "dtype": kv_cache_dtype(quant),
            "enable_block_reuse": request.kv_cache_reuse,
            "free_gpu_memory_fraction": request.free_gpu_memory_fraction,
        },
        "cuda_graph_config": {
            "batch_sizes": list(request.cuda_graph_batch_sizes or default_cuda_graph_batch_sizes(request.max_batch_size)),
        },
    }
    if request.lora_target_modules:
        options["lora_config"] = {"lora_target_modules": list(request.lora_target_modules),
                                  "max_lora_rank": request.max_lora_rank}
    return options
