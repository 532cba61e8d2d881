"""What a recipe cannot build, found before anything runs: from the model folder (its family, the layers its
excludes name, layer widths against block sizes, quant auto budgets out of reach) and from its data files.
`kiln check` and the planner report them, one line each."""

from __future__ import annotations

import json
from pathlib import Path

from kiln import quantize
from kiln.common.errors import UserInputError
from kiln.pipeline.data.documents import resolve_data
from kiln.pipeline.recipe.loader import LoadedRecipe
from kiln.pipeline.data.tasks import task_length_problems, task_problems


def model_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    """What the model folder's config and weights say this recipe cannot build: a family (or family x format)
    the family table does not hold, then block sizes that do not divide some layer's input width."""
    problems = family_problems(loaded, model_dir)
    return problems or exclude_problems(loaded, model_dir) + width_problems(loaded, model_dir) + \
        budget_problems(loaded, model_dir) + task_length_problems(loaded, model_dir) + day0_problems(loaded, model_dir)


def day0_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    """quantize.path: day0 on a model it cannot read (the recipe's own facts were checked as it loaded)."""
    if loaded.recipe.quantize.path is not quantize.QuantizePath.day0:
        return []
    family = quantize.family_of(json.loads((Path(model_dir) / "config.json").read_text()))
    problem = quantize.day0_model_problem(family) or (
        None if any(Path(model_dir).glob("*.safetensors")) else "the model has no *.safetensors files")
    if problem is None:
        return []
    return [f"{loaded.path}: quantize.path: day0 cannot quantize {model_dir}: {problem} (fix: quantize.path: auto)"]


def budget_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    """quant auto budgets below what the formats reach on this model once its excluded layers stay 16-bit."""
    problems = []
    for name, variant in loaded.recipe.variants.items():
        if variant.auto is None:
            continue
        floor = quantize.lowest_budget(model_dir, variant.auto.formats, variant.exclude)
        low = min(variant.auto.candidates)
        if floor is not None and low < floor - 1e-6:
            problems.append(f"{loaded.path}: variants.{name}.auto.effective_bits: {low:g} is below the {floor:.3f} bits "
                            f"per weight {', '.join(q.value for q in variant.auto.formats)} reach on this model with "
                            f"exclude {list(variant.exclude)} kept 16-bit (fix: give at least {floor:.2f}, or exclude "
                            "fewer layers)")
    return problems


def exclude_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    problems = []
    for name, variant in loaded.recipe.variants.items():
        for pattern in quantize.unmatched_excludes(model_dir, variant.exclude):
            problems.append(f"{loaded.path}: variants.{name}.exclude: '{pattern}' matches no module of the model, so "
                            "nothing would be excluded (fix: use module names such as lm_head or *.mlp.down_proj)")
        for pattern in quantize.unmatched_excludes(model_dir, variant.only):
            problems.append(f"{loaded.path}: variants.{name}.only: '{pattern}' matches no module of the model, so "
                            "nothing would be quantized under it (fix: use module names such as *.mlp.experts or "
                            "*.mlp)")
    return problems


def data_problems(loaded: LoadedRecipe) -> list[str]:
    """Calibration and evaluation files that are missing or not regular files, and task YAMLs that cannot be
    read (found by check, not at build)."""
    problems = task_problems(loaded)
    for which in ("calibration", "evaluation"):
        try:
            # The documents are read as a build reads them (the same bounded read), as far as its samples need
            # at about 4 characters a token: check had passed a file that build then refused.
            resolved = resolve_data(getattr(loaded.recipe, which), loaded.resolve, which)
            if getattr(loaded.recipe, which).builtin:
                continue   # ships with CPython: nothing to find unreadable, and building it parses the stdlib (5 s)
            wanted, seen = resolved.spec.samples * resolved.spec.seq_len * 4, 0
            for document in resolved.documents():
                seen += len(document)
                if seen >= wanted:
                    break
        except UserInputError as exc:
            problems.append(f"{loaded.path}: {exc}")
    return problems


def family_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    source_config = json.loads((Path(model_dir) / "config.json").read_text())
    recipe = loaded.recipe
    variants = {name: (v.quant_formats, v.kv_cache) for name, v in recipe.variants.items()}
    found = quantize.family_problems(source_config, variants, recipe.build.target.value, recipe.build.max_seq_len)
    return [f"{loaded.path}: {f'variants.{name}' if name else 'model'}: {problem}" for name, problem in found]


def width_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    """Variants whose block size does not divide some layer's input width, naming the layers (quant auto: each
    format it may give a layer, at its default block size)."""
    problems = []
    for name, variant in loaded.recipe.variants.items():
        for quant in variant.quant_formats:
            group_size = variant.effective_group_size if not variant.is_auto else quantize.FORMATS[quant].default_group_size
            layers = quantize.layer_width_problems(model_dir, quant, group_size, variant.exclude, variant.only)
            if layers:
                fix = "drop it from auto.formats" if variant.is_auto else "choose a group size that divides these widths, or another format"
                problems.append(f"{loaded.path}: variants.{name}: {quant.value} with group size {group_size} "
                                f"cannot pack {', '.join(layers)} (fix: {fix})")
    return problems
