"""Provider options (`[models.options]` in the catalog file), one model per provider.

They are checked when the catalog loads, so a typo in `aigen.toml` stops start-up instead
of failing jobs later; providers parse them again to get typed values.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import ERRORS_BY_CODE


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScriptedOptions(_Options):
    """Options of the scripted test double (`serving.scripted`)."""

    output: str | None = None  # the text answer; default echoes the prompt
    latency_ms: float = Field(default=0, ge=0)
    fail_rate: float = Field(default=0, ge=0, le=1)
    fail_code: str = "provider_unavailable"
    fail_times: int = Field(default=0, ge=0)  # fail the first N calls, then succeed
    seed: int | None = None  # makes `fail_rate` repeatable
    dimensions: int = Field(default=8, ge=1, le=4096)  # embedding vector size

    @field_validator("fail_code")
    @classmethod
    def _known_code(cls, value: str) -> str:
        if value not in ERRORS_BY_CODE:
            raise ValueError(f"fail_code must be one of {sorted(ERRORS_BY_CODE)}")
        return value


class OpenAIOptions(_Options):
    """Options of an OpenAI or OpenAI-compatible model (vLLM, Ollama, llama.cpp server)."""

    base_url: str | None = None  # default: AIGEN_OPENAI_BASE_URL, then OpenAI's
    model: str | None = None  # the upstream model's own name; default: the public name
    api_key_env: str | None = None  # variable holding the key; default OPENAI_API_KEY
    timeout: float | None = Field(default=None, gt=0)  # seconds; default: the settings'
    # Text by streaming, so the job shows progress. Servers that stream no usage (the
    # `llama_cpp.server` of llama-cpp-python) are billed from the chunks counted; turn
    # streaming off for their exact token counts.
    stream: bool = True


class HTTPOptions(_Options):
    """Options of a model served by any HTTP endpoint that takes the job as JSON."""

    url: str
    timeout: float | None = Field(default=None, gt=0)
    auth_header: str = "Authorization"
    auth_env: str | None = None  # variable whose value is sent verbatim in `auth_header`


class LocalOptions(_Options):
    """Options of the CPU models of the `[local]` extra."""

    n_ctx: int = Field(default=2048, ge=64)
    n_threads: int = Field(default=2, ge=1)


OPTIONS_BY_PROVIDER: dict[str, type[_Options]] = {
    "scripted": ScriptedOptions,
    "openai": OpenAIOptions,
    "http": HTTPOptions,
    "local": LocalOptions,
}


def check_options(provider: str, options: dict[str, Any]) -> None:
    """Raise `pydantic.ValidationError` when `options` do not fit `provider`."""
    OPTIONS_BY_PROVIDER[provider].model_validate(options)
