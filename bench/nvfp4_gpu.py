"""ModelOpt's NVFP4 fake-quant on CUDA against kiln's CPU NVFP4 path; FP8 through a real FP8 GEMM.

    python bench/nvfp4_gpu.py [--model DIR] [--json PATH]     (on a CUDA host with ModelOpt)
    python bench/nvfp4_gpu.py --dry-run                       (here: every step that needs no GPU)

1. NVFP4: calibrate the trained test model with ModelOpt on the GPU, take the in-memory
   fake-quant logits there, export the HF checkpoint, and load that export with kiln's
   reference runtime on the CPU. Prints KL and top-1 agreement between the two, each
   against the unquantized baseline, and how kiln's activation rounding compares with
   ModelOpt's CUDA quantizer on real activations.
2. FP8: the exported FP8 weights and activation scales through torch._scaled_mm (a real
   FP8 tensor-core GEMM) against kiln's reference linear layers on the CPU.
3. The 2026 block formats whose ModelOpt fake quant is a CUDA op (issue 38): MXFP8 and MXFP4 (their
   E8M0 rounding, common/blockscale.py), weight-only NVFP4 and the W4A8 FP4 x FP8 mixes. ModelOpt's
   in-memory model on the GPU against kiln's reference runtime on the export, the activation rounding
   element by element against ModelOpt's CUDA kernel, and one layer's weight fake quant against kiln's
   stand-in (block_formats_on_cpu) on the same weight: for W4A8_NVFP4_FP8 ModelOpt's source suggests its
   Triton kernel rounds blocks of 16, not 32. Until this has run on a GPU, those rows rest on kiln's
   rounding (tests/test_reference_runtime.py compares everything else on the CPU, with kiln's
   rounding standing in for that one op); --dry-run does the same here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))   # tests.testmodel: development tooling, not in kiln
WEIGHT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _tokens(model_dir: Path, split: str, samples: int, seq_len: int):
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples

    return token_samples(python_docs(split), AutoTokenizer.from_pretrained(model_dir), samples, seq_len)


def _logits(model, samples, device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids[None].to(device)).logits[0].float().cpu() for ids in samples]


def _compare(reference: list[torch.Tensor], other: list[torch.Tensor], targets) -> dict:
    kl = top1 = nll_ref = nll_other = 0.0
    count = 0
    for ref, oth, ids in zip(reference, other, targets):
        p, q = torch.log_softmax(ref[:-1], -1), torch.log_softmax(oth[:-1], -1)
        kl += (p.exp() * (p - q)).sum().item()
        top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
        nll_ref -= p.gather(1, ids[1:, None]).sum().item()
        nll_other -= q.gather(1, ids[1:, None]).sum().item()
        count += ids.numel() - 1
    ppl_ref, ppl_other = torch.tensor(nll_ref / count).exp().item(), torch.tensor(nll_other / count).exp().item()
    return {"mean_kl": kl / count, "top1_agreement": top1 / count, "ppl_change_pct": (ppl_other / ppl_ref - 1) * 100,
            "max_abs_logit_diff": max((r - o).abs().max().item() for r, o in zip(reference, other))}


def _calibrated(model_dir: Path, config_name: str, calibration, device):
    import modelopt.torch.quantization as mtq

    from kiln.quantize import modelopt_adapter as adapter

    model = adapter.load_source_model(model_dir, "bfloat16", False, False).to(device)
    adapter.calibrate(model, copy.deepcopy(getattr(mtq, config_name)), calibration.to(device), lambda n: None)
    return model


def _capture_inputs(model, layer: str, ids, device) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids[None].to(device))
    handle.remove()
    return seen["x"][0]


def nvfp4_check(model_dir: Path, calibration, evaluation, baseline, device, dry_run: bool, workdir: Path) -> dict:
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.common import nvfp4
    from kiln.validate.reference_loader import load_reference_model

    model = _calibrated(model_dir, "NVFP4_DEFAULT_CFG", calibration, device)
    result = {}
    layer = "model.layers.1.mlp.down_proj"
    if not dry_run:  # ModelOpt's NVFP4 fake-quant forward needs CUDA
        in_memory = copy.deepcopy(model).float()
        modelopt_logits = _logits(in_memory, evaluation, device)
        x = _capture_inputs(in_memory, layer, evaluation[0], device)
        quantizer = in_memory.get_submodule(layer).input_quantizer
        with torch.no_grad():
            theirs = quantizer(x).float().cpu()
            # Effective weights in memory, to compare with what the export stores (fused groups share scales there).
            weights = {name: in_memory.get_submodule(f"model.layers.1.{name}").weight_quantizer(
                in_memory.get_submodule(f"model.layers.1.{name}").weight).float().cpu() for name in WEIGHT_LAYERS}
        del in_memory
    adapter.export_hf(model, workdir / "nvfp4")
    reference = load_reference_model(workdir / "nvfp4")
    kiln_logits = _logits(reference, evaluation, "cpu")
    result["kiln_cpu_vs_baseline"] = _compare(baseline, kiln_logits, evaluation)
    if not dry_run:
        input_scale = reference.get_submodule(layer).input_transform.__defaults__[0]
        mine = nvfp4.fake_quant_activation(x.float().cpu(), input_scale)
        result["modelopt_cuda_vs_baseline"] = _compare(baseline, modelopt_logits, evaluation)
        result["kiln_cpu_vs_modelopt_cuda"] = _compare(modelopt_logits, kiln_logits, evaluation)
        result["weights_export_vs_in_memory"] = {
            name: ((reference.get_submodule(f"model.layers.1.{name}").weight - w).norm() / w.norm()).item()
            for name, w in weights.items()
        }
        result["activation_rounding"] = {
            "layer": layer,
            "relative_difference": ((mine - theirs).norm() / theirs.norm()).item(),
            "fraction_identical": (mine == theirs).float().mean().item(),
        }
    return result


def block_format_check(model_dir: Path, config_name: str, calibration, evaluation, baseline, device, dry_run: bool,
                       workdir: Path) -> dict:
    """ModelOpt's in-memory model (its CUDA block quantizer; kiln's stand-in on a dry run) against kiln's reference
    runtime on the export, and, where activations are quantized, one layer's rounding element by element."""
    import contextlib

    from kiln.quantize import modelopt_adapter as adapter
    from kiln.quantize.auto_precision import block_formats_on_cpu
    from kiln.validate.reference_loader import load_reference_model

    stand_in = block_formats_on_cpu if dry_run else contextlib.nullcontext
    layer = "model.layers.1.mlp.down_proj"
    with stand_in():
        model = _calibrated(model_dir, config_name, calibration, device)
        in_memory = copy.deepcopy(model).float()
        modelopt_logits = _logits(in_memory, evaluation, device)
        x = _capture_inputs(in_memory, layer, evaluation[0], device)
        quantizer = in_memory.get_submodule(layer).input_quantizer
        weight = in_memory.get_submodule(layer).weight.detach()
        weight_quantizer = in_memory.get_submodule(layer).weight_quantizer
        with torch.no_grad():
            theirs = quantizer(x).float().cpu() if quantizer.is_enabled else None
            theirs_weight = weight_quantizer(weight).float().cpu()
    with block_formats_on_cpu(), torch.no_grad():
        mine_weight = copy.deepcopy(weight_quantizer).cpu()(weight.cpu()).float()
    del in_memory
    adapter.export_hf(model, workdir / config_name)
    reference = load_reference_model(workdir / config_name)
    kiln_logits = _logits(reference, evaluation, "cpu")
    result = {"kiln_cpu_vs_baseline": _compare(baseline, kiln_logits, evaluation),
              "modelopt_vs_baseline": _compare(baseline, modelopt_logits, evaluation),
              "kiln_cpu_vs_modelopt": _compare(modelopt_logits, kiln_logits, evaluation),
              "weight_rounding": {"layer": layer,
                                  "fraction_identical": (mine_weight == theirs_weight).float().mean().item(),
                                  "relative_difference": ((mine_weight - theirs_weight).norm()
                                                          / theirs_weight.norm()).item()}}
    if theirs is not None:
        linear = reference.get_submodule(layer)
        mine = linear._transform(x.float().cpu(), linear._stored())
        result["activation_rounding"] = {"layer": layer, "fraction_identical": (mine == theirs).float().mean().item(),
                                         "relative_difference": ((mine - theirs).norm() / theirs.norm()).item()}
    return result


