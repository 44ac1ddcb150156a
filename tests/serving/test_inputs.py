from __future__ import annotations

from typing import Any

import pytest

from aigen.serving.base import Usage
from aigen.serving.catalog import InvalidInputError, validate_input
from aigen.serving.inputs import TEMPLATE_TOKENS, usage_bound


def _error_locs(task: str, input: dict[str, Any]) -> list[list[Any]]:
    with pytest.raises(InvalidInputError) as caught:
        validate_input(task, input)
    return [error["loc"] for error in caught.value.errors]


class TestValidateInput:
    def test_text_fills_defaults(self) -> None:
        assert validate_input("text", {"prompt": "hi"}) == {"prompt": "hi", "max_tokens": 256}

    def test_text_keeps_given_fields(self) -> None:
        input = {"prompt": "hi", "max_tokens": 8, "temperature": 0.5, "system": "be brief"}
        assert validate_input("text", input) == input

    def test_unknown_field(self) -> None:
        assert _error_locs("text", {"prompt": "hi", "top_k": 3}) == [["input", "top_k"]]

    @pytest.mark.parametrize(
        ("input", "loc"),
        [
            ({"prompt": ""}, ["input", "prompt"]),
            ({"prompt": "hi", "max_tokens": 0}, ["input", "max_tokens"]),
            ({"prompt": "hi", "max_tokens": 4097}, ["input", "max_tokens"]),
            ({"prompt": "hi", "max_tokens": "8"}, ["input", "max_tokens"]),
            ({"prompt": "hi", "max_tokens": True}, ["input", "max_tokens"]),
            ({"prompt": "hi", "temperature": 2.5}, ["input", "temperature"]),
            ({"prompt": "hi", "temperature": -0.1}, ["input", "temperature"]),
            ({"max_tokens": 8}, ["input", "prompt"]),
        ],
    )
    def test_text_out_of_range(self, input: dict[str, Any], loc: list[Any]) -> None:
        assert _error_locs("text", input) == [loc]

    def test_image(self) -> None:
        assert validate_input("image", {"prompt": "a cat"}) == {
            "prompt": "a cat",
            "size": "1024x1024",
            "n": 1,
        }

    @pytest.mark.parametrize(
        ("input", "loc"),
        [
            ({"prompt": "a cat", "size": "100x100"}, ["input", "size"]),
            ({"prompt": "a cat", "n": 5}, ["input", "n"]),
            ({"prompt": "a cat", "n": 0}, ["input", "n"]),
            ({"prompt": "a cat", "style": "vivid"}, ["input", "style"]),
        ],
    )
    def test_image_out_of_range(self, input: dict[str, Any], loc: list[Any]) -> None:
        assert _error_locs("image", input) == [loc]

    @pytest.mark.parametrize("text", ["one", ["one", "two"], ["x"] * 128])
    def test_embedding(self, text: str | list[str]) -> None:
        assert validate_input("embedding", {"text": text}) == {"text": text}

    @pytest.mark.parametrize("text", ["", [], [""], ["x"] * 129])
    def test_embedding_out_of_range(self, text: str | list[str]) -> None:
        assert _error_locs("embedding", {"text": text}) == [["input", "text"]]

    def test_unknown_task(self) -> None:
        assert _error_locs("video", {"prompt": "hi"}) == [["input"]]

    def test_message_names_the_fields(self) -> None:
        with pytest.raises(InvalidInputError, match=r"input\.max_tokens"):
            validate_input("text", {"prompt": "hi", "max_tokens": 0})


class TestUsageBound:
    def test_text(self) -> None:
        bound = usage_bound("text", {"prompt": "héllo", "system": "ab", "max_tokens": 9})
        # "héllo" is 6 bytes in UTF-8; a template allowance for the prompt and the system.
        assert bound == Usage(input_tokens=6 + 2 + 2 * TEMPLATE_TOKENS, output_tokens=9)

    def test_text_default_max_tokens(self) -> None:
        assert usage_bound("text", {"prompt": "hi"}).output_tokens == 256

    def test_image(self) -> None:
        bound = usage_bound("image", {"prompt": "cat", "n": 3})
        assert bound == Usage(input_tokens=3 + TEMPLATE_TOKENS, images=3)

    def test_embedding(self) -> None:
        bound = usage_bound("embedding", {"text": ["ab", "cde"]})
        assert bound == Usage(input_tokens=5 + 2 * TEMPLATE_TOKENS)
