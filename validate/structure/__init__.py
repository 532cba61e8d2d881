"""Structure checks of an exported checkpoint, before any metric (issue 39): what a few hundred evaluation tokens
cannot see. Each check reads the exported files and the source's, and names the layer or file and what is wrong:

- scales: every scale tensor finite and positive, and normal in its dtype (an E4M3 block scale under a global
  scale may be zero or subnormal: that is NVFP4's own range; an E8M0 exponent may not be 255, its NaN);
- layers: the per-layer formats of hf_quant_config.json and config.json's quantization_config are what the plan
  said, every layer they quantize stores its format's tensors (the reference runtime's codec reads them), none
  they leave alone stores scales, and the recipe's exclude / only patterns hold; towers outside the language model
  (vision, audio) stay 16-bit unless `only` names them;
- untouched: every tensor the format leaves alone (embeddings, norms, excluded layers, towers) is bit-identical to
  the source's (AWQ and SmoothQuant fold their input scales into norms: those must only stay finite);
- experts: every mixture-of-experts expert received at least `calibration.min_expert_tokens` calibration tokens
  (the quantize stage's table in kiln.json);
- files: the tokenizer (vocabulary, special tokens, how a probe text encodes), the chat template, the generation
  config and config.json (but its quantization_config) equal the source's, or differ where the recipe allows it
  (`evaluation.allow_differences`: listed in the report, not refused); tied embeddings stay tied.

Tensors are read one at a time from the memory-mapped files: the checks hold one tensor of each side at once.
"""

from __future__ import annotations

from pathlib import Path

from kiln.validate.structure.records import (
    STRUCTURE, STRUCTURE_VERSION, StructureExpectation, StructureReport, load_structure, write_structure,
)

__all__ = ["check_structure", "StructureExpectation", "StructureReport", "STRUCTURE", "STRUCTURE_VERSION",
           "load_structure", "write_structure", "DIFFERENCES"]

# What a recipe may let the exported files differ from the source in (evaluation.allow_differences): listed, not
# refused. Here rather than in files.py, which imports transformers lazily but is not needed to plan.
DIFFERENCES = ("config", "generation_config", "tokenizer", "chat_template")


def check_structure(hf_dir: Path, source_dir: Path, expected: StructureExpectation) -> StructureReport:
    # torch and transformers load here, when a checkpoint is checked: a cached build never imports them.
    from kiln.validate.structure.files import check_files
    from kiln.validate.structure.tensors import Checkpoint, check_layers, check_scales, check_untouched

    export, source = Checkpoint(Path(hf_dir)), Checkpoint(Path(source_dir))
    checked, problems = {}, []
    files, file_problems, allowed = check_files(Path(hf_dir), Path(source_dir), expected)
    for name, check in (("scales", lambda: check_scales(export)),
                        ("layers", lambda: check_layers(export, source, expected)),
                        ("untouched", lambda: check_untouched(export, source, expected)),
                        ("files", lambda: (files, file_problems)),
                        ("experts", lambda: check_experts(expected))):
        count, found = check()
        checked[name] = count
        problems += found
    return StructureReport(checked, tuple(problems), tuple(allowed))


def check_experts(expected: StructureExpectation) -> tuple[int, list[str]]:
    """Each MoE block whose experts got fewer calibration tokens than the recipe's minimum, experts named."""
    problems = []
    for block, counts in sorted(expected.expert_tokens.items()):
        starved = [(i, n) for i, n in enumerate(counts) if n < expected.min_expert_tokens]
        if starved:
            which = ", ".join(f"{i} ({n})" for i, n in starved)
            problems.append(f"{block}: expert{'s' if len(starved) > 1 else ''} {which} received fewer than "
                            f"min_expert_tokens ({expected.min_expert_tokens}) calibration tokens, so "
                            f"{'their' if len(starved) > 1 else 'its'} scales came from almost nothing (fix: more or "
                            "longer calibration samples, or calibration.all_experts: true, which calibrates every "
                            "expert on every token)")
    return len(expected.expert_tokens), problems

