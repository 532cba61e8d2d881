"""What a variant's `quant` may say: a format from the formats table, or `auto` with its budget (`auto:`).

Recipes validate formats against the table when they are read, so formats registered after import
(quantize.register_format) are recipes' formats too. `schema.py` holds the rest of the schema.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, PlainSerializer, PlainValidator, StrictBool,
                      StrictFloat, StrictInt, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from kiln.quantize.formats import AUTO, FORMATS, QuantFormat

def _format_in_table(value, extra: tuple[str, ...] = ()) -> QuantFormat | str:
    """A format read from the formats table when a recipe is validated, so formats registered after this
    module was imported (quantize.register_format) are recipes' formats too; or one of `extra`."""
    if isinstance(value, QuantFormat) or value in extra:
        return value
    if isinstance(value, str) and value in QuantFormat:
        return QuantFormat(value)
    names = [f"'{name}'" for name in [quant.value for quant in QuantFormat] + list(extra)]
    raise PydanticCustomError("enum", "Input should be {expected}", {"expected": ", ".join(names[:-1]) + " or " + names[-1]})


def _serialize_quant(quant: QuantFormat | str) -> str:
    return getattr(quant, "value", quant)


FormatName = Annotated[QuantFormat, PlainValidator(_format_in_table),
                       PlainSerializer(_serialize_quant, return_type=str, when_used="json")]
# A variant's `quant`: a format, or "auto" (ModelOpt's per-layer search under the variant's `auto:` budget).
QuantName = Annotated[QuantFormat | str, PlainValidator(lambda value: _format_in_table(value, (AUTO,))),
                      PlainSerializer(_serialize_quant, return_type=str, when_used="json")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Numbers are numbers: pydantic's lax mode read `limit: true` as 1, `score_samples: '8'` as 8 and
# `max_host_memory: true` as 1 byte. These refuse booleans and strings where a number or a flag belongs
# (an int is a number; YAML's unquoted 1e-3 is one too: kiln.pipeline.recipe.loader reads it as YAML 1.2 does).
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Number = StrictFloat
Flag = StrictBool


def _size_not_bool(value):
    if isinstance(value, bool):
        raise PydanticCustomError("byte_size_type", "a size such as 6GiB or a number of bytes, not a boolean")
    return value


HostBytes = Annotated[ByteSize, BeforeValidator(_size_not_bool)]


HALF_BIT = 0.5   # the default search's step between candidate budgets
UNQUANTIZED_BITS = 16.0


def _budgets(value) -> float | tuple[float, ...]:
    """One budget or a list of them, each a number below 16 (16 bits is the unquantized model)."""
    listed = value if isinstance(value, (list, tuple)) else [value]
    for bits in listed:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)):
            raise PydanticCustomError("budget", "{value} is not a number of bits; give a number such as 5.0, or a "
                                      "list such as [4.5, 5.0, 6.0]", {"value": repr(bits)})
        if not 0 < bits < UNQUANTIZED_BITS:
            raise PydanticCustomError("budget", "{value} is not below 16 bits per weight (the unquantized model); "
                                      "give a budget the formats can save on", {"value": bits})
    budgets = tuple(float(b) for b in listed)
    return budgets if isinstance(value, (list, tuple)) else budgets[0]


Budgets = Annotated[float | tuple[float, ...], PlainValidator(_budgets),
                    PlainSerializer(lambda value: list(value) if isinstance(value, (list, tuple)) else value)]


class AutoMethod(str, Enum):
    """How auto precision scores a layer's sensitivity to each format (ModelOpt auto_quantize's `method`)."""

    kl = "kl"              # KL divergence of the quantized model's outputs from the 16-bit model's: forward only
    gradient = "gradient"  # ModelOpt's gradient-based estimate of the loss change: backward passes, more memory

    @property
    def modelopt(self) -> str:
        return {"kl": "kl_div", "gradient": "gradient"}[self.value]


