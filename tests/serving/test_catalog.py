from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from aigen.serving import catalog as catalog_module
from aigen.serving.base import InvalidProviderInput, ProviderMisconfigured, ProviderRequest
from aigen.serving.catalog import Catalog, CatalogError, ModelSpec, UnknownModelError
from aigen.serving.metered import MeteredProvider
from aigen.serving.scripted import ScriptedProvider
from tests.conftest import make_settings

MODELS_TOML = """
[[models]]
name = "echo"
provider = "scripted"
task = "text"
price_per_request = 2
[models.options]
output = "hello"

[[models]]
name = "gpt-4o-mini"          # replaces the built-in entry
provider = "openai"
task = "text"
price_per_1k_output_tokens = 9
[models.options]
base_url = "http://127.0.0.1:9/v1"
model = "qwen"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _no_stray_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The catalog reads ./aigen.toml; tests run where there is none.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


class TestBuiltins:
    def test_nothing_without_key_or_local(self, tmp_path: Path) -> None:
        assert Catalog(make_settings(tmp_path)).list() == []

    def test_openai_with_key(self, tmp_path: Path) -> None:
        catalog = Catalog(make_settings(tmp_path, OPENAI_API_KEY="sk-test"))
        names = [spec.name for spec in catalog.list()]
        assert names == ["gpt-4o-mini", "gpt-image-1", "text-embedding-3-small"]
        assert catalog.get("gpt-image-1").task == "image"

    def test_local_when_installed(self, tmp_path: Path) -> None:
        catalog = Catalog(make_settings(tmp_path, local_models=True))
        installed = all(importlib.util.find_spec(name) for name in catalog_module.LOCAL_PACKAGES)
        expected = ["e5-small", "gemma-3-270m"] if installed else []
        assert [spec.name for spec in catalog.list()] == expected


class TestModelsFile:
    def test_adds_and_replaces(self, tmp_path: Path) -> None:
        settings = make_settings(
            tmp_path, OPENAI_API_KEY="sk-test", models_file=_write(tmp_path, MODELS_TOML)
        )
        catalog = Catalog(settings)
        assert catalog.get("echo") == ModelSpec(
            name="echo",
            provider="scripted",
            task="text",
            price_per_request=2,
            options={"output": "hello"},
        )
        replaced = catalog.get("gpt-4o-mini")
        assert replaced.price_per_1k_output_tokens == 9
        assert replaced.options["model"] == "qwen"
        assert len(catalog.list()) == 4

    def test_reads_aigen_toml(self, tmp_path: Path) -> None:
        (tmp_path / "aigen.toml").write_text(MODELS_TOML)
        assert Catalog(make_settings(tmp_path)).get("echo").price_per_request == 2

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(CatalogError, match="cannot read"):
            Catalog(make_settings(tmp_path, models_file=tmp_path / "absent.toml"))

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("[[models]]\nname = 'x'\nprovider = 'scripted'\n", r"models\[0\].*task"),
            ("[[models]]\nname='x'\nprovider='scripted'\ntask='text'\ncolour=1\n", "colour"),
            ("[[models]]\nname='x'\nprovider='magic'\ntask='text'\n", "provider"),
            (
                "[[models]]\nname='x'\nprovider='scripted'\ntask='text'\nprice_per_image=-1\n",
                "price",
            ),
            ("[[models]]\nname='x'\nprovider='http'\ntask='text'\n", "url"),
            ("[[models]]\nname='x'\nprovider='scripted'\ntask='text'\n" * 2, "twice"),
            ("models = 3\n", "array of tables"),
            ("[[models]\n", "cannot read"),
        ],
    )
    def test_invalid(self, tmp_path: Path, text: str, match: str) -> None:
        with pytest.raises(CatalogError, match=match):
            Catalog(make_settings(tmp_path, models_file=_write(tmp_path, text)))


class TestCatalog:
    def test_get_unknown(self) -> None:
        with pytest.raises(UnknownModelError, match="unknown model 'nope'") as caught:
            Catalog().get("nope")
        assert isinstance(caught.value, KeyError)

    def test_explicit_specs_replace_settings(self, tmp_path: Path) -> None:
        spec = ModelSpec(name="gpt-4o-mini", provider="scripted", task="text")
        catalog = Catalog(make_settings(tmp_path, OPENAI_API_KEY="sk-test"), specs=[spec])
        assert catalog.get("gpt-4o-mini") is spec

    def test_from_settings(self, tmp_path: Path) -> None:
        assert Catalog.from_settings(make_settings(tmp_path)).list() == []

    async def test_provider_built_once(self) -> None:
        catalog = Catalog(specs=[ModelSpec(name="echo", provider="scripted", task="text")])
        provider = catalog.provider("echo")
        assert isinstance(provider, MeteredProvider)
        assert isinstance(provider.inner, ScriptedProvider)
        assert catalog.provider("echo") is provider
        await catalog.aclose()
        assert catalog.provider("echo") is not provider

    async def test_provider_of_unknown_model(self) -> None:
        with pytest.raises(UnknownModelError):
            Catalog().provider("nope")

    async def test_missing_module_is_misconfiguration(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(catalog_module.PROVIDER_MODULES, "local", "aigen.serving.absent")
        catalog = Catalog(specs=[ModelSpec(name="gemma", provider="local", task="text")])
        with pytest.raises(ProviderMisconfigured, match=r"aigen\[local\]"):
            catalog.provider("gemma")


class TestMeteredProvider:
    async def test_clamps_usage_to_the_bound(self) -> None:
        spec = ModelSpec(name="echo", provider="scripted", task="text")
        catalog = Catalog(specs=[spec])
        long = " ".join(["word"] * 50)
        request = ProviderRequest("job", "echo", "text", {"prompt": long, "max_tokens": 4})
        result = await catalog.provider("echo").run(request)
        assert result.usage.output_tokens == 4  # the scripted model stops at max_tokens

    async def test_refuses_wrong_task(self) -> None:
        catalog = Catalog(specs=[ModelSpec(name="echo", provider="scripted", task="text")])
        with pytest.raises(InvalidProviderInput, match="does 'text'"):
            await catalog.provider("echo").run(
                ProviderRequest("j", "echo", "image", {"prompt": "x"})
            )
