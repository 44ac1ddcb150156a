"""`GET /v1/models`: what can be called, and at what price."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from aigen.gateway.deps import DepsDep

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelOut(BaseModel):
    name: str
    object: Literal["model"] = "model"
    task: str
    provider: str
    price_per_request: int
    price_per_1k_input_tokens: int
    price_per_1k_output_tokens: int
    price_per_image: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


@router.get("", response_model=ModelList)
async def list_models(deps: DepsDep) -> ModelList:
    """The model catalog, with each model's task and prices in credits."""
    return ModelList(
        data=[
            ModelOut(
                name=spec.name,
                task=spec.task,
                provider=spec.provider,
                price_per_request=spec.price_per_request,
                price_per_1k_input_tokens=spec.price_per_1k_input_tokens,
                price_per_1k_output_tokens=spec.price_per_1k_output_tokens,
                price_per_image=spec.price_per_image,
            )
            for spec in deps.catalog.list()
        ]
    )