class AutoPrecision(Strict):
    """`auto:` of a `quant: auto` variant: the formats each layer may take and the size budget of the mix."""

    formats: tuple[FormatName, ...] = Field(min_length=1, description="formats a layer may take (a layer may "
                                            "also stay 16-bit), e.g. [nvfp4, fp8]")
    effective_bits: Budgets | None = Field(
        default=None, description="bits per decoder weight the mix may spend, scales included, as kiln measures "
                                  "checkpoints (lm_head and embeddings stay 16-bit); a list: candidates, built from "
                                  "the smallest up until one passes the gates")
    search: Literal["smallest-passing"] | None = Field(
        default=None, description="smallest-passing: build candidates from the smallest up and publish the first "
                                  "that passes every gate (without effective_bits: every half bit from the "
                                  "cheapest format's size to the largest's)")
    method: AutoMethod = Field(default=AutoMethod.kl, description="kl (forward passes only) or gradient")
    score_samples: PositiveInt | None = Field(default=None, description="calibration windows that score the layers "
                                              "(the first N; default min(16, calibration.samples))")

    @field_validator("formats")
    @classmethod
    def _distinct(cls, formats: tuple[QuantFormat, ...]) -> tuple[QuantFormat, ...]:
        repeated = sorted({q.value for q in formats if formats.count(q) > 1})
        if repeated:
            raise ValueError(f"format(s) {', '.join(repeated)} listed twice; give each format once")
        for quant in formats:
            if not FORMATS[quant].auto_searchable:
                searchable = ", ".join(q.value for q in QuantFormat if FORMATS[q].auto_searchable)
                raise ValueError(f"{quant.value} calibrates with {FORMATS[quant].algorithm}, which ModelOpt's auto_quantize does not "
                                 f"run (fix: search among {searchable})")
        return formats

    @model_validator(mode="after")
    def _reachable(self) -> "AutoPrecision":
        listed = self.effective_bits if isinstance(self.effective_bits, tuple) else (self.effective_bits,)
        if self.effective_bits is None and self.search is None:
            raise ValueError("give effective_bits (a budget, or a list of candidates) or search: smallest-passing")
        if isinstance(self.effective_bits, tuple):
            if not listed:
                raise ValueError("effective_bits is an empty list; give at least one budget")
            repeated = sorted({b for b in listed if listed.count(b) > 1})
            if repeated:
                raise ValueError(f"effective_bits lists {', '.join(f'{b:g}' for b in repeated)} twice; give each once")
        elif self.effective_bits is not None and self.search is not None:
            raise ValueError(f"search: {self.search} needs candidates: give effective_bits as a list, or leave it "
                             "out for every half bit the formats reach")
        cheapest = min(self.formats, key=lambda q: FORMATS[q].weight_bits)
        floor = FORMATS[cheapest].weight_bits
        low = min((b for b in listed if b is not None), default=floor)
        if low < floor:
            formats = ", ".join(q.value for q in self.formats)
            raise ValueError(f"effective_bits {low:g} is below what {formats} can reach ({floor:g}: "
                             f"every layer in {cheapest.value}); give at least {floor:g}, or add a smaller format")
        return self

    @property
    def candidates(self) -> tuple[float, ...]:
        """The budgets to build, smallest first: the one budget, the listed ones, or every half bit from the
        cheapest format's bits to the largest's."""
        if isinstance(self.effective_bits, tuple):
            return tuple(sorted(self.effective_bits))
        if self.effective_bits is not None:
            return (self.effective_bits,)
        sizes = [FORMATS[q].weight_bits for q in self.formats]
        steps = int((max(sizes) - min(sizes)) / HALF_BIT)
        return tuple(min(sizes) + HALF_BIT * i for i in range(steps + 1))

    @property
    def searches(self) -> bool:
        """Several candidates, the first passing one published."""
        return len(self.candidates) > 1


