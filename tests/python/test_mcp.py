"""The official MCP Python client (`mcp`, pinned in scripts/test) against
StacyVM's MCP server: streamable HTTP at `/mcp` of a real `stacyvm serve`,
and `stacyvm mcp` on stdio against the same server; then, on a server with
OIDC, a viewer's tools are only the read-only ones and the API's scopes
hold for every call.

Moving the pin: install the new version in the venv and run this file.
"""

import asyncio
import os
import textwrap
import time

import httpx2
import jwt
import mcp.types as types
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import launch

ALL_TOOLS = {
    "create_sandbox",
    "list_sandboxes",
    "exec",
    "read_file",
    "write_file",
    "list_files",
    "destroy_sandbox",
}


def text_of(result) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def sandbox_flow(session: ClientSession):
    await session.initialize()
    assert {t.name for t in (await session.list_tools()).tools} == ALL_TOOLS
    r = await session.call_tool("create_sandbox", {"ttl": "5m", "metadata": {"suite": "mcp"}})
    assert not r.is_error, text_of(r)
    sid = r.structured_content["id"]
    try:
        # Output streams as progress while the command runs.
        progress = []

        async def on_progress(p, total, message):
            progress.append(message)

        r = await session.call_tool(
            "exec",
            {"sandbox_id": sid, "command": "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo oops >&2; exit 3"},
            progress_callback=on_progress,
        )
        assert not r.is_error, text_of(r)
        assert r.structured_content["exit_code"] == 3
        assert r.structured_content["stdout"] == "line1\nline2\nline3\n"
        assert r.structured_content["stderr"] == "oops\n"
        assert "exit code 3" in text_of(r)
        assert "".join(progress) == "line1\nline2\nline3\noops\n", progress
        assert len(progress) >= 3, progress

        r = await session.call_tool(
            "write_file", {"sandbox_id": sid, "path": "/workspace/m/a.txt", "content": "hello mcp"}
        )
        assert not r.is_error, text_of(r)
        r = await session.call_tool("read_file", {"sandbox_id": sid, "path": "/workspace/m/a.txt"})
        assert text_of(r) == "hello mcp"
        r = await session.call_tool(
            "read_file", {"sandbox_id": sid, "path": "/workspace/m/a.txt", "encoding": "base64"}
        )
        assert text_of(r) == "aGVsbG8gbWNw"
        r = await session.call_tool("list_files", {"sandbox_id": sid, "path": "/workspace/m"})
        assert [e["name"] for e in r.structured_content["entries"]] == ["a.txt"]
        r = await session.call_tool("list_sandboxes", {})
        assert sid in [s["id"] for s in r.structured_content["sandboxes"]]

        # Bad input: typed tool errors the model can read, nothing else.
        for name, args, want in [
            ("exec", {"sandbox_id": "sb-00000000", "command": "true"}, "HTTP 404 NOT_FOUND"),
            ("read_file", {"sandbox_id": "../../admin", "path": "/etc/passwd"}, "invalid sandbox id"),
            ("read_file", {"sandbox_id": sid, "path": "/workspace/none"}, "HTTP 404"),
            ("read_file", {"sandbox_id": sid, "path": ""}, "HTTP 400"),
            ("list_files", {"sandbox_id": sid, "path": "/workspace/\u0000x"}, "HTTP 400"),
            ("exec", {"sandbox_id": sid}, "invalid arguments"),
            ("exec", {"sandbox_id": sid, "command": "true", "bogus": 1}, "invalid arguments"),
            ("create_sandbox", {"ttl": "soon"}, "HTTP 400"),
        ]:
            r = await session.call_tool(name, args)
            assert r.is_error and want in text_of(r), (name, args, text_of(r))
        with pytest.raises(MCPError):
            await session.call_tool("format_disk", {})
    finally:
        r = await session.call_tool("destroy_sandbox", {"sandbox_id": sid})
        assert not r.is_error, text_of(r)


def test_mcp_over_streamable_http(server):
    async def run():
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=120.0)) as http:
            async with streamable_http_client(server + "/mcp", http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await sandbox_flow(session)

    asyncio.run(run())


def test_mcp_over_stdio(server):
    async def run():
        params = StdioServerParameters(
            command=os.environ["STACYVM_BIN"],
            args=["mcp", "--url", server],
            env={"PATH": os.environ.get("PATH", "")},
        )
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await sandbox_flow(session)

    asyncio.run(run())


def test_mcp_roles_follow_the_api_scopes():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    config = "auth:\n  enabled: true\n  oidc_enabled: true\n  oidc_issuer: https://issuer.test\n" \
        "  oidc_audience: stacyvm\n  oidc_viewer_groups: [viewers]\n  oidc_public_key: |\n" \
        + textwrap.indent(pem, "    ")

    def token(sub, groups):
        claims = {"iss": "https://issuer.test", "aud": "stacyvm", "sub": sub,
                  "groups": groups, "exp": int(time.time()) + 600}
        return jwt.encode(claims, key, algorithm="RS256")

    async def tools_of(url, bearer):
        headers = {"Authorization": f"Bearer {bearer}"}
        async with httpx2.AsyncClient(headers=headers, timeout=30.0) as http:
            async with streamable_http_client(url + "/mcp", http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    names = {t.name for t in (await session.list_tools()).tools}
                    # A viewer calling a tool it cannot see is refused by
                    # the same scope check as the API.
                    r = await session.call_tool("create_sandbox", {})
                    return names, r

    with launch(config_yaml=config) as url:
        # No credential: no MCP at all.
        r = httpx2.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                        headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 401, r.text

        names, r = asyncio.run(tools_of(url, token("vera", ["viewers"])))
        assert names == {"list_sandboxes", "read_file", "list_files"}
        assert r.is_error and "lacks scope api:*" in text_of(r), text_of(r)

        names, r = asyncio.run(tools_of(url, token("uma", [])))
        assert names == ALL_TOOLS
        assert not r.is_error, text_of(r)
        sid = r.structured_content["id"]
        assert r.structured_content["owner_id"] == "uma"
        # Audited like the API: the spawn is uma's, by uma.
        admin = httpx2.get(url + "/api/v1/sandboxes/" + sid,
                           headers={"Authorization": "Bearer " + token("uma", [])})
        assert admin.status_code == 200
        httpx2.delete(url + "/api/v1/sandboxes/" + sid,
                      headers={"Authorization": "Bearer " + token("uma", [])})
