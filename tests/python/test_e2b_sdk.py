"""The official E2B Python SDK (e2b==2.63.0, pinned in scripts/test) against a
real `stacyvm serve`: its control-plane flows, unchanged, with only
`api_url`/`sandbox_url` pointing at StacyVM (docs/e2b.md).

Moving the pin: install the new version in the venv, run this file, and read
the SDK's `api/client/api/sandboxes/*.py` for new routes or fields
(docs/e2b.md, "Wire contract", lists what 2.63 sends and parses).
"""

import asyncio
import datetime
import os
import time

import pytest
from e2b import (
    AsyncSandbox,
    Sandbox,
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

        # Pause freezes it (its memory kept); pausing again is False
        # (E2B's 409); connect resumes it and commands run again.
        sbx.commands.run("echo kept > /tmp/pause-check")
        assert sbx.pause() is True
        assert sbx.pause() is False
        assert sbx.get_info().state == SandboxState.PAUSED
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"suite": "e2b-sdk"}, state=[SandboxState.PAUSED]), **o
        ).next_items()
        assert [s.sandbox_id for s in paused] == [sbx.sandbox_id]
        woken = Sandbox.connect(sbx.sandbox_id, **o)
        assert woken.get_info().state == SandboxState.RUNNING
        assert woken.commands.run("cat /tmp/pause-check").stdout == "kept\n"
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id, **o) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **o)


def test_lifecycle_on_timeout_pause(server):
    """`lifecycle={"on_timeout": "pause"}` (the API's `autoPause`): the
    timeout pauses instead of killing; connect resumes with the timeout it
    names."""
    import httpx

    o = opts(server)
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"}, **o)
    try:
        sbx.commands.run("echo kept > /tmp/auto-pause")
        time.sleep(2.5)
        # One reaper pass now (the background one runs every 30 s).
        assert httpx.delete(f"{server}/api/v1/sandboxes").status_code == 200
        assert sbx.get_info().state == SandboxState.PAUSED
        woken = Sandbox.connect(sbx.sandbox_id, timeout=60, **o)
        info = woken.get_info()
        assert info.state == SandboxState.RUNNING
        assert abs(seconds_left(info.end_at) - 60) < 10
        assert woken.commands.run("cat /tmp/auto-pause").stdout == "kept\n"
    finally:
        sbx.kill()


def test_lifecycle_auto_resume_off(server):
    """`lifecycle={"auto_resume": False}`: a paused sandbox stays paused
    when envd is called (the call fails) until `connect` resumes it."""
    o = opts(server)
    sbx = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": False}, **o)
    try:
        sbx.commands.run("echo kept > /tmp/manual")
        assert sbx.pause() is True
        with pytest.raises(Exception):
            sbx.commands.run("true")
        assert sbx.get_info().state == SandboxState.PAUSED
        woken = Sandbox.connect(sbx.sandbox_id, **o)
        assert woken.commands.run("cat /tmp/manual").stdout == "kept\n"
    finally:
        sbx.kill()


def test_network_egress_rules_at_create_and_update(server):
    """`network` at create and `update_network` (E2B's `PUT
    /sandboxes/{id}/network`, which replaces the rules): StacyVM's own API
    shows the policy as stored; `allow_internet_access=False` is deny-all;
    a deny rule naming a domain, and request transforms, are refused."""
    import httpx
    from e2b.sandbox.network import ALL_TRAFFIC

    o = opts(server)

    def policy(sid):
        r = httpx.get(f"{server}/api/v1/sandboxes/{sid}/network")
        assert r.status_code == 200, r.text
        return r.json().get("policy")

    sbx = Sandbox.create(
        timeout=120,
        network={"allow_out": ["api.example.com", "1.1.1.1"], "deny_out": [ALL_TRAFFIC]},
        **o,
    )
    try:
        assert policy(sbx.sandbox_id) == {
            "allow_out": ["api.example.com", "1.1.1.1/32"],
            "deny_out": ["0.0.0.0/0"],
        }
        sbx.update_network({"deny_out": [ALL_TRAFFIC], "dns_servers": ["9.9.9.9"]})
        assert policy(sbx.sandbox_id) == {"deny_out": ["0.0.0.0/0"], "dns_servers": ["9.9.9.9"]}
        with pytest.raises(Exception) as bad:
            sbx.update_network({"deny_out": ["evil.example"]})
        assert "deny_out" in str(bad.value)
        with pytest.raises(Exception) as bad:
            sbx.update_network({"allow_out": ["api.example.com"], "rules": {"api.example.com": [{"transform": {"headers": {"X": "y"}}}]}})
        assert "rules" in str(bad.value)
        # The refused updates changed nothing; an empty one clears it.
        assert policy(sbx.sandbox_id) == {"deny_out": ["0.0.0.0/0"], "dns_servers": ["9.9.9.9"]}
        sbx.update_network({})
        assert policy(sbx.sandbox_id) is None
    finally:
        sbx.kill()

    offline = Sandbox.create(timeout=60, allow_internet_access=False, **o)
    try:
        assert policy(offline.sandbox_id) == {"deny_out": ["0.0.0.0/0"]}
    finally:
        offline.kill()


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


