"""A plan's nodes: one stage instance per (stage, target), with its content key and its status.

Targets and statuses are records, not strings parsed back: `Target("fp8", sm="sm90")` prints as
`fp8@sm90` in plans and reports, and a `Status` carries its reason (`skipped: needs an sm90 GPU host`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


PUBLISH_VERSION = 3   # 2: files go to the content-addressed blob store (kiln.registry.blobs); 3: structure.json
PUBLISHED_RECORD = "published.json"


def registry_identity(registry_uri: str) -> str:
    """The registry as publish keys name it: the embedded one is the one in this $KILN_HOME wherever that
    folder lives (a moved home keeps its keys); a server by its URI."""
    return "embedded" if registry_uri.startswith("sqlite:") else registry_uri


@dataclass(frozen=True)
class Target:
    """What a stage instance works on: the model (fetch), a variant, a variant on one SM or runtime, or one
    candidate budget of a quant-auto variant's size search (`mix@5b`)."""

    variant: str
    sm: str | None = None
    runtime: str | None = None
    bits: float | None = None

    def __str__(self) -> str:
        place = self.sm or self.runtime or (f"{self.bits:g}b" if self.bits is not None else None)
        return f"{self.variant}@{place}" if place else self.variant


MODEL = Target("model")   # the fetch stage's target


class State(str, Enum):
    will_run = "will run"
    cached = "cached"
    ran = "ran"
    skipped = "skipped"


@dataclass(frozen=True)
class Status:
    state: State
    reason: str = ""   # why a skipped stage does not run
    detail: str = ""   # what a stage that will run starts from (a killed calibration's last layer)

    @classmethod
    def skip(cls, reason: str) -> Status:
        return cls(State.skipped, reason)

    @classmethod
    def of_cache(cls, intact: bool) -> Status:
        return CACHED if intact else WILL_RUN

    @property
    def skipped(self) -> bool:
        return self.state is State.skipped

    @property
    def cached(self) -> bool:
        return self.state is State.cached

    @property
    def will_run(self) -> bool:
        return self.state is State.will_run

    def __str__(self) -> str:
        if self.skipped:
            return f"skipped: {self.reason}"
        return f"{self.state.value} ({self.detail})" if self.detail else self.state.value


WILL_RUN, CACHED, RAN = Status(State.will_run), Status(State.cached), Status(State.ran)
# The one sentence every stage after publish gives when the variant's checkpoint failed its gates.
NOT_PUBLISHED = Status.skip("the checkpoint is not published (gate failed)")


@dataclass
class StageInstance:
    stage: str
    target: Target
    key: str
    material: dict
    status: Status = WILL_RUN
    depends_on: tuple[str, ...] = ()
    seconds: float | None = None    # wall time, once it ran

    def as_dict(self) -> dict:
        document = {"stage": self.stage, "target": str(self.target), "key": self.key, "status": str(self.status),
                    "depends_on": list(self.depends_on)}
        if self.seconds is not None:
            document["seconds"] = self.seconds
        return document
