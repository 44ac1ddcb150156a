from __future__ import annotations

import json
import struct
import time
import zlib
from typing import Any

import pytest

from aigen.serving.base import (
    ContentRejected,
    ProviderError,
    ProviderRequest,
    ProviderUnavailable,
    Usage,
)
from aigen.serving.scripted import ScriptedProvider, tiny_png
from aigen.serving.spec import ModelSpec


def _provider(task: str = "text", **options: Any) -> ScriptedProvider:
    return ScriptedProvider(ModelSpec(name="s", provider="scripted", task=task, options=options))  # type: ignore[arg-type]


def _request(task: str, **input: Any) -> ProviderRequest:
    return ProviderRequest(job_id="job", model="s", task=task, input=input)


def _png_size(data: bytes) -> tuple[int, int]:
    """Walk the chunks, checking every CRC and the image data, as a decoder would."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, kinds, idat = 8, [], b""
    width = height = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        if kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
    return width, height


class TestText:
    async def test_echoes_the_prompt(self) -> None:
        result = await _provider().run(_request("text", prompt="say hello world"))
        [output] = result.outputs
        assert output.data == b"say hello world"
        assert (output.content_type, output.ext) == ("text/plain; charset=utf-8", "txt")
        assert result.usage == Usage(input_tokens=3, output_tokens=3)

    async def test_scripted_output_and_system_tokens(self) -> None:
        provider = _provider(output="fixed answer")
        result = await provider.run(_request("text", prompt="q", system="be brief"))
        assert result.outputs[0].data == b"fixed answer"
        assert result.usage == Usage(input_tokens=3, output_tokens=2)

    async def test_stops_at_max_tokens(self) -> None:
        result = await _provider(output="a b c d e").run(_request("text", prompt="q", max_tokens=2))
        assert result.outputs[0].data == b"a b"
        assert result.usage.output_tokens == 2

    async def test_reports_progress(self) -> None:
        seen: list[dict[str, Any]] = []

        async def on_progress(progress: dict[str, Any]) -> None:
            seen.append(progress)

        request = ProviderRequest("job", "s", "text", {"prompt": "one two"}, on_progress)
        await _provider().run(request)
        assert seen == [{"output_tokens": 2}]


class TestImage:
    async def test_valid_pngs(self) -> None:
        result = await _provider("image").run(_request("image", prompt="a red cat", n=3))
        assert len(result.outputs) == 3
        for output in result.outputs:
            assert (output.content_type, output.ext) == ("image/png", "png")
            assert _png_size(output.data) == (16, 16)
        assert result.usage == Usage(input_tokens=3, images=3)

    def test_tiny_png(self) -> None:
        assert _png_size(tiny_png(5, 3, b"\x01\x02\x03")) == (5, 3)


class TestEmbedding:
    async def test_vectors(self) -> None:
        provider = _provider("embedding", dimensions=4)
        result = await provider.run(_request("embedding", text=["a b", "c", "a b"]))
        [output] = result.outputs
        assert (output.content_type, output.ext) == ("application/json", "json")
        body = json.loads(output.data)
        assert body["model"] == "s"
        first, second, third = body["data"]
        assert len(first) == 4
        assert sum(value * value for value in first) == pytest.approx(1.0)
        assert first == third != second
        assert result.usage == Usage(input_tokens=5)

    async def test_single_text(self) -> None:
        result = await _provider("embedding").run(_request("embedding", text="hello"))
        assert len(json.loads(result.outputs[0].data)["data"]) == 1


class TestLatency:
    async def test_waits(self) -> None:
        started = time.perf_counter()
        await _provider(latency_ms=50).run(_request("text", prompt="x"))
        assert time.perf_counter() - started >= 0.045


class TestFailures:
    async def test_fail_times_then_succeed(self) -> None:
        provider = _provider(fail_times=2)
        for _ in range(2):
            with pytest.raises(ProviderUnavailable) as caught:
                await provider.run(_request("text", prompt="x"))
            assert caught.value.retryable
        assert (await provider.run(_request("text", prompt="x"))).outputs
        assert provider.calls == 3

    async def test_permanent_code(self) -> None:
        with pytest.raises(ContentRejected) as caught:
            await _provider(fail_rate=1, fail_code="content_rejected").run(
                _request("text", prompt="x")
            )
        assert not caught.value.retryable
        assert caught.value.as_error()["code"] == "content_rejected"

    async def test_fail_rate_is_repeatable_with_a_seed(self) -> None:
        async def outcomes() -> list[bool]:
            provider = _provider(fail_rate=0.5, seed=7)
            results = []
            for _ in range(40):
                try:
                    await provider.run(_request("text", prompt="x"))
                    results.append(True)
                except ProviderError:
                    results.append(False)
            return results

        first = await outcomes()
        assert first == await outcomes()
        assert 5 < first.count(False) < 35

    def test_unknown_code_is_refused(self) -> None:
        with pytest.raises(ValueError, match="fail_code"):
            _provider(fail_code="teapot")