def test_commands_and_files_through_envd(server):
    from e2b import CommandExitException

    o = opts(server)
    sbx = Sandbox.create(envs={"FROM_CREATE": "yes", "FOO": "create"}, **o)
    try:
        assert sbx.is_running()
        # Sandbox-wide envs reach every process; a call's own win.
        assert sbx.commands.run("echo $FROM_CREATE").stdout == "yes\n"
        r = sbx.commands.run("echo hello; echo oops >&2")
        assert r.exit_code == 0
        assert r.stdout == "hello\n"
        assert r.stderr == "oops\n"
        seen = []
        r = sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
        assert "".join(seen) == "1\n2\n3\n"
        with pytest.raises(CommandExitException) as e:
            sbx.commands.run("exit 7")
        assert e.value.exit_code == 7
        r = sbx.commands.run("echo $FOO; pwd", envs={"FOO": "bar"}, cwd="/tmp")
        assert r.stdout == "bar\n/tmp\n"

        sbx.files.write("/tmp/e2b/hello.txt", "hi there")
        assert sbx.files.read("/tmp/e2b/hello.txt") == "hi there"
        # gzip=True: a compressed octet-stream upload, inflated by the server.
        sbx.files.write("/tmp/e2b/gz.txt", "zipped " * 1000, gzip=True)
        assert sbx.files.read("/tmp/e2b/gz.txt") == "zipped " * 1000
        assert sbx.files.read("/tmp/e2b/gz.txt", gzip=True) == "zipped " * 1000
        big = bytes(range(256)) * 4096 * 10  # 10 MiB
        sbx.files.write("/tmp/e2b/big.bin", big)
        assert sbx.files.read("/tmp/e2b/big.bin", format="bytes") == big
        sbx.files.write_files([
            {"path": "/tmp/e2b/many/a.txt", "data": "A"},
            {"path": "/tmp/e2b/many/b.txt", "data": "B"},
        ])
        names = sorted(e.name for e in sbx.files.list("/tmp/e2b/many"))
        assert names == ["a.txt", "b.txt"]
        deep = {e.path for e in sbx.files.list("/tmp/e2b", depth=2)}
        assert "/tmp/e2b/many/a.txt" in deep
        assert sbx.files.exists("/tmp/e2b/hello.txt")
        assert not sbx.files.exists("/tmp/e2b/nope")
        info = sbx.files.get_info("/tmp/e2b/hello.txt")
        assert info.size == 8
        assert sbx.files.make_dir("/tmp/e2b/dir") is True
        assert sbx.files.make_dir("/tmp/e2b/dir") is False
        sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/dir/moved.txt")
        assert sbx.files.read("/tmp/e2b/dir/moved.txt") == "hi there"
        sbx.files.remove("/tmp/e2b/dir")
        assert not sbx.files.exists("/tmp/e2b/dir")
        sbx.files.remove("/tmp/e2b/never-was")
    finally:
        sbx.kill()
    assert not sbx.is_running()


def test_envd_needs_the_sandbox_token(server):
    import httpx

    o = opts(server)
    sbx = Sandbox.create(**o)
    other = Sandbox.create(**o)
    try:
        h = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        r = httpx.get(server + "/files", params={"path": "/etc/hostname"}, headers=h)
        assert r.status_code == 401, r.text
        # Another sandbox's token opens nothing here.
        h["X-Access-Token"] = other._envd_access_token
        r = httpx.get(server + "/files", params={"path": "/etc/hostname"}, headers=h)
        assert r.status_code == 401, r.text
        r = httpx.get(server + "/health", headers={"E2b-Sandbox-Id": "sb-00000000"})
        assert r.status_code == 502 and "was not found" in r.json()["message"]
    finally:
        sbx.kill()
        other.kill()


def test_background_processes_stdin_signals_connect_and_pty(server):
    from e2b import CommandExitException
    from e2b.sandbox.commands.command_handle import PtySize

    o = opts(server)
    sbx = Sandbox.create(**o)
    try:
        # Background with stdin: listed, fed, closed, waited for.
        h = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
        assert h.pid in [p.pid for p in sbx.commands.list()]
        sbx.commands.send_stdin(h.pid, "hello\n")
        sbx.commands.close_stdin(h.pid)
        assert h.wait().stdout == "hello\n"
        assert h.pid not in [p.pid for p in sbx.commands.list()]

        # kill: True while it runs, False after.
        h = sbx.commands.run("sleep 60", background=True, timeout=0)
        assert sbx.commands.kill(h.pid) is True
        with pytest.raises(CommandExitException):
            h.wait()
        assert sbx.commands.kill(h.pid) is False

        # A reader that goes away leaves the process running; another
        # reattaches by pid and sees it finish.
        h = sbx.commands.run("sleep 1; echo late", background=True)
        h.disconnect()
        again = sbx.commands.connect(h.pid)
        assert again.wait().stdout == "late\n"

        # A pty: a shell that reads what is typed.
        shell = sbx.pty.create(PtySize(rows=24, cols=80))
        sbx.pty.resize(shell.pid, PtySize(rows=30, cols=100))
        sbx.pty.send_stdin(shell.pid, b"stty size; echo pty-$((6*7)); exit\n")
        seen = []
        shell.wait(on_pty=seen.append)
        out = b"".join(seen)
        assert b"pty-42" in out, out
        assert b"30 100" in out, out
    finally:
        sbx.kill()


