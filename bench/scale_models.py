"""What bench/scale.py and bench/capped.py share: the model sizes, random-initialised Llama models of them, the
calibration windows kiln's recipe gives, and the bare ModelOpt script both compare kiln with."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))   # tests.testmodel trains the tokenizer's model (development tooling, not in kiln)

# hidden, layers, MLP width, heads, KV heads; vocabulary 32000 (Llama-2's). Widths are multiples of 128.
SIZES = {
    "small": (1024, 8, 2816, 8, 8),
    "medium": (1536, 14, 4096, 12, 4),
    "large": (2048, 20, 5632, 16, 8),
}
VOCAB = 32000
SAMPLES, SEQ_LEN = 8, 256
GB = 1e9

BARE = r"""
# The bare ModelOpt calls, as a hand-written script makes them: load, calibrate, both exports.
# Arguments: model folder, calibration tokens, output folder, and optionally "int4_awq" (default FP8 + FP8-KV).
import sys, time, json, copy, warnings
warnings.simplefilter("ignore")
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
from transformers import AutoModelForCausalLM
model_dir, samples_path, out = sys.argv[1:4]
samples = torch.load(samples_path)
seconds = {}
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
seconds["load"] = time.perf_counter() - t
if sys.argv[4:] == ["int4_awq"]:
    config = copy.deepcopy(mtq.INT4_AWQ_CFG)
else:
    config = mtq.update_quant_cfg_with_kv_cache_quant(copy.deepcopy(mtq.FP8_DEFAULT_CFG), mtq.FP8_KV_CFG["quant_cfg"])
def forward_loop(m):
    with torch.no_grad():
        for row in samples:
            m(input_ids=row.unsqueeze(0))
t = time.perf_counter()
mtq.quantize(model, config, forward_loop)
seconds["calibrate"] = time.perf_counter() - t
t = time.perf_counter()
export_hf_checkpoint(model, export_dir=out + "/hf")
export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16, export_dir=out + "/trtllm",
                               inference_tensor_parallel=1)
seconds["export"] = time.perf_counter() - t
print(json.dumps(seconds))
"""


def make_model(folder: Path, size: str) -> int:
    """A random-initialised Llama of this size in bf16, with the demo model's tokenizer; returns its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.testmodel import ensure_test_model

    hidden, layers, mlp, heads, kv_heads = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")
    # The demo tokenizer's ids (< 2048) are valid tokens of this vocabulary.
    AutoTokenizer.from_pretrained(ensure_test_model()).save_pretrained(folder)
    del model
    return params


def calibration_tokens(model: Path, path: Path) -> None:
    """The very token windows kiln's recipe gives (same corpus, tokenizer, samples, length)."""
    import torch
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import BUILTIN_CORPORA
    from kiln.pipeline.data.documents import token_samples

    tokens = token_samples(BUILTIN_CORPORA["python-docs-train"](), AutoTokenizer.from_pretrained(model), SAMPLES, SEQ_LEN)
    torch.save(tokens, path)
