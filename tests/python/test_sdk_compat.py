"""The published `stacyvm` Python SDK (0.1.1) drives our server unchanged."""

import asyncio

import pytest
import stacyvm
from stacyvm import AsyncClient, Client, SandboxNotFound, StacyVMError
from stacyvm.models import Template


def test_sdk_version_is_the_published_one():
    from importlib.metadata import version

    assert version("stacyvm") == "0.1.1"


def test_health_providers_and_summaries(server):
    with Client(server) as c:
        assert c.health()["status"] == "ok"
        names = [p["name"] for p in c.providers()]
        assert names, "at least one provider"
        assert any(p["default"] for p in c.providers())
        summary = c.quota_summary()
        assert isinstance(summary, stacyvm.QuotaSummary)
        assert summary.total == 0
        assert c.pool_status() == {"enabled": False}


def test_admission_decision_parses(server, image):
    with Client(server) as c:
        d = c.admission(image=image, ttl="10m", owner_id="alice")
        assert isinstance(d, stacyvm.SpawnAdmissionDecision)
        assert d.allowed is True
        d = c.admission(ttl="48h")
        assert d.allowed is False and d.reason == "max_ttl"


def test_spawn_exec_files_destroy(server, image):
    with Client(server) as c:
        sb = c.spawn(image=image, ttl="10m", metadata={"suite": "sdk"})
        try:
            assert sb.id.startswith("sb-") and len(sb.id) == 11
            assert sb.state == "running"
            assert sb.image == image
            r = sb.exec("echo $((40+2))")
            assert (r.exit_code, r.stdout, r.stderr) == (0, "42\n", "")
            assert r.duration
            r = sb.exec("echo", args=["$HOME;echo pwned"], mode="argv")
            assert r.stdout == "$HOME;echo pwned\n"
            r = sb.exec("exit 7")
            assert r.exit_code == 7
            r = sb.exec("echo $FOO; pwd", env={"FOO": "bar"}, workdir="/tmp")
            assert r.stdout.splitlines()[0] == "bar"
            with pytest.raises(StacyVMError) as e:
                sb.exec("sleep 5", timeout="300ms")
            assert e.value.code == "TIMEOUT"

            chunks = list(sb.exec_stream("echo one; echo two >&2; echo three"))
            out = "".join(ch.data for ch in chunks if ch.stream == "stdout")
            err = "".join(ch.data for ch in chunks if ch.stream == "stderr")
            assert out == "one\nthree\n" and err == "two\n"

            sb.write_file("/workspace/hello.py", "print(40+2)\n")
            assert sb.read_file("/workspace/hello.py") == "print(40+2)\n"
            sb.write_file("rel/x.txt", "relative", mode="600")
            st = sb.stat_file("/workspace/rel/x.txt")
            assert st["size"] == 8 and st["mode"] == "600" and st["is_dir"] is False
            listing = sb.list_files("/workspace")
            paths = sorted(f["path"] for f in listing)
            assert "/workspace/hello.py" in paths and "/workspace/rel" in paths
            assert sb.glob_files("/workspace/*.py") == ["/workspace/hello.py"]
            assert sb.glob_files("/workspace/*.none") == []
            sb.chmod_file("/workspace/hello.py", "755")
            assert sb.stat_file("/workspace/hello.py")["mode"] == "755"
            sb.move_file("/workspace/hello.py", "/workspace/moved/hello.py")
            assert sb.read_file("/workspace/moved/hello.py") == "print(40+2)\n"
            sb.delete_file("/workspace/moved", recursive=True)
            with pytest.raises(SandboxNotFound):
                sb.read_file("/workspace/moved/hello.py")
            with pytest.raises(StacyVMError) as e:
                sb.read_file("../../etc/passwd")
            assert e.value.code == "BAD_REQUEST"

            before = sb._info["expires_at"]
            sb.extend_ttl("20m")
            assert sb._info["expires_at"] != before
            assert c.get(sb.id).id == sb.id
            assert sb.id in [s.id for s in c.list()]
        finally:
            sb.destroy()
        with pytest.raises(SandboxNotFound):
            c.get(sb.id)
        sb.destroy()  # idempotent


def test_not_found_errors(server):
    with Client(server) as c:
        with pytest.raises(SandboxNotFound):
            c.get("sb-00000000")
        with pytest.raises(SandboxNotFound):
            c.templates.get("no-such-template")


def test_templates_round_trip_and_spawn(server, image):
    with Client(server) as c:
        saved = c.templates.save(Template(name="sdk-tpl", image=image, memory_mb=256, vcpus=1, ttl="15m"))
        assert (saved.name, saved.image, saved.memory_mb) == ("sdk-tpl", image, 256)
        assert "sdk-tpl" in [t.name for t in c.templates.list()]
        assert c.templates.get("sdk-tpl").image == image
        with pytest.raises(StacyVMError) as e:
            c.templates.save(Template(name="sdk-tpl", image=image))
        assert e.value.code == "CONFLICT"
        sb = c.spawn_template("sdk-tpl")
        try:
            assert sb.image == image
            assert c.get(sb.id)._info["memory_mb"] == 256
        finally:
            sb.destroy()
        c.templates.delete("sdk-tpl")
        with pytest.raises(SandboxNotFound):
            c.templates.get("sdk-tpl")


def test_sandbox_context_manager_and_prune(server, image):
    with Client(server) as c:
        with c.spawn(image=image, ttl="5m") as sb:
            assert sb.exec("true").exit_code == 0
            sid = sb.id
        with pytest.raises(SandboxNotFound):
            c.get(sid)
        assert c.prune() >= 0


def test_async_client(server, image):
    async def flow():
        async with AsyncClient(server) as c:
            sb = await c.spawn(image=image, ttl="5m")
            try:
                r = await sb.exec("echo async")
                assert r.stdout == "async\n"
                chunks = [ch async for ch in sb.exec_stream("echo a; echo b")]
                assert "".join(ch.data for ch in chunks) == "a\nb\n"
                await sb.write_file("/workspace/a.txt", "A")
                assert await sb.read_file("/workspace/a.txt") == "A"
                assert [s.id for s in await c.list() if s.id == sb.id] == [sb.id]
            finally:
                await sb.destroy()
            with pytest.raises(SandboxNotFound):
                await c.get(sb.id)

    asyncio.run(flow())
