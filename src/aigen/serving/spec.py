"""`ModelSpec`: one catalog entry, a public model name with its provider, task and price.

Credits are integers. A job's price is its usage times the price fields, computed in
thousandths of a credit with integer arithmetic and rounded up to a whole credit, so no
float ever touches money and a job with any usage at a non-zero price costs at least 1.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from .base import Usage
from .inputs import describe_errors, usage_bound
from .options import check_options

ProviderKind = Literal["local", "openai", "http", "scripted"]
Task = Literal["text", "image", "embedding"]
Price = Annotated[int, Field(ge=0, strict=True)]

MILLI = 1000  # thousandths of a credit: a per-1k-token price times tokens is exact in them


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ModelSpec:
    """A public model: who serves it (`provider` + `options`), what it does, what it costs."""

    name: Annotated[str, Field(min_length=1)]
    provider: ProviderKind
    task: Task
    price_per_request: Price = 0
    price_per_1k_input_tokens: Price = 0
    price_per_1k_output_tokens: Price = 0
    price_per_image: Price = 0
    # Not hashed: a dict is not hashable, and the name already identifies the entry.
    options: dict[str, Any] = dataclasses.field(
        default=Field(default_factory=dict, validate_default=True), hash=False
    )

    @field_validator("options")
    @classmethod
    def _options_fit_provider(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        provider = info.data.get("provider")  # absent when it was invalid itself
        if provider is not None:
            try:
                check_options(provider, value)
            except ValidationError as exc:
                # As a plain message, so the error is located at `options`.
                raise ValueError(describe_errors(exc.errors(include_url=False))) from None
        return value

    def charge(self, usage: Usage) -> int:
        """Credits for `usage`: the price fields applied to it, rounded up to a whole credit."""
        millis = (
            self.price_per_request * MILLI
            + self.price_per_1k_input_tokens * usage.input_tokens
            + self.price_per_1k_output_tokens * usage.output_tokens
            + self.price_per_image * usage.images * MILLI
        )
        return -(-millis // MILLI)  # ceiling division on integers

    def worst_case(self, input: dict[str, Any]) -> int:
        """The hold for a job: the price of the largest usage it can report.

        `charge` is monotone in every usage field (prices are never negative), and
        reported usage never exceeds `inputs.usage_bound` (see `serving.inputs`), so
        `charge(usage) <= worst_case(input)`. Raises `InvalidInputError` on bad input.
        """
        return self.charge(usage_bound(self.task, input))

    def prices(self) -> dict[str, int]:
        """The four price fields, as `GET /v1/models` shows them."""
        return {
            "price_per_request": self.price_per_request,
            "price_per_1k_input_tokens": self.price_per_1k_input_tokens,
            "price_per_1k_output_tokens": self.price_per_1k_output_tokens,
            "price_per_image": self.price_per_image,
        }
