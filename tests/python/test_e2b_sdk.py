"""The official E2B Python SDK (e2b==2.63.0, pinned in scripts/test) against a
real `stacyvm serve`: its control-plane flows, unchanged, with only
`api_url`/`sandbox_url` pointing at StacyVM (docs/e2b.md).

Moving the pin: install the new version in the venv, run this file, and read
the SDK's `api/client/api/sandboxes/*.py` for new routes or fields
(research/e2b-compat.md §4 lists what 2.63 sends and parses).
"""

import asyncio
import datetime

import pytest
from e2b import (
    AsyncSandbox,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)


def opts(server):
    # Any key works against an open server; with keys configured it is a
    # StacyVM API key.
    return {"api_key": "e2b_0123456789abcdef", "api_url": server, "sandbox_url": server}


def seconds_left(end_at) -> float:
    return (end_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def test_create_info_list_timeout_connect_kill(server):
    o = opts(server)
    sbx = Sandbox.create(timeout=120, metadata={"suite": "e2b-sdk"}, **o)
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"suite": "e2b-sdk"}
        assert info.state == SandboxState.RUNNING
        assert abs(seconds_left(info.end_at) - 120) < 10

        sbx.set_timeout(30)
        assert abs(seconds_left(sbx.get_info().end_at) - 30) < 10

        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-sdk"}), **o).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"suite": "none"}), **o).next_items() == []

        again = Sandbox.connect(sbx.sandbox_id, timeout=300, **o)
        assert again.sandbox_id == sbx.sandbox_id
        assert abs(seconds_left(sbx.get_info().end_at) - 300) < 10

        # No provider pauses yet: a typed SDK exception, not a parse failure.
        with pytest.raises(SandboxException):
            sbx.pause()
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id, **o) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **o)


def test_idempotency_key_and_pagination(server):
    o = opts(server)
    a = Sandbox.create(idempotency_key="sdk-retry-1", metadata={"suite": "e2b-pages"}, **o)
    b = Sandbox.create(idempotency_key="sdk-retry-1", metadata={"suite": "e2b-pages"}, **o)
    c = Sandbox.create(metadata={"suite": "e2b-pages"}, **o)
    try:
        assert a.sandbox_id == b.sandbox_id
        assert c.sandbox_id != a.sandbox_id
        pager = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-pages"}), limit=1, **o)
        seen = []
        while pager.has_next:
            seen += [s.sandbox_id for s in pager.next_items()]
        assert sorted(seen) == sorted([a.sandbox_id, c.sandbox_id])
    finally:
        a.kill()
        c.kill()


def test_async_client(server):
    async def flow():
        o = opts(server)
        sbx = await AsyncSandbox.create(metadata={"suite": "e2b-async"}, **o)
        try:
            info = await sbx.get_info()
            assert info.sandbox_id == sbx.sandbox_id
            await sbx.set_timeout(60)
        finally:
            assert await sbx.kill() is True

    asyncio.run(flow())
