"""The only module that calls ModelOpt: calibrate, then export both checkpoints.

ModelOpt is imported here, lazily: its first import takes seconds and the
CLI's planning paths must not pay for it.
"""

from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path
from typing import Callable

from kiln.quantize.checkpoint import MODEL_DTYPE_BYTES
from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat
from kiln.quantize.placement import Placement, offload_device_map

TORCH_DTYPES = {name: name for name in MODEL_DTYPE_BYTES}   # model.dtype -> the torch attribute


def import_modelopt() -> None:
    """Import ModelOpt's quantization and export packages on a thread of their own, before any model is loaded.

    Measured: something ModelOpt's first import runs keeps a frame of the importing call stack, and a frame keeps
    every caller above it: imported lazily from `_calibrate`, that held the calibrated model (2.7 GB on a 1.07B
    model) alive through validation. A thread's stack has no callers of kiln's, so nothing of a build is kept.
    """
    failure: list[BaseException] = []

    def load() -> None:
        try:
            import modelopt.torch.export  # noqa: F401
            import modelopt.torch.quantization  # noqa: F401
        except BaseException as exc:   # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=load, name="import-modelopt")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def modelopt_config(quant: QuantFormat, kv_cache: KVCacheFormat, group_size: int | None, alpha: float | None = None,
                    exclude: tuple[str, ...] = (), offloaded: bool = False, only: tuple[str, ...] = (),
                    algorithm: str | None = None, all_experts: bool = False, checkpoints=None) -> dict:
    """The ModelOpt quantization config for a format, group size, KV-cache format, SmoothQuant alpha, the module name
    patterns to keep unquantized and, with `only`, the only ones to quantize; `offloaded` (disk offload) runs GPTQ a
    layer at a time; `checkpoints` (quantize/resume.py) runs every format a layer at a time, saving each layer."""
    import modelopt.torch.quantization as mtq

    spec = FORMATS[quant]
    search = spec.algorithms.get(algorithm)
    config = copy.deepcopy(getattr(mtq, search.modelopt_config if search else spec.modelopt_config))
    if search and spec.activation_bits == 16:   # a weight-only row runs a W4A4 config's search on its weights alone
        config["quant_cfg"] = list(config["quant_cfg"]) + [{"quantizer_name": "*input_quantizer", "enable": False}]
    if spec.algorithm_config:
        config["algorithm"] = dict(spec.algorithm_config)
    if offloaded and spec.layer_by_layer_under_offload:
        # Each layer's inputs are captured from the unquantized layers before it (not their QDQ outputs), as in
        # the whole-model pass: the same weights come out (measured bit-identical on the demo model).
        config["algorithm"] = {**config["algorithm"],
                               "layerwise": {"enable": True, "get_qdq_activations_from_prev_layer": False}}
    if checkpoints is not None:
        method = config.get("algorithm", "max")
        method = method if isinstance(method, dict) else {"method": method}
        config["algorithm"] = {**method, "layerwise": checkpoints.layerwise(method.get("method"))}
    if spec.takes_alpha and alpha is not None:
        config["algorithm"] = {**config.get("algorithm", {}), "alpha": alpha}
    if all_experts:   # every token through every expert while calibrating; the forward's outputs are unchanged
        method = config.get("algorithm", "max")
        config["algorithm"] = {**(method if isinstance(method, dict) else {"method": method}),
                               "moe_calib_experts_ratio": 1.0}
    if group_size is not None:
        for entry in config["quant_cfg"]:
            cfg = entry.get("cfg") if isinstance(entry, dict) else None
            # W4A8 chains two weight quantizers (INT4 blocks, then FP8): the block size sits on the first.
            for stage in (cfg if isinstance(cfg, list) else [cfg]):
                if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(stage, dict) and stage.get("block_sizes"):
                    stage["block_sizes"] = {**stage["block_sizes"], -1: group_size}
    if only:
        config["quant_cfg"] = only_under(config["quant_cfg"], only)
    kv_spec = KV_CACHE_FORMATS[kv_cache]
    if kv_spec.unsupported:
        raise ValueError(f"kv_cache {kv_cache.value}: {kv_spec.unsupported}")
    if kv_spec.modelopt_config is not None:
        config = mtq.update_quant_cfg_with_kv_cache_quant(config, kv_quant_cfg(kv_cache))
    # Later entries win in ModelOpt's list: exclusions go last, disabling every quantizer under the module.
    config["quant_cfg"] = list(config["quant_cfg"]) + [
        {"quantizer_name": f"{pattern}.*", "enable": False} for pattern in exclude
    ]
    return config


