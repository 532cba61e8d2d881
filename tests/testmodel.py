"""Small models trained on real offline text: the demo model (a Llama) and one per model family.

They are tiny (layer widths multiples of 64, so every 4-bit format can pack them),
but trained long enough that perplexity means something and quantization error
shows. Training is deterministic for a given corpus and seed; the result is
cached in a folder named by the digest of everything that shapes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.common.digest import canonical_digest
from kiln.common.fsutil import atomic_dir


@dataclass(frozen=True)
class TestModelSpec:
    vocab_size: int = 2048
    # Small enough to train in under two minutes on 2 cores; every width a multiple of 128.
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    # Llama-3 style RoPE, so exporter bugs around rope_theta / rope scaling show.
    rope_theta: float = 500000.0
    rope_factor: float = 4.0
    rope_original_max_positions: int = 256
    max_positions: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 520
    learning_rate: float = 6e-3
    seed: int = 0
    # The weights depend on the thread count (one thread trained another model than two on the same CPU), so
    # training always uses this many, whatever the caller's OMP_NUM_THREADS (test workers run with one).
    threads: int = 2
    corpus: str = "python-docs-train"
    spec_version: int = 2


def _train_tokenizer(texts: list[str], spec: TestModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def _llama_config(spec: TestModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=spec.rope_theta,
        rope_scaling={
            "rope_type": "llama3",
            "factor": spec.rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": spec.rope_original_max_positions,
        },
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


# A family's small model: (model_type, transformers config class, the fields that make it that family's case).
# The table of them is test material and lives with the tests (tests/family_models.py); the package keeps the
# trainer, which `make demo` needs for the demo model.
FamilyModel = tuple[str, str, dict]


def _family_config(spec: TestModelSpec, tokenizer, family: FamilyModel):
    import transformers

    _, class_name, extra = family
    config_class = getattr(transformers, class_name)
    architecture = class_name.replace("Config", "ForCausalLM")
    return config_class(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=[architecture], **{"tie_word_embeddings": False, **extra},
    )


def _train(spec: TestModelSpec, out: Path, log, family: FamilyModel | None = None) -> None:
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        _train_with(spec, out, log, family)
    finally:
        torch.set_num_threads(threads_before)


def _train_with(spec: TestModelSpec, out: Path, log, family: FamilyModel | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.pipeline.data.corpus import BUILTIN_CORPORA

    torch.manual_seed(spec.seed)
    texts = BUILTIN_CORPORA[spec.corpus]()
    tokenizer = _train_tokenizer(texts, spec)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    stream = torch.tensor(ids, dtype=torch.long)
    n_windows = (len(stream) - 1) // spec.seq_len
    windows = stream[: n_windows * spec.seq_len].view(n_windows, spec.seq_len)

    config = _llama_config(spec, tokenizer) if family is None else _family_config(spec, tokenizer, family)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, spec.steps) / spec.steps)),
    )
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    started = time.monotonic()
    for step in range(spec.steps):
        batch = windows[torch.randint(0, n_windows, (spec.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == spec.steps - 1:
            log(f"  step {step + 1}/{spec.steps}  loss {loss.item():.3f}  ({time.monotonic() - started:.0f}s)")
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {**asdict(spec), **({"family": family[0]} if family else {})}
    (out / "kiln-testmodel.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def training_environment() -> dict:
    """What besides the spec shapes the trained weights: the libraries that train and tokenize, and the CPU's
    vector instructions (AVX2 and AVX-512 hosts train models whose perplexity differs by 2 %)."""
    from importlib.metadata import version

    import torch

    return {"python": sys.version, "torch": version("torch"), "transformers": version("transformers"),
            "tokenizers": version("tokenizers"), "cpu": torch.backends.cpu.get_cpu_capability()}


def spec_digest(spec: TestModelSpec, family: FamilyModel | None = None, environment: dict | None = None) -> str:
    material = {"spec": asdict(spec), **(environment or training_environment())}
    if family is not None:
        name, class_name, extra = family
        material["family"] = [name, [class_name, extra]]
    return canonical_digest(material)


def default_cache_root() -> Path:
    """Where trained models are kept, outside any clone so that every clone and session on this machine reuses
    them: KILN_TEST_MODEL_CACHE, else $XDG_CACHE_HOME/kiln/testmodels (~/.cache/kiln/testmodels)."""
    if os.environ.get("KILN_TEST_MODEL_CACHE"):
        return Path(os.environ["KILN_TEST_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "testmodels"


def ensure_test_model(cache_root: Path | None = None, spec: TestModelSpec = TestModelSpec(), log=None,
                      family: FamilyModel | None = None) -> Path:
    """Return the folder of the trained model (the demo Llama, or `family`'s small model), training it once.
    Concurrent callers (two clones, two test workers) wait for one training instead of repeating it."""
    import fcntl

    log = log or (lambda msg: print(msg, file=sys.stderr))
    name = family[0] if family else None
    dest = Path(cache_root or default_cache_root()) / f"{name or 'llama'}-{spec_digest(spec, family)[:16]}"
    if (dest / "kiln-testmodel.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "kiln-testmodel.json").is_file():   # another process trained it while we waited
            return dest
        log(f"training the {name or 'test'} model into {dest} (once; cached afterwards)")
        with atomic_dir(dest) as tmp:
            _train(spec, tmp, log, family)
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m tests.testmodel DEST_LINK\n"
              "  trains (once) the demo model and points DEST_LINK at it", file=sys.stderr)
        return 2
    link = Path(argv[0])
    model_dir = ensure_test_model()
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(model_dir.resolve(), target_is_directory=True)
    print(link)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
