"""Recipes and the `kiln` command as tests and benches use them (no pytest here: bench/ imports it too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
KILN = Path(sys.executable).with_name("kiln")

# How long a command may take before a test calls it hung rather than slow: a slow host must give a slow pass, not a
# failure, so this is far above what any command takes on a loaded machine of this kind (and below CI's 90 minutes).
HUNG_S = float(os.environ.get("KILN_TEST_HUNG_S", 2400))


def run_kiln(*args, env: dict | None = None, cwd: Path | None = None, timeout: float = HUNG_S) -> subprocess.CompletedProcess:
    """The installed `kiln` command, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def repo_recipe_beside_model(tmp_path: Path, model_dir: Path, recipe: str) -> Path:
    """A copy of recipes/<recipe> whose ../build/demo-model points at `model_dir`, as `make demo` lays it out."""
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "build").mkdir(exist_ok=True)
    link = tmp_path / "build" / "demo-model"
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    copy = tmp_path / "recipes" / recipe
    copy.write_text((REPO / "recipes" / recipe).read_text())
    return copy


DEFAULT_VARIANTS = {
    "fp8": {"quant": "fp8", "kv_cache": "fp8",
            "gates": {"max_ppl_increase_pct": 5, "max_kl": 0.05, "min_top1_agreement": 0.8}},
    "int4-awq": {"quant": "int4_awq",
                 "gates": {"max_ppl_increase_pct": 10, "max_kl": 0.1, "min_top1_agreement": 0.7}},
}


def write_recipe(folder: Path, source: str, variants: dict | None = None, name: str = "t", samples: int = 16,
                 seq_len: int = 128, **sections) -> Path:
    """A recipe file; `sections` may override model fields (model={...}) or add build/publish."""

    model = {"source": source, **sections.pop("model", {})}
    recipe = {
        "kiln": 1,
        "name": name,
        "model": model,
        "calibration": {"builtin": "python-docs-train", "samples": samples, "seq_len": seq_len},
        "evaluation": {"builtin": "python-docs-heldout", "samples": samples, "seq_len": seq_len},
        "variants": variants or DEFAULT_VARIANTS,
        **sections,
    }
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