def test_default_user_and_root(server):
    from e2b import CommandExitException

    o = opts(server)
    sbx = Sandbox.create(**o)
    try:
        who = sbx.commands.run("whoami; echo $HOME; pwd").stdout.split()
        if os.environ.get("STACYVM_TEST_PROVIDER", "native") == "native":
            # The host image has E2B's `user`; calls act as it by default.
            assert who == ["user", "/home/user", "/home/user"]
            # Relative paths are the user's home; what it writes is its own,
            # parents included.
            sbx.files.write("notes/a.txt", "x")
            assert sbx.files.read("/home/user/notes/a.txt") == "x"
            owners = sbx.commands.run("stat -c '%U:%G' /home/user/notes /home/user/notes/a.txt")
            assert owners.stdout == "user:user\nuser:user\n"
            assert sbx.files.make_dir("made") is True
            assert sbx.commands.run("stat -c %U /home/user/made").stdout == "user\n"
            # It is not root.
            with pytest.raises(CommandExitException):
                sbx.commands.run("touch /etc/planted")
        else:
            # An image without `user` (the busybox test image) runs as root.
            assert who[0] == "root"
        # root when asked, for commands and files.
        assert sbx.commands.run("whoami; echo $HOME; pwd", user="root").stdout == "root\n/root\n/root\n"
        sbx.files.write("/root/r.txt", "r", user="root")
        assert sbx.files.read("~/r.txt", user="root") == "r"
        assert sbx.commands.run("stat -c %U /root/r.txt", user="root").stdout == "root\n"
    finally:
        sbx.kill()


def test_watch_dir_polled_and_streamed(server):
    from e2b.sandbox.filesystem.watch_handle import FilesystemEventType as T

    o = opts(server)
    sbx = Sandbox.create(**o)
    try:
        sbx.files.make_dir("/tmp/w")
        # Polled (sync SDK: CreateWatcher, GetWatcherEvents, RemoveWatcher).
        h = sbx.files.watch_dir("/tmp/w", recursive=True)
        sbx.files.write("/tmp/w/a.txt", "a")
        sbx.commands.run("mkdir /tmp/w/sub && sleep 0.3 && echo b > /tmp/w/sub/b.txt && rm /tmp/w/a.txt")
        want = {
            ("a.txt", T.CREATE),
            ("a.txt", T.WRITE),
            ("sub", T.CREATE),
            ("sub/b.txt", T.CREATE),
            ("a.txt", T.REMOVE),
        }
        seen = set()
        deadline = time.time() + 10
        while not want <= seen and time.time() < deadline:
            seen |= {(e.name, e.type) for e in h.get_new_events()}
            time.sleep(0.1)
        assert want <= seen, seen
        h.stop()

        # Streamed (async SDK: WatchDir), flat: nothing from below.
        async def streamed():
            asbx = await AsyncSandbox.connect(sbx.sandbox_id, **o)
            events = []
            handle = await asbx.files.watch_dir("/tmp/w", events.append)
            await asbx.files.write("/tmp/w/c.txt", "c")
            await asbx.commands.run("echo deep > /tmp/w/sub/d.txt; chmod 600 /tmp/w/c.txt")
            deadline = time.time() + 10
            while ("c.txt", T.CHMOD) not in {(e.name, e.type) for e in events}:
                assert time.time() < deadline, events
                await asyncio.sleep(0.1)
            await handle.stop()
            got = {(e.name, e.type) for e in events}
            assert ("c.txt", T.CREATE) in got and ("c.txt", T.WRITE) in got, got
            assert not any("/" in e.name for e in events), events

        asyncio.run(streamed())
    finally:
        sbx.kill()


def test_signed_file_urls_with_host_routing():
    """The SDK's own signatures (`download_url`/`upload_url`) open one path
    through host routing (`server.e2b_domain`), which such URLs need: they
    carry no sandbox header."""
    import httpx

    from conftest import launch

    with launch(config_yaml="server:\n  e2b_domain: sbx.test\n") as url:
        o = opts(url)
        sbx = Sandbox.create(**o)
        try:
            host = {"Host": f"49983-{sbx.sandbox_id}.sbx.test"}
            up = sbx.upload_url("/tmp/signed.txt", use_signature_expiration=120)
            r = httpx.post(up, headers=host, files={"file": ("/tmp/signed.txt", b"via a signed url")})
            assert r.status_code == 200, r.text
            down = sbx.download_url("/tmp/signed.txt", use_signature_expiration=120)
            r = httpx.get(down, headers=host)
            assert r.status_code == 200 and r.text == "via a signed url", r.text
            # The read URL does not write, nor read another path.
            assert httpx.post(down, headers=host, content=b"x").status_code == 401
            other = down.replace("signed.txt", "other.txt")
            assert httpx.get(other, headers=host).status_code == 401
        finally:
            sbx.kill()
