"""The whole platform (`tests.fixtures.platform`) with more models in its catalog.

The models reach the catalog the way an operator adds them: as `[[models]]` entries of the
file `AIGEN_MODELS_FILE` names. Delays the tests wait on are compressed: the cancel watcher
polls every 50 ms and progress is written as often.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aigen.config import Settings
from aigen.serving.spec import ModelSpec
from tests.fixtures.platform import Platform, start_platform

FAST = {
    "cancel_poll_seconds": 0.05,
    "progress_interval_seconds": 0.05,
    "provider_max_tries": 3,
    "provider_timeout_seconds": 20.0,
}


def models_toml(specs: Iterable[ModelSpec]) -> str:
    """`specs` as a models file; JSON scalars are valid TOML values."""
    lines: list[str] = []
    for spec in specs:
        fields: dict[str, Any] = {"name": spec.name, "provider": spec.provider, "task": spec.task}
        lines += ["[[models]]", *_pairs(fields | spec.prices())]
        if spec.options:
            lines += ["[models.options]", *_pairs(spec.options)]
    return "\n".join(lines) + "\n"


def _pairs(values: dict[str, Any]) -> list[str]:
    return [f"{key} = {json.dumps(value)}" for key, value in values.items()]


@contextlib.asynccontextmanager
async def models_platform(
    settings: Settings, specs: Iterable[ModelSpec], **overrides: Any
) -> AsyncIterator[Platform]:
    """The running platform with `specs` added to its catalog."""
    specs = list(specs)
    path = settings.data_dir / "models.toml"
    path.write_text(models_toml(specs))
    settings = settings.model_copy(update={"models_file": path, **FAST, **overrides})
    running = start_platform(settings)
    platform = await anext(running)
    try:
        for spec in specs:  # the file round-trips: the catalog has exactly these models
            assert platform.deps.catalog.get(spec.name) == spec
        yield platform
    finally:
        await running.aclose()
