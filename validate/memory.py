"""The validate stage's peak memory, from config.json alone (kiln.common.memory.ModelShape): the baseline (stored
16-bit, float32 math), then the exported checkpoint as stored (never both), and blocks of float32 logits
(kiln.validate.heads). Under `calibration.offload: disk` it runs layer by layer (kiln.validate.layerwise): the
embeddings, the head, one layer and the evaluation batch's hidden states."""

from __future__ import annotations

from kiln.common.memory import GB, RUNTIME_BYTES, DiskOffload, ModelShape, OffloadedWeights, StageMemory, on_gpus_first
from kiln.validate.records import LOGIT_BLOCK_BYTES


def peak_memory(shape: ModelShape, dtype_bytes: int, evaluation_seq_len: int, exported_bytes: int,
                min_weight_bits: float, gpu_caps: tuple[int, ...] = (), offload: DiskOffload | None = None) -> StageMemory:
    """Validation's peak for a model whose largest export is `exported_bytes` and narrowest weights
    `min_weight_bits` (kiln.quantize.exported_bytes, min_weight_bits)."""
    block = min(evaluation_seq_len, max(16, LOGIT_BLOCK_BYTES // (4 * shape.vocab))) * shape.vocab * 4
    if offload is not None:
        placed = OffloadedWeights.of(shape, dtype_bytes, gpu_caps, offload)
        hidden_states = 2 * offload.evaluation_tokens * shape.hidden * 4   # every sample's, into and out of a layer
        decoded = 4 * shape.hidden * shape.max_hidden                      # its widest linear, decoded to float32
        # A 4-bit weight decodes through an unpacked copy and a scaled float32 temporary beside its float32 result
        # (measured: 1.30 GB validating that INT4-AWQ checkpoint against 1.23 estimated with one decoded copy).
        decoded *= 3 if min_weight_bits < 8 else 1
        return StageMemory("validate (layer by layer)",
                           RUNTIME_BYTES + placed.edges + placed.layer + decoded + hidden_states + 6 * block, 0,
                           f"{placed.edges / GB:.2f} GB of embeddings and head + one layer (and {decoded / GB:.3f} GB "
                           f"decoded) + {hidden_states / GB:.2f} GB of hidden states + logit blocks",
                           placed.weights - placed.edges)
    # A block of float32 logits for the baseline and the variant, each with its log-softmax and the KL's
    # temporaries (about 6 blocks), the baseline's head weight kept beside the variant, and a batch's activations.
    eval_work = 6 * block + shape.vocab * shape.hidden * dtype_bytes + evaluation_seq_len * 4 * shape.max_hidden * 4
    held = max(shape.params * dtype_bytes, exported_bytes)
    host, gpu = on_gpus_first(held, eval_work, gpu_caps)
    return StageMemory("validate", host, gpu, f"{held / GB:.2f} GB of one model + {eval_work / GB:.2f} GB of logit "
                                              "blocks and the baseline's output head")
