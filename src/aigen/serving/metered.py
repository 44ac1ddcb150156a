"""`MeteredProvider`: the catalog's wrapper that keeps every provider within the hold."""

from __future__ import annotations

import structlog

from .base import InvalidProviderInput, Provider, ProviderRequest, ProviderResult, Usage
from .inputs import InvalidInputError, usage_bound
from .spec import ModelSpec

logger = structlog.get_logger(__name__)


class MeteredProvider:
    """Checks the input fits the model, runs the provider, and clamps its usage.

    The clamp is what makes `spec.charge(result.usage) <= spec.worst_case(input)` hold for
    every provider, including remote servers that report usage we cannot check.
    """

    def __init__(self, spec: ModelSpec, provider: Provider):
        self.spec = spec
        self.inner = provider

    async def run(self, request: ProviderRequest) -> ProviderResult:
        if request.task != self.spec.task:
            raise InvalidProviderInput(
                f"model {self.spec.name!r} does {self.spec.task!r}, not {request.task!r}"
            )
        try:
            bound = usage_bound(self.spec.task, request.input)
        except InvalidInputError as exc:
            raise InvalidProviderInput(str(exc)) from None
        result = await self.inner.run(request)
        usage = clamp(result.usage, bound)
        if usage != result.usage:
            logger.warning(
                "provider usage above bound",
                job_id=request.job_id,
                model=self.spec.name,
                reported=result.usage.as_dict(),
                charged=usage.as_dict(),
            )
            return ProviderResult(outputs=result.outputs, usage=usage)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def clamp(usage: Usage, bound: Usage) -> Usage:
    """Each usage field cut to its bound (and to zero from below)."""
    return Usage(
        input_tokens=max(0, min(usage.input_tokens, bound.input_tokens)),
        output_tokens=max(0, min(usage.output_tokens, bound.output_tokens)),
        images=max(0, min(usage.images, bound.images)),
    )
