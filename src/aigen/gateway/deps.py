"""Typed request dependencies: the per-request transaction and the app's adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.bootstrap import Deps
from aigen.db.session import unit_of_work

from .state import get_state


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed before the answer is sent, rolled back on error.

    `scope="function"` below makes FastAPI run the commit before it sends the response, so a
    client never sees a 202 for a job whose transaction then failed.
    """
    async with unit_of_work(get_state(request).deps.sessionmaker) as session:
        yield session


def get_deps(request: Request) -> Deps:
    return get_state(request).deps


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
DepsDep = Annotated[Deps, Depends(get_deps)]
