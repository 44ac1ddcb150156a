from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from aigen.serving.base import Usage
from aigen.serving.inputs import usage_bound
from aigen.serving.metered import clamp
from aigen.serving.spec import ModelSpec


def _spec(**prices: Any) -> ModelSpec:
    return ModelSpec(name="m", provider="scripted", task="text", **prices)


class TestCharge:
    def test_free(self) -> None:
        assert _spec().charge(Usage(input_tokens=1000, output_tokens=1000)) == 0

    def test_per_request(self) -> None:
        assert _spec(price_per_request=3).charge(Usage()) == 3

    def test_rounds_up(self) -> None:
        spec = _spec(price_per_1k_output_tokens=2)
        assert spec.charge(Usage(output_tokens=1)) == 1  # 0.002 credit is still 1
        assert spec.charge(Usage(output_tokens=500)) == 1  # exactly 1
        assert spec.charge(Usage(output_tokens=501)) == 2  # 1.002

    def test_exact_sum(self) -> None:
        spec = _spec(
            price_per_request=1,
            price_per_1k_input_tokens=3,
            price_per_1k_output_tokens=7,
            price_per_image=40,
        )
        usage = Usage(input_tokens=1500, output_tokens=2000, images=2)
        # 1 + 4.5 + 14 + 80 = 99.5 → 100
        assert spec.charge(usage) == 100

    def test_large_numbers_stay_exact(self) -> None:
        spec = _spec(price_per_1k_input_tokens=1)
        assert spec.charge(Usage(input_tokens=10**15 + 1)) == 10**12 + 1


class TestWorstCase:
    def test_text(self) -> None:
        spec = _spec(price_per_request=1, price_per_1k_output_tokens=2)
        # 1 + 256 default max_tokens × 2/1000 = 1.512 → 2
        assert spec.worst_case({"prompt": "hi"}) == 2
        assert spec.worst_case({"prompt": "hi", "max_tokens": 4096}) == 10  # 1 + 8.192

    def test_image(self) -> None:
        spec = ModelSpec(name="i", provider="scripted", task="image", price_per_image=40)
        assert spec.worst_case({"prompt": "cat", "n": 3}) == 120

    def test_embedding(self) -> None:
        spec = ModelSpec(
            name="e", provider="scripted", task="embedding", price_per_1k_input_tokens=1000
        )
        # 1 credit per token: 5 bytes and the template allowance of 32 tokens per text.
        assert spec.worst_case({"text": ["ab", "cde"]}) == 5 + 64

    @pytest.mark.parametrize("seed", range(20))
    def test_charge_never_exceeds_worst_case(self, seed: int) -> None:
        generator = random.Random(seed)
        spec = ModelSpec(
            name="m",
            provider="scripted",
            task=generator.choice(["text", "image", "embedding"]),
            price_per_request=generator.randrange(5),
            price_per_1k_input_tokens=generator.randrange(50),
            price_per_1k_output_tokens=generator.randrange(50),
            price_per_image=generator.randrange(50),
        )
        input = _random_input(spec.task, generator)
        bound = usage_bound(spec.task, input)
        # Any usage a provider reports goes through the catalog's clamp, even absurd ones.
        reported = Usage(
            input_tokens=generator.randrange(-5, 3 * bound.input_tokens + 5),
            output_tokens=generator.randrange(-5, 3 * bound.output_tokens + 5),
            images=generator.randrange(-1, 9),
        )
        assert spec.charge(clamp(reported, bound)) <= spec.worst_case(input)
        assert spec.charge(bound) == spec.worst_case(input)


def _random_input(task: str, generator: random.Random) -> dict[str, Any]:
    words = " ".join(generator.choice(["a", "héllo", "日本", "🙂"]) for _ in range(30))
    if task == "text":
        return {"prompt": words, "max_tokens": generator.randrange(1, 4097)}
    if task == "image":
        return {"prompt": words, "n": generator.randrange(1, 5)}
    return {"text": [words] * generator.randrange(1, 5)}


class TestModelSpec:
    def test_refuses_negative_price(self) -> None:
        with pytest.raises(ValidationError):
            _spec(price_per_request=-1)

    def test_refuses_unknown_provider(self) -> None:
        with pytest.raises(ValidationError):
            ModelSpec(name="m", provider="magic", task="text")  # type: ignore[arg-type]

    def test_refuses_unknown_option(self) -> None:
        with pytest.raises(ValidationError, match="latncy_ms"):
            ModelSpec(name="m", provider="scripted", task="text", options={"latncy_ms": 5})

    def test_prices(self) -> None:
        assert _spec(price_per_image=4).prices() == {
            "price_per_request": 0,
            "price_per_1k_input_tokens": 0,
            "price_per_1k_output_tokens": 0,
            "price_per_image": 4,
        }
