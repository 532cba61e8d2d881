"""What every stage of one build shares: the plan, the cache, progress, the inputs stages make on first
use (the model folder, token samples, placement, the baseline) and the record of what ran.

The checkpoint stages (run/runner.py) and the per-SM and per-runtime stages (run/targets.py) take this
context explicitly; a stage method is its cache lookup plus what it builds, through `get_or_build`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from kiln import quantize, validate
from kiln.common.allocator import return_freed_memory
from kiln.common.errors import RecipeErrors, UserInputError
from kiln.common.progress import ProgressReporter
from kiln.common.scratch import process_scratch
from kiln.pipeline.plan.cache import StageCache
from kiln.pipeline.data.documents import token_samples
from kiln.pipeline.data.fetch import hub_model
from kiln.pipeline.plan.dag import Plan
from kiln.pipeline.plan.requests import validate_request
from kiln.pipeline.plan.checks import model_problems
from kiln.pipeline.plan.stages import RAN, StageInstance


class BuildContext:
    def __init__(self, plan: Plan, cache: StageCache, progress: ProgressReporter, publish_failed: bool = False,
                 share_names: bool = False):
        self.plan, self.cache, self.progress = plan, cache, progress
        self.loaded = plan.loaded
        self.publish_failed = publish_failed   # publish what fails its gates too, tagged so, with no alias
        self.share_names = share_names         # publish into registry names another recipe/variant owns
        self.ran: list[StageInstance] = []
        self._model_dir: Path | None = None
        self._samples: dict[str, object] = {}
        self._baseline: validate.Baseline | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None   # the baseline's scratch, for this build only
        self._placement: quantize.Placement | None = None
        self._clock = time.monotonic()

    def get_or_build(self, instance: StageInstance, build: Callable[[Path], None]) -> Path:
        """The instance's cache entry, built by `build(folder)` when missing (and then recorded as ran)."""
        entry, built = self.cache.get_or_build(instance.stage, instance.key, instance.material, build)
        if built:
            self.record_ran(instance)
        return entry

    def record_ran(self, instance: StageInstance) -> None:
        """Mark a stage done; its seconds are the wall time since the previous stage finished, so work done
        lazily for it (fetching, tokenizing, the baseline's hidden states) counts where it was needed."""
        now = time.monotonic()
        instance.status, instance.seconds = RAN, round(now - self._clock, 3)
        self._clock = now
        self.ran.append(instance)

    # -- inputs shared by stages, made on first use so a cached build imports no torch --
    def model_dir(self) -> Path:
        if self._model_dir is None:
            if self.plan.local_model is not None:
                self._model_dir = self.plan.local_model.path
            else:
                fetch = self.plan.instance("fetch", "model")
                with self.progress.task(f"fetch {self.loaded.recipe.model.source}", total=None):
                    self._model_dir = hub_model(self.loaded.recipe.model).path
                if not fetch.status.cached:
                    self.record_ran(fetch)
                problems = model_problems(self.loaded, self._model_dir)
                if problems:
                    raise RecipeErrors(problems)
        return self._model_dir

    def samples(self, which: str):
        if which not in self._samples:
            from transformers import AutoTokenizer

            data = self.plan.calibration if which == "calibration" else self.plan.evaluation
            tokenizer = AutoTokenizer.from_pretrained(
                self.model_dir(), trust_remote_code=self.loaded.recipe.model.trust_remote_code
            )
            self._samples[which] = token_samples(data.documents(), tokenizer, data.spec.samples, data.spec.seq_len)
        return self._samples[which]

    def placement(self) -> quantize.Placement:
        """Where calibration, export and validation run, decided once per build (this initialises CUDA)."""
        if self._placement is None:
            from kiln.quantize.placement import host_memory_bytes, visible_gpus

            calibration = self.loaded.recipe.calibration
            try:
                self._placement = quantize.plan_placement(
                    calibration.device, visible_gpus(), calibration.gpu_memory_fraction, host_memory_bytes(),
                    calibration.offload, calibration.max_host_memory)
            except ValueError as exc:
                raise UserInputError(f"{self.loaded.path}: {exc}") from None
            if self._placement.to_disk:
                # A budget is only kept if freed tensors leave the process (kiln.common.allocator).
                return_freed_memory()
            if self._placement.on_gpu:
                names = ", ".join(g.name for g in self._placement.gpus)
                self.progress.log(f"calibrating and validating on {len(self._placement.gpus)} GPU(s): {names}")
        return self._placement

    def baseline(self) -> validate.Baseline:
        if self._baseline is None:
            # Beside the cache (a big disk), in this process's scratch folder: reclaimed even after a SIGKILL.
            self._scratch = tempfile.TemporaryDirectory(prefix="kiln-baseline-", dir=process_scratch(self.plan.home))
            placement = self.placement()
            self._baseline = validate.Baseline(self.model_dir(), Path(self._scratch.name),
                                               validate_request(self.loaded), placement)
        return self._baseline

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
