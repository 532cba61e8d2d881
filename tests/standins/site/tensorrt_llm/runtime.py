"""Stand-in for tensorrt_llm.runtime.ModelRunnerCpp (see the package docstring).

Its "engine" runs the HF export that stand-in trtllm-build found beside the checkpoint
(or $KILN_STANDIN_MODEL) through kiln's reference runtime on the CPU.
"""
import json
import os
from pathlib import Path

from tensorrt_llm import perturb, record

_GENERATE_ARGS = {"max_new_tokens", "end_id", "pad_id", "return_dict", "output_sequence_lengths", "streaming",
                  "sampling_config", "lora_uids"}


class ModelRunnerCpp:
    def __init__(self, model, gather_context_logits: bool):
        self._model, self.gather_context_logits = model, gather_context_logits

    @classmethod
    def from_dir(cls, engine_dir: str, rank: int = 0, **kwargs):
        config = json.loads((Path(engine_dir) / "config.json").read_text())
        if not (Path(engine_dir) / f"rank{rank}.engine").is_file():
            raise FileNotFoundError(f"{engine_dir}/rank{rank}.engine")
        record({"tool": "ModelRunnerCpp.from_dir", "engine_dir": engine_dir, "rank": rank})
        if config.get("standin_hf_export"):
            from kiln.validate.reference_loader import load_reference_model

            model = load_reference_model(Path(config["standin_hf_export"]))
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(os.environ["KILN_STANDIN_MODEL"], dtype=torch.float32).eval()
        return cls(model, bool(config["build_config"].get("gather_context_logits")))

    def generate(self, batch_input_ids, **kwargs):
        import torch

        unknown = set(kwargs) - _GENERATE_ARGS
        if unknown:
            raise TypeError(f"generate() got unexpected arguments {sorted(unknown)}")
        outputs = {"output_ids": None}
        if self.gather_context_logits:
            with torch.no_grad():
                logits = [self._model(input_ids=ids.long().unsqueeze(0)).logits[0] for ids in batch_input_ids]
            outputs["context_logits"] = torch.stack([perturb(l) for l in logits])
        return outputs
