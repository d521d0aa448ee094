"""Starts a real `stacyvm serve` for the SDK compatibility tests.

Environment:
  STACYVM_BIN            path to the stacyvm binary (required)
  STACYVM_TEST_PROVIDER  provider the server runs with (default: native)
  STACYVM_TEST_IMAGE     image to spawn (default: host)
"""

import contextlib
import os
import socket
import subprocess
import tempfile
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch(config_yaml=None, extra_env=None):
    """A `stacyvm serve` on a free loopback port with its own data dir
    (optionally with a config file); yields its URL, stops it after."""
    binary = os.environ.get("STACYVM_BIN")
    if not binary:
        pytest.fail("STACYVM_BIN must point at the stacyvm binary (scripts/test sets it)")
    provider = os.environ.get("STACYVM_TEST_PROVIDER", "native")
    port = _free_port()
    data = tempfile.mkdtemp(prefix="stacyvm-sdk-")
    env = dict(os.environ)
    env.update(
        {
            "STACYVM_SERVER_HOST": "127.0.0.1",
            "STACYVM_SERVER_PORT": str(port),
            "STACYVM_SERVER_DATA_DIR": data,
            "STACYVM_PROVIDERS_DEFAULT": provider,
            "STACYVM_LOGGING_LEVEL": "warn",
        }
    )
    if provider == "mock":
        env["STACYVM_PROVIDERS_MOCK_ENABLED"] = "true"
    env.update(extra_env or {})
    args = [binary, "serve"]
    if config_yaml is not None:
        path = os.path.join(data, "stacyvm.yaml")
        with open(path, "w") as f:
            f.write(config_yaml)
        args += ["--config", path]
    log = open(os.path.join(data, "server.log"), "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            log.flush()
            pytest.fail("stacyvm serve exited early:\n" + open(os.path.join(data, "server.log")).read())
        try:
            if httpx.get(url + "/api/v1/live", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("stacyvm serve did not become live within 30s")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def server():
    with launch() as url:
        yield url


@pytest.fixture(scope="session")
def image() -> str:
    return os.environ.get("STACYVM_TEST_IMAGE", "host")