def only_under(entries: list, only: tuple[str, ...]) -> list:
    """The format's entries with each one that turns weight or input quantizers on narrowed to the modules under the
    `only` patterns, in place, so the format's own refusals after it (routers, lm_head) still apply. ModelOpt's
    NVFP4_EXPERTS_ONLY_CFG is NVFP4_DEFAULT_CFG so narrowed to `*.experts`."""
    narrowed = []
    for entry in entries:
        name = entry.get("quantizer_name", "") if isinstance(entry, dict) else ""
        turns_on = entry.get("enable", True) is not False and "cfg" in entry if isinstance(entry, dict) else False
        if turns_on and name.startswith("*") and name.endswith(("weight_quantizer", "input_quantizer")):
            narrowed += [{**entry, "quantizer_name": f"{pattern}.{name}"} for pattern in only]
        else:
            narrowed.append(entry)
    return narrowed


def kv_quant_cfg(kv_cache: KVCacheFormat) -> list:
    """ModelOpt's K/V quantizer entries for a KV format; a constant-scale format pins their amax, so calibration
    collects nothing for them."""
    import modelopt.torch.quantization as mtq

    spec = KV_CACHE_FORMATS[kv_cache]
    entries = copy.deepcopy(list(getattr(mtq, spec.modelopt_config)["quant_cfg"]))
    if spec.constant_amax is not None:
        entries = [{**entry, "cfg": {**entry["cfg"], "constant_amax": spec.constant_amax}} for entry in entries]
    return entries


def load_source_model(model_dir: Path, dtype: str, trust_remote_code: bool, allow_pickle: bool,
                      placement: Placement | None = None, offload_folder: Path | None = None):
    """The source model in `dtype`, read from its (memory-mapped) safetensors; on GPUs, spread over them by
    accelerate's device map with the placement's caps, the rest offloaded to CPU memory. Under disk offload,
    the decoder layers past the caps stay on disk: accelerate's hooks read each one when it runs (from the
    source's own safetensors; `offload_folder` takes only what must be converted first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = placement.load_kwargs() if placement else {}
    if placement is not None and placement.to_disk:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                     trust_remote_code=trust_remote_code)
        kwargs = placement.load_kwargs(offload_device_map(empty, placement), str(offload_folder))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=getattr(torch, TORCH_DTYPES[dtype]),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        **kwargs,
    )
    return model.eval()


def on_disk(model) -> list[str]:
    """The modules accelerate's device map left on disk (read back a layer at a time when they run)."""
    return [name for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk"]


def input_device(model):
    """Where token ids go in: the input embedding's device (a GPU under a device map)."""
    import torch

    weight = model.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def calibrate(model, config: dict, samples, on_samples: Callable[[int], None], batch_size: int = 1,
              on_pass: Callable[[int], None] | None = None, at_each_pass: Callable[[], None] | None = None) -> None:
    """Run ModelOpt's calibration with the recipe's token windows ([n, seq_len]), `batch_size` per forward.

    ModelOpt may run the loop more than once (AWQ: statistics, then the scale search); each later pass calls
    `on_pass(n)` before its samples count again, so progress never reads 59/32. `at_each_pass()` runs before
    every pass: a layer-at-a-time calibration calls the loop once per layer boundary."""
    import modelopt.torch.quantization as mtq
    import torch

    device = input_device(model)
    passes = 0

    def forward_loop(m):
        nonlocal passes
        passes += 1
        if at_each_pass is not None:
            at_each_pass()
        if passes > 1 and on_pass is not None:
            on_pass(passes)
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size]
                m(input_ids=batch.to(device))
                on_samples(len(batch))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, config, forward_loop)


def decoder_layers(model) -> int | None:
    """How many decoder layers ModelOpt's layer-at-a-time calibration finds (None: it finds none, and cannot run)."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    return len(layers) if layers else None


def auto_quantize(model, request, exclude: tuple[str, ...], samples, batch_size: int, on_forward,
                  search_state=None, budget_bits: float | None = None) -> dict:
    """Auto precision over the calibration windows (quantize/auto_precision.py): `model` leaves quantized;
    `search_state`: ModelOpt's search checkpoint, restored where it exists and written where it does not."""
    from kiln.quantize import auto_precision

    device = input_device(model)
    batches = [samples[start:start + batch_size].to(device) for start in range(0, len(samples), batch_size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto_precision.search(model, request, exclude, batches, lambda m, batch: m(input_ids=batch).logits,
                                     on_forward, modelopt_config, search_state, budget_bits)


def calibrate_kv_cache(model, kv_cache: KVCacheFormat, samples, batch_size: int) -> None:
    """Add a quantized KV cache to a model auto_quantize left quantized: ModelOpt's auto_quantize searches
    linear layers only, so the K/V quantizers are enabled and calibrated (max) here, every other quantizer
    left as the search calibrated it. A constant-scale KV format has its amax once set: no forward runs."""
    import modelopt.torch.quantization as mtq
    import torch

    kv_spec = KV_CACHE_FORMATS[kv_cache]
    if kv_spec.modelopt_config is None:
        return
    kv_cfg = kv_quant_cfg(kv_cache)
    device = input_device(model)

    def forward_loop(m):
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                m(input_ids=samples[start:start + batch_size].to(device))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.set_quantizer_by_cfg(model, kv_cfg)
        if kv_spec.constant_amax is not None:
            return
        with mtq.set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}, *kv_cfg]):
            mtq.calibrate(model, algorithm="max", forward_loop=forward_loop)


