"""What the validate stage is asked for: the recipe's settings it reads, each under the recipe's own name.

The plan builds it (kiln.pipeline.plan.requests.validate_request) beside quantize's QuantizeRequest, so a
setting goes down from the recipe to the code that uses it without changing its name on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.quantize import Offload


@dataclass(frozen=True)
class ValidateRequest:
    trust_remote_code: bool = False      # model.trust_remote_code
    allow_pickle: bool = False           # model.allow_pickle: a source whose weights are pickles (the baseline)
    # calibration.offload: with disk, the baseline and the exported checkpoint are read a decoder layer at a time
    # (kiln.validate.layerwise), so validation fits the host budget calibration kept.
    offload: Offload = Offload.none
    allow_code_execution: bool = False   # evaluation.allow_code_execution: tasks that run generated code

    @property
    def layer_by_layer(self) -> bool:
        return self.offload is Offload.disk
