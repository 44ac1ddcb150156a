"""`ScriptedProvider`: a test double of the `Provider` port, for tests and benchmarks.

It runs no model. It answers after `latency_ms`, fails as told (`fail_times`, then
`fail_rate`, with `fail_code`), and otherwise makes outputs of the right kind with a
usage counted as a real model would, words standing in for tokens:

- `text` → the `output` option, or the prompt echoed; cut to `max_tokens` words;
- `image` → `n` real 16x16 PNGs, coloured from the prompt (the requested size is not
  drawn: a small valid file is all a test of the pipeline needs);
- `embedding` → `{"data": [[...], ...], "model": ...}`, unit vectors derived from each
  text, so the same text always gets the same vector.

It is never in the built-in catalog; name it in `[[models]]` with `provider = "scripted"`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import struct
import zlib

from aigen.config import Settings

from .base import Output, ProviderRequest, ProviderResult, Usage, error_for_code
from .inputs import EmbeddingInput, ImageInput, TextInput
from .options import ScriptedOptions
from .spec import ModelSpec


class ScriptedProvider:
    """Scripted outputs, latency and failures; `calls` counts the runs so far."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.options = ScriptedOptions.model_validate(spec.options)
        self.calls = 0
        self._random = random.Random(self.options.seed)

    async def run(self, request: ProviderRequest) -> ProviderResult:
        self.calls += 1
        call = self.calls
        if self.options.latency_ms:
            await asyncio.sleep(self.options.latency_ms / 1000)
        failing = call <= self.options.fail_times
        if failing or self._random.random() < self.options.fail_rate:
            raise error_for_code(self.options.fail_code, f"scripted failure on call {call}")
        if self.spec.task == "text":
            return await self._text(request)
        if self.spec.task == "image":
            return self._image(ImageInput.model_validate(request.input))
        return self._embedding(EmbeddingInput.model_validate(request.input))

    async def aclose(self) -> None:
        pass

    async def _text(self, request: ProviderRequest) -> ProviderResult:
        input = TextInput.model_validate(request.input)
        text = self.options.output if self.options.output is not None else input.prompt
        words = text.split()
        if len(words) > input.max_tokens:
            # A real model stops at max_tokens; the usage bound relies on it.
            words = words[: input.max_tokens]
            text = " ".join(words)
        if request.on_progress is not None:
            await request.on_progress({"output_tokens": len(words)})
        usage = Usage(
            input_tokens=len(input.prompt.split()) + len((input.system or "").split()),
            output_tokens=len(words),
        )
        return ProviderResult([Output(text.encode(), "text/plain; charset=utf-8", "txt")], usage)

    def _image(self, input: ImageInput) -> ProviderResult:
        outputs = []
        for index in range(input.n):
            digest = hashlib.sha256(f"{index}:{input.prompt}".encode()).digest()
            outputs.append(Output(tiny_png(16, 16, digest[:3]), "image/png", "png"))
        return ProviderResult(
            outputs, Usage(input_tokens=len(input.prompt.split()), images=input.n)
        )

    def _embedding(self, input: EmbeddingInput) -> ProviderResult:
        vectors = [_unit_vector(text, self.options.dimensions) for text in input.texts]
        body = json.dumps({"data": vectors, "model": self.spec.name}).encode()
        tokens = sum(len(text.split()) for text in input.texts)
        return ProviderResult(
            [Output(body, "application/json", "json")], Usage(input_tokens=tokens)
        )


def tiny_png(width: int, height: int, rgb: bytes) -> bytes:
    """A valid PNG of one colour (8-bit RGB), written by hand: no imaging library needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    row = b"\x00" + rgb[:3] * width  # filter type 0 (none), then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _unit_vector(text: str, dimensions: int) -> list[float]:
    generator = random.Random(text)  # seeded by the text: same text, same vector
    vector = [generator.uniform(-1, 1) for _ in range(dimensions)]
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def create_provider(spec: ModelSpec, settings: Settings | None) -> ScriptedProvider:
    """The catalog's factory (see `catalog.PROVIDER_MODULES`)."""
    return ScriptedProvider(spec)
