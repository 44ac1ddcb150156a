"""`as_loaded`: a row from a Core `RETURNING` becomes the session's object, as a query
with `populate_existing` would have given it."""

from __future__ import annotations

from aigen.backend.job import service as job_service
from aigen.db.base import build
from aigen.db.session import unit_of_work
from aigen.models import Job
from tests.fixtures.platform import Api


async def test_the_object_in_the_session_is_brought_up_to_date(api: Api) -> None:
    job_id, _ = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        held = await session.get(Job, job_id)
        assert held is not None
        assert held.status == "pending"
        claimed = await job_service.claim(session, job_id)
        assert claimed is held
        assert (held.status, held.attempt) == ("processing", 1)
        assert held.processing_at is not None
        assert not session.dirty  # as loaded: nothing to write back


async def test_a_new_object_is_in_the_session_and_its_changes_are_saved(api: Api) -> None:
    job_id, _ = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        claimed = await job_service.claim(session, job_id)
        assert claimed is not None
        assert claimed in session
        assert not session.dirty
        assert claimed.input == {"a": 1}
        assert claimed.meta is None  # a column whose attribute has another name
        claimed.progress = {"step": 3}
    async with api.deps.sessionmaker() as session:
        stored = await session.get(Job, job_id)
        assert stored is not None
        assert (stored.status, stored.progress) == ("processing", {"step": 3})


def test_build_gives_the_object_the_constructor_would() -> None:
    values = {
        "id": "job_built",
        "account_id": "acc_1",
        "api_key_id": "key_1",
        "model": "m",
        "task": "text",
        "input": {"prompt": "hi"},
        "status": "pending",
        "attempt": 0,
        "meta": {"tag": "x"},
        "credits_reserved": 5,
    }
    built, constructed = build(Job, values), Job(**values)
    for attribute in Job.__mapper__.column_attrs:
        assert getattr(built, attribute.key) == getattr(constructed, attribute.key)
    # Not given: None, as on a constructed object.
    assert built.progress is None
    assert built.completed_at is None


async def test_a_built_object_added_to_a_session_is_inserted(api: Api) -> None:
    job_id, account_id = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        stored = await session.get(Job, job_id)
        assert stored is not None
        values = {c.key: getattr(stored, c.key) for c in Job.__mapper__.column_attrs}
        session.add(build(Job, {**values, "id": "job_copy", "meta": {"copy": True}}))
    async with api.deps.sessionmaker() as session:
        copy = await session.get(Job, "job_copy")
        assert copy is not None
        assert (copy.account_id, copy.meta) == (account_id, {"copy": True})
