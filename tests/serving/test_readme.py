"""The README's catalog examples load, and its error table names exactly the codes in use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aigen.serving.base import ERRORS_BY_CODE
from aigen.serving.catalog import load_models_file

README = Path(__file__).parents[2] / "README.md"


def _models_section() -> str:
    text = README.read_text()
    start = text.index("\n## Models\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", _models_section(), re.DOTALL)


@pytest.mark.parametrize("block", TOML_BLOCKS)
def test_catalog_example_loads(block: str, tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(block)
    specs = load_models_file(path)
    assert specs
    assert {spec.provider for spec in specs} <= {"local", "openai", "http"}


def test_examples_cover_every_kind_of_server() -> None:
    text = "".join(TOML_BLOCKS).lower()
    for needle in ('provider = "local"', 'provider = "openai"', 'provider = "http"'):
        assert needle in text
    for needle in ("vllm", "11434", "llama_cpp.server", "n8n"):  # vLLM, Ollama, llama.cpp
        assert needle in text


def test_error_table_lists_the_codes() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (true|false) \|", _models_section(), re.MULTILINE)
    table = dict(rows)
    for code, error in ERRORS_BY_CODE.items():
        assert table[code] == str(error.retryable).lower()
    # The catch-all and the codes the workflow and the backend set themselves.
    assert set(table) == {
        *ERRORS_BY_CODE,
        "provider_error",
        "unknown_model",
        "deadline_exceeded",
        "internal_error",
        "worker_lost",
    }