def fold_input_scales_layer_by_layer(model) -> bool:
    """Under disk offload: the export's rewrite of AWQ/SmoothQuant scales, a decoder layer at a time.

    Before writing, ModelOpt's export averages the pre-quant scales of the linears that read one input (q/k/v,
    gate/up), rescaling their weights, and folds AWQ's into the norm before them. It does that for the whole model
    at once with every weight resident; on offloaded layers it meets meta tensors ("Tensor.item() cannot be called
    on meta tensors"). Here each layer is read from disk, rewritten with ModelOpt's own fusion, and written back
    (quantize/offload_writeback.py); ModelOpt's pass in the export then finds the scales equal and already folded,
    and leaves them. Returns whether there was anything to fold."""
    import torch
    from modelopt.torch.export.quant_utils import get_quantization_format
    from modelopt.torch.export.unified_export_hf import _fuse_shared_input_modules, collect_shared_input_modules
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    if not any(getattr(getattr(m, "input_quantizer", None), "_pre_quant_scale", None) is not None
               for m in model.modules()):
        return False
    device = input_device(model)

    def dummy_forward():   # ModelOpt's own way of finding which linears share an input
        model(torch.ones([1, 2], dtype=torch.long, device=device))

    with torch.no_grad():
        shared_inputs, norms = collect_shared_input_modules(model, dummy_forward, collect_layernorms=True)
    layers = LayerActivationCollector.get_decoder_layers(model)
    if layers is None:   # ModelOpt's streaming exporter would refuse it next, for the same reason
        raise RuntimeError(f"{type(model).__name__}: ModelOpt finds no decoder layers in it, so its scales cannot be "
                           "folded a layer at a time under disk offload (fix: calibration.offload: none)")
    quant_format = get_quantization_format(model)
    modules = dict(model.named_modules())
    for layer in layers:
        own = {id(m) for m in layer.modules()}
        groups = {tensor: linears for tensor, linears in shared_inputs.items() if all(id(m) in own for m in linears)}
        with enable_weight_access_and_writeback(layer, model, modules), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # ModelOpt's "writeback is kept in CPU state_dict": kiln's is on disk
            _fuse_shared_input_modules(model, groups, norms, fuse_layernorms=True, quantization_format=quant_format)
    return True


def export_hf(model, export_dir: Path, max_shard_size: str = "5GB", offloaded: list[str] | bool = False) -> None:
    """The HF unified checkpoint; past `max_shard_size` it is sharded with model.safetensors.index.json.
    An `offloaded` model goes through ModelOpt's streaming exporter (one decoder layer resident at a time),
    which it takes only when it sees accelerate's offload hooks: without them, the resident exporter would
    read the offloaded weights as meta tensors, so that is refused before anything is written."""
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.quantization.utils.core_utils import has_accelerate_offload

    if offloaded and not has_accelerate_offload(model):
        raise RuntimeError("the model was loaded with disk offload but carries no accelerate offload hooks: "
                           "ModelOpt's resident exporter would write meta tensors, so nothing is exported")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=str(export_dir), max_shard_size=max_shard_size)


def export_trtllm(model, export_dir: Path, dtype: str, tp_size: int) -> None:
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type
    from modelopt.torch.quantization.utils.core_utils import has_accelerate_offload

    if has_accelerate_offload(model):   # it assembles the whole state dict: offloaded weights would be meta
        raise RuntimeError("ModelOpt's TensorRT-LLM exporter assembles the full state dict; an offloaded model's "
                           "weights are meta tensors there, so it is not run under offload")

    decoder_type = get_model_type(model)
    if decoder_type is None:
        raise ValueError(f"ModelOpt has no TensorRT-LLM decoder type for {type(model).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # inference_tensor_parallel must be explicit: its default 0 raised ZeroDivisionError here.
        export_tensorrt_llm_checkpoint(
            model,
            decoder_type=decoder_type,
            dtype=getattr(torch, TORCH_DTYPES[dtype]),
            export_dir=str(export_dir),
            inference_tensor_parallel=tp_size,
        )
