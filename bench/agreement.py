"""Where kiln's reference runtime and ModelOpt's in-memory model part, layer by layer (issue 42).

    python bench/agreement.py [--model gemma3-270m] [--format fp8] [--kv fp8] [--group 64] [--calib 16] [--eval 8]
                              [--seq-len 256] [--out DIR]

One calibration, two models on the same token windows (python-docs-train for calibration, python-docs-heldout
for evaluation, cut as kiln cuts them):
  - in-memory: ModelOpt's fake-quant model as calibrated (the model ModelOpt's own accuracy numbers come from);
  - reference: kiln's reference runtime over the HF checkpoint ModelOpt exported from that very model;
  - as exported: the in-memory model given the exported files (tests/conformance.py): what ModelOpt computes with
    what ships. The reference must agree with it within tests/conformance.MAX_KL_RATIO_DEVIATION.
It prints each model's mean KL against the unquantized model (float32 math, as kiln's baseline), then, for
every linear layer, what each does to the same input: the quantized input (in-memory: its input quantizer;
reference: the exported input_scale), the weight, and the layer's output, as relative differences; and each
decoder layer's output when both models run the same ids. The first layer where they part names the cause.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from tests.conformance import reference_layers  # noqa: E402


def _codes_unlike_float32_rounding(in_memory, reference) -> float:
    """The share of stored FP8 weight codes that differ from the in-memory model's float32 rounding: ModelOpt's
    exporter divides a bf16 weight by its scale in bf16 before the FP8 cast (modelopt/torch/export/quant_utils.py,
    to_quantized_weight), a second rounding that the in-memory fake quant does not make."""
    import torch

    moved = total = 0
    layers = reference_layers(reference)
    for name, module in in_memory.named_modules():
        if getattr(module, "weight_quantizer", None) is None or not module.weight_quantizer.is_enabled \
                or name not in layers:
            continue
        stored = layers[name]._stored()
        scale = stored["weight_scale"].float()
        scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale   # per channel, or per tensor
        with torch.no_grad():
            exact = (module.weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        moved += int((exact.view(torch.uint8) != stored["weight"].view(torch.uint8)).sum())
        total += exact.numel()
    return moved / total


@contextlib.contextmanager
def modelopt_activation_rounding():
    """kiln's FP8 activation and K/V rounding computed in ModelOpt's order (tensor_quant._fp8_eager) for the
    reference models built in the block."""
    import torch

    from kiln.validate import codecs

    def modelopt_order(x, stored):
        scale = 448.0 / (stored["input_scale"].float() * 448.0)
        q = (x.float() * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return (q.float() * (1 / scale)).to(x.dtype)

    def modelopt_kv_order(x, scale):
        return modelopt_order(x, {"input_scale": scale})

    kept = codecs._fp8_input, codecs.KV_CODECS["FP8"]
    # The decoders and the K/V codec are looked up when the reference layers are built.
    codecs._fp8_input, codecs.KV_CODECS["FP8"] = modelopt_order, modelopt_kv_order
    try:
        yield
    finally:
        codecs._fp8_input, codecs.KV_CODECS["FP8"] = kept


def rel(a, b) -> float:
    import torch

    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if torch.isfinite(a).all() else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="a real model of bench/real_models.py, or a folder")
    parser.add_argument("--format", default="fp8")
    parser.add_argument("--kv", default="none")
    parser.add_argument("--group", type=int, default=None, help="group size of a 4-bit format (default: the format's)")
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--eval", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="keep the export here (default: a temporary folder)")
    args = parser.parse_args()

    import tempfile

    import torch
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.quantize import KVCacheFormat, QuantFormat
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.validate.reference_loader import load_baseline_model, load_reference_model
    from tests.conformance import agreement

    folder = Path(args.model)
    if not folder.is_dir():
        import real_models

        folder = real_models.ensure_real_model(args.model, log=lambda *a: print(*a, file=sys.stderr))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = token_samples(python_docs("train"), tokenizer, args.calib, args.seq_len)
    evaluation = token_samples(python_docs("heldout"), tokenizer, args.eval, args.seq_len)

    baseline = load_baseline_model(folder)

    import modelopt.torch.opt as mto

    export = args.out or Path(tempfile.mkdtemp(prefix="kiln-agreement-"))
    export.mkdir(parents=True, exist_ok=True)
    state = export / "modelopt-state.pt"   # --out keeps the calibrated model: a rerun skips calibration
    model = adapter.load_source_model(folder, args.calib_dtype, False, False)
    if state.is_file() and (export / "hf").is_dir():
        mto.restore(model, str(state))
    else:
        adapter.calibrate(model, adapter.modelopt_config(QuantFormat(args.format), KVCacheFormat(args.kv), args.group),
                          calibration, lambda n: None)
        mto.save(model, str(state))
    in_memory = copy.deepcopy(model).float()
    if not (export / "hf").is_dir():
        adapter.export_hf(model, export / "hf")
    del model
    reference = load_reference_model(export / "hf")

    memory_codes = _codes_unlike_float32_rounding(in_memory, reference) if args.format in ("fp8", "fp8_pc_pt") else None
    result = agreement(baseline, in_memory, reference, evaluation)
    summary = {"model": args.model, "format": args.format, "kv": args.kv, "group": args.group,
               "windows": len(evaluation), **result.as_dict(), "ratio_to_in_memory": result.kl_reference / result.kl_in_memory}
    if memory_codes is not None:
        summary["fp8_codes_unlike_float32_rounding"] = memory_codes
    if any(getattr(m, "_transform", None) for m in reference.modules()):
        # kiln rounds activations as TensorRT-LLM's quantize kernel does, x / input_scale (cpp/tensorrt_llm/
        # common/cudaFp8Utils.cu); ModelOpt's fake quant computes x * (448 / amax). The two differ in the last
        # bit now and then, which moves an FP8 code at a rounding boundary; over many layers that moves single
        # windows' KL both ways. With ModelOpt's order, the reference computes what the as-exported model does:
        with modelopt_activation_rounding():
            rounded = load_reference_model(export / "hf")   # the layers take their rounding when they are built
        same_order = agreement(baseline, in_memory, rounded, evaluation)
        summary["with_modelopt_rounding"] = {"kl_reference": same_order.kl_reference,
                                             "kl_between": same_order.kl_between}
        del rounded
    print(json.dumps(summary))

    # Each linear layer on the same input: the input the in-memory layer received on the first evaluation window.
    captured: dict[str, torch.Tensor] = {}
    def keep(name):
        def hook(module, args, output):   # returns None: the layer's output stays its own
            captured.setdefault(name, args[0].detach())
        return hook

    hooks = [module.register_forward_hook(keep(name))
             for name, module in in_memory.named_modules() if hasattr(module, "input_quantizer")]
    with torch.no_grad():
        in_memory(input_ids=evaluation[0][None])
    for hook in hooks:
        hook.remove()
    references = dict(reference.named_modules())
    rows = []
    for name, module in in_memory.named_modules():
        if name not in captured or not hasattr(references.get(name), "_transform"):   # reference linear layers only
            continue
        x, mine = captured[name].float(), references[name]
        with torch.no_grad():
            q_memory = module.input_quantizer(x) if module.input_quantizer.is_enabled else x
            q_reference = mine._transform(x, mine._stored()) if mine._transform is not None else x
            w_memory = module.weight_quantizer(module.weight.float()) if module.weight_quantizer.is_enabled \
                else module.weight.float()
            w_reference = mine.weight
            y_memory, y_reference = module(x), mine(x)
        amax = getattr(module.input_quantizer, "amax", None)
        stored = mine._stored().get("input_scale")
        rows.append({"layer": name, "input": rel(q_reference, q_memory), "weight": rel(w_reference, w_memory),
                     "output": rel(y_reference, y_memory), "input_err_memory": rel(q_memory, x),
                     "input_err_reference": rel(q_reference, x),
                     "amax/448": float(amax.max()) / 448 if amax is not None else None,
                     "input_scale": float(stored.max()) if stored is not None else None,
                     "x_absmax": float(x.abs().max())})
    worst = sorted(rows, key=lambda r: -max(r["input"], r["output"]))[:12]
    print("worst linear layers (relative differences, reference vs in-memory, on the same input):")
    for r in worst:
        print(json.dumps(r))

    # Each decoder layer's output, both models on the same ids.
    outputs: dict[str, dict[int, torch.Tensor]] = {"memory": {}, "reference": {}}

    def capture(which, index):
        def hook(module, args, output):
            outputs[which][index] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    hooks = [layer.register_forward_hook(capture(which, i))
             for which, net in (("memory", in_memory), ("reference", reference))
             for i, layer in enumerate(net.get_decoder().layers)]
    with torch.no_grad():
        in_memory(input_ids=evaluation[0][None])
        reference(input_ids=evaluation[0][None])
    for hook in hooks:
        hook.remove()
    print("decoder layer outputs, reference vs in-memory (relative difference):")
    print(json.dumps({i: round(rel(outputs["reference"][i], outputs["memory"][i]), 5)
                      for i in sorted(outputs["memory"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
