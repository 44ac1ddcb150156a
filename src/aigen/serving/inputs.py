"""Job inputs by task (DESIGN §9), validated at `POST /v1/generate`, and their usage bounds.

`validate_input` is what the gateway calls: unknown fields and out-of-range values raise
`InvalidInputError`, which carries pydantic-style error dicts for a 422 answer. Providers
parse the same models again to get typed input, so the defaults live in one place.

`usage_bound` is the largest usage a provider can truthfully report for an input; the
hold is priced on it (`ModelSpec.worst_case`). Why it bounds real usage:

- input tokens: every tokenizer in use (byte-level BPE for OpenAI models, SentencePiece
  with byte fallback for Gemma, WordPiece for E5) spends at least one UTF-8 byte of the
  text per token, so the byte length bounds the tokens of the text itself; a constant per
  text covers what a template adds (BOS/EOS, chat roles, E5's `passage: ` prefix).
- output tokens: every provider passes `max_tokens` to its model, which stops there.
- images: a provider makes exactly `n`.

The catalog also clamps reported usage to this bound (`catalog.MeteredProvider`), so a
provider that miscounts, or a remote server that overstates, can never charge above the
hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .base import TASKS, Usage

# Tokens a prompt template may add around each text: special tokens, chat roles, prefixes.
TEMPLATE_TOKENS = 32
DEFAULT_MAX_TOKENS = 256


class _Input(BaseModel):
    # Strict: JSON numbers and strings keep their type ("5" is not a max_tokens).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextInput(_Input):
    """`text` task: a prompt to answer (chat models) or continue (base models)."""

    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    system: str | None = None


class ImageInput(_Input):
    """`image` task: `n` PNG images of one size from a prompt."""

    prompt: str = Field(min_length=1)
    size: Literal["256x256", "512x512", "1024x1024"] = "1024x1024"
    n: int = Field(default=1, ge=1, le=4)


MAX_TEXTS = 128


class EmbeddingInput(_Input):
    """`embedding` task: one text or a list of up to 128 texts to embed."""

    text: str | list[str]

    @field_validator("text")
    @classmethod
    def _sizes(cls, value: str | list[str]) -> str | list[str]:
        # One check for both forms, so an error names `text` rather than a union branch.
        texts = [value] if isinstance(value, str) else value
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise ValueError(f"give 1 to {MAX_TEXTS} texts")
        if not all(texts):
            raise ValueError("texts must not be empty")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


INPUT_MODELS: dict[str, type[_Input]] = {
    "text": TextInput,
    "image": ImageInput,
    "embedding": EmbeddingInput,
}


class InvalidInputError(ValueError):
    """The input does not fit its task; `errors` are pydantic-style dicts, JSON-safe,
    with `loc` starting at `"input"`."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__(f"invalid input: {describe_errors(errors)}")


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic-style errors on one line: `input.max_tokens: Input should be ...; ...`."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in errors
    )


def parse_input(task: str, input: dict[str, Any]) -> _Input:
    """The typed input of a task; raises `InvalidInputError`."""
    if task not in TASKS:
        raise InvalidInputError(
            [{"type": "task", "loc": ["input"], "msg": f"unknown task {task!r}", "input": task}]
        )
    try:
        return INPUT_MODELS[task].model_validate(input)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        raise InvalidInputError(
            [{**error, "loc": ["input", *error["loc"]]} for error in errors]
        ) from None


def validate_input(task: str, input: dict[str, Any]) -> dict[str, Any]:
    """The input with defaults filled in, as it will be priced and run."""
    return parse_input(task, input).model_dump(exclude_none=True)


def usage_bound(task: str, input: dict[str, Any]) -> Usage:
    """The largest usage a provider can truthfully report for this input (see module doc)."""
    parsed = parse_input(task, input)
    if isinstance(parsed, TextInput):
        texts = [parsed.prompt, parsed.system or ""]
        return Usage(input_tokens=_bytes_bound(texts), output_tokens=parsed.max_tokens)
    if isinstance(parsed, ImageInput):
        return Usage(input_tokens=_bytes_bound([parsed.prompt]), images=parsed.n)
    assert isinstance(parsed, EmbeddingInput)
    return Usage(input_tokens=_bytes_bound(parsed.texts))


def _bytes_bound(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) + TEMPLATE_TOKENS for text in texts)
