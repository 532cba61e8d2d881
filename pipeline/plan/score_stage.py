"""A size search's score stage: quant auto's per-layer scores, computed once and shared by every candidate budget.

fetch(model) -> score(variant) -> quantize(variant@5b) -> ...
                               -> quantize(variant@6b) -> ...

ModelOpt's auto_quantize calibrates every format and scores every layer group before it solves a budget; what it
computed depends on the model, the formats, the calibration windows, the method and the layers kept 16-bit, not on
the budget. So that is the score stage's key, and each candidate's quantize stage restores the saved search and
only solves its own budget (a fourth budget added to a finished search rescored nothing).
"""

from __future__ import annotations

from kiln import quantize
from kiln.pipeline.plan.cache import StageCache, stage_key
from kiln.pipeline.plan.requests import quantize_request, quantize_tools
from kiln.pipeline.plan.stages import StageInstance, Status, Target
from kiln.pipeline.recipe.schema import Variant

SCORE_VERSION = 1


def score_key_config(request: quantize.QuantizeRequest) -> dict:
    """What the scores depend on: the source as loaded, the formats, the method and score windows, the layers kept
    16-bit. Not the budget, the KV cache (calibrated after the search) or the export's shard size."""
    auto = request.auto
    return {"formats": [q.value for q in auto.formats], "method": auto.method, "score_samples": auto.score_samples,
            "exclude": list(request.exclude), "dtype": request.dtype, "trust_remote_code": request.trust_remote_code,
            "allow_pickle": request.allow_pickle, "calibration_batch_size": request.calibration_batch_size}


def score_instance(plan, cache: StageCache, name: str, variant: Variant, fetch_key: str) -> StageInstance | None:
    """The variant's score stage (None unless it is a quant-auto variant). Its status is settled once its
    candidates' are (settle_score_status)."""
    if variant.auto is None:
        return None
    request = quantize_request(plan.loaded, variant, None, plan.source_config())
    key, material = stage_key("score", SCORE_VERSION,
                              {"request": score_key_config(request), "calibration": plan.calibration.key_config()},
                              {"model": plan.model_digest}, quantize_tools(variant.backend))
    return StageInstance("score", Target(name), key, material, Status.of_cache(cache.intact("score", key)),
                         depends_on=(fetch_key,))


def settle_score_status(score: StageInstance, candidates) -> None:
    """A score stage whose candidates are all cached (or need not run) has nothing to feed: it is not run."""
    if score.status.will_run and not any(q.status.will_run for q, _ in candidates):
        score.status = Status.skip("every candidate's checkpoint is cached or need not be built")
