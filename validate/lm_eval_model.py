"""kiln's reference runtime as an lm-evaluation-harness model, registered as "kiln".

It is lm-eval's own `hf` model (HFLM: its batching, tokenization, loglikelihood, loglikelihood_rolling
and generate_until) with one change: the model it runs is what kiln validates, the exported checkpoint
decoded by the reference runtime, or, with `baseline=True`, the unquantized source stored 16-bit with
float32 math. A task score is then a score of exactly the files kiln publishes.

    import lm_eval, kiln.validate.lm_eval_model
    lm_eval.simple_evaluate(model="kiln", model_args={"checkpoint": ".../hf"}, tasks=[...])
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("kiln")
class KilnLM(HFLM):
    def __init__(self, checkpoint: str, baseline: bool = False, tokenizer: str | None = None,
                 trust_remote_code: bool = False, batch_size: int | None = None, max_length: int | None = None,
                 generation_batch_size: int = 1, **kwargs):
        import psutil
        from transformers import AutoTokenizer

        from kiln.common.progress import quiet_libraries
        from kiln.validate.runtime import keep_decoded_weights
        from kiln.validate.reference_loader import load_baseline_model, load_reference_model

        with quiet_libraries():
            model = (load_baseline_model(Path(checkpoint), trust_remote_code) if baseline
                     else load_reference_model(Path(checkpoint), trust_remote_code))
        # lm-eval sends one short request at a time, and generation one token at a time: decoding every weight per
        # call made a 135M model take 0.5 s a request. Decoded once, where half the free memory holds them.
        keep_decoded_weights(model, psutil.virtual_memory().available // 2)
        # The runtime ties a tied head to the embedding as stored (a decoding layer, not a Parameter); HFLM's
        # call to transformers' tie_weights would try to assign a Parameter over it.
        model.tie_weights = lambda *args, **kwargs: None
        tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint, trust_remote_code=trust_remote_code)
        if batch_size is None:
            # Requests scored together: 1.9x faster at 8 on a 135M model, with the same per-document answers.
            # Their float32 logits are requests x tokens x vocabulary, so a large vocabulary gets fewer.
            vocab = model.config.get_text_config().vocab_size
            batch_size = max(1, min(8, (1 << 30) // (4 * vocab * 256)))
        # Generation stays one prompt at a time: batched, left-padded generation measured 4x slower here.
        self._generation_batch_size = generation_batch_size
        super().__init__(pretrained=model.eval(), tokenizer=tok, batch_size=batch_size, max_length=max_length,
                         **kwargs)

    # kiln reports progress per task itself; lm-eval's per-request bars would flood a build's log.
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        scoring, self.batch_size_per_gpu = self.batch_size_per_gpu, self._generation_batch_size
        try:
            return super().generate_until(requests, disable_tqdm=True)
        finally:
            self.batch_size_per_gpu = scoring