BLOCK_FORMATS = {"mxfp8": "MXFP8_DEFAULT_CFG", "nvfp4_a16": "W4A16_NVFP4_CFG", "mxfp4": "MXFP4_DEFAULT_CFG",
                 "w4a8_nvfp4_fp8": "W4A8_NVFP4_FP8_CFG", "w4a8_mxfp4_fp8": "W4A8_MXFP4_FP8_CFG"}


def fp8_gemm_check(model_dir: Path, calibration, evaluation, device, dry_run: bool, workdir: Path) -> dict:
    import modelopt.torch.quantization as mtq  # noqa: F401  (ensures the same install as the NVFP4 check)

    from kiln.quantize import modelopt_adapter as adapter
    from kiln.validate.reference_loader import load_reference_model

    model = _calibrated(model_dir, "FP8_DEFAULT_CFG", calibration, device)
    adapter.export_hf(model, workdir / "fp8")
    reference = load_reference_model(workdir / "fp8")
    from safetensors.torch import load_file

    tensors = load_file(workdir / "fp8" / "model.safetensors")
    rows = []
    for layer in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        name = f"model.layers.1.{layer}"
        x = _capture_inputs(reference, name, evaluation[0], "cpu").float()
        kiln_out = reference.get_submodule(name)(x)
        weight, w_scale, x_scale = (tensors[f"{name}.{k}"] for k in ("weight", "weight_scale", "input_scale"))
        x8 = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        if dry_run:  # the same arithmetic in float32 on the CPU
            real = (x8.float() @ weight.float().t()) * x_scale * w_scale
        else:
            real = torch._scaled_mm(
                x8.to(device), weight.to(device).t(), scale_a=x_scale.float().to(device),
                scale_b=w_scale.float().to(device), out_dtype=torch.float32,
            ).cpu()
        rows.append({"layer": name, "relative_difference": ((real - kiln_out).norm() / real.norm()).item()})
    return {"layers": rows, "gemm": "emulated on CPU (dry run)" if dry_run else "torch._scaled_mm on " + torch.cuda.get_device_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="trained test model folder (default: train or reuse it)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU, skipping what needs CUDA")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/nvfp4_gpu.py needs a CUDA GPU (use --dry-run to exercise the rest on a CPU)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    device = "cpu" if args.dry_run else "cuda"
    if args.model is None:
        from tests.testmodel import ensure_test_model

        args.model = ensure_test_model()
    from kiln.validate.reference_loader import load_baseline_model

    calibration = _tokens(args.model, "train", 32, 128)
    evaluation = _tokens(args.model, "heldout", 16, 128)
    baseline = _logits(load_baseline_model(args.model), evaluation, "cpu")
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-bench-") as tmp:
        results = {
            "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "nvfp4": nvfp4_check(args.model, calibration, evaluation, baseline, device, args.dry_run, Path(tmp)),
            "fp8": fp8_gemm_check(args.model, calibration, evaluation, device, args.dry_run, Path(tmp)),
            "block_formats": {name: block_format_check(args.model, config, calibration, evaluation, baseline, device,
                                                       args.dry_run, Path(tmp)) for name, config in BLOCK_FORMATS.items()},
        }
    print(f"device: {results['device']}, torch {results['torch']}, 16 held-out samples x 128 tokens")
    print(f"{'NVFP4 comparison':<34} {'KL':>9} {'top-1':>7} {'ppl %':>8} {'max |dlogit|':>13}")
    for label, row in results["nvfp4"].items():
        if "mean_kl" in row:
            print(f"{label:<34} {row['mean_kl']:9.5f} {row['top1_agreement']:7.4f} {row['ppl_change_pct']:+8.3f} "
                  f"{row['max_abs_logit_diff']:13.4f}")
    if "activation_rounding" in results["nvfp4"]:
        act = results["nvfp4"]["activation_rounding"]
        print(f"activation rounding ({act['layer']}): relative difference {act['relative_difference']:.2e}, "
              f"identical elements {act['fraction_identical']:.4f}")
    if "weights_export_vs_in_memory" in results["nvfp4"]:
        print("NVFP4 weights, export vs ModelOpt in memory (relative difference), layer 1:")
        for name, diff in results["nvfp4"]["weights_export_vs_in_memory"].items():
            print(f"  {name:<34} {diff:.2e}")
    print(f"FP8 layers, kiln reference vs {results['fp8']['gemm']}:")
    for row in results["fp8"]["layers"]:
        print(f"  {row['layer']:<34} relative difference {row['relative_difference']:.2e}")
    print(f"{'block formats (ModelOpt ' + ('kiln stand-in' if args.dry_run else 'CUDA') + ')':<34} {'KL':>9} {'top-1':>7} "
          f"{'ppl %':>8} {'max |dlogit|':>13}")
    for name, rows in results["block_formats"].items():
        for label, row in rows.items():
            if "mean_kl" in row:
                print(f"{name + ' ' + label:<34} {row['mean_kl']:9.5f} {row['top1_agreement']:7.4f} "
                      f"{row['ppl_change_pct']:+8.3f} {row['max_abs_logit_diff']:13.4f}")
        for what in ("weight_rounding", "activation_rounding"):
            if what in rows:
                row = rows[what]
                print(f"  {name} {what.replace('_', ' ')} ({row['layer']}): identical elements "
                      f"{row['fraction_identical']:.4f}, relative difference {row['relative_difference']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
