#!/usr/bin/env bash
# Certifies a sandbox runtime through the REST API and writes a report.
#
#   scripts/certify-runtime.sh RUNTIME [--format markdown|json] [--output FILE]
#                              [--url URL --key KEY] [--bin PATH]
#
# RUNTIME is a provider name (native, docker, mock) or docker:<oci-runtime>
# (docker:runc, docker:runsc, docker:runsc-hostuds, docker:kata-runtime).
# Without --url the script starts `stacyvm serve` (from --bin, $STACYVM_BIN
# or PATH) on a free loopback port with a temporary data dir and an API key,
# configured for RUNTIME, and stops it afterwards. With --url it tests that
# server (the provider must be registered there; an OCI runtime cannot be
# chosen per request).
#
# Checks: spawn, exit codes, stdout/stderr separation, env and workdir,
# exec timeout, file API round trip and visibility to commands, PID
# namespace, no CAP_SYS_ADMIN, /proc/sys read-only, destroy; informational:
# network egress, exec latency. Exit 0 when every required check passes,
# 1 otherwise, 2 on usage or startup errors.
set -uo pipefail

usage() {
  echo "usage: $0 RUNTIME [--format markdown|json] [--output FILE] [--url URL --key KEY] [--bin PATH]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
RUNTIME=$1
shift
FORMAT=markdown
OUTPUT=-
URL=
KEY=
BIN=${STACYVM_BIN:-}
while [ $# -gt 0 ]; do
  case $1 in
    --format) FORMAT=${2-}; shift 2 || usage ;;
    --output) OUTPUT=${2-}; shift 2 || usage ;;
    --url) URL=${2-}; shift 2 || usage ;;
    --key) KEY=${2-}; shift 2 || usage ;;
    --bin) BIN=${2-}; shift 2 || usage ;;
    *) usage ;;
  esac
done
case $FORMAT in markdown|json) ;; *) echo "error: --format must be markdown or json" >&2; exit 2 ;; esac
case $RUNTIME in
  native|docker|mock) PROVIDER=$RUNTIME; OCI= ;;
  docker:?*) PROVIDER=docker; OCI=${RUNTIME#docker:} ;;
  *) echo "error: unknown runtime $RUNTIME (native, docker, mock, docker:<oci-runtime>)" >&2; exit 2 ;;
esac
command -v python3 >/dev/null || { echo "error: python3 is required" >&2; exit 2; }

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

if [ -z "$URL" ]; then
  if [ -z "$BIN" ]; then BIN=$(command -v stacyvm || true); fi
  [ -n "$BIN" ] && [ -x "$BIN" ] || { echo "error: no stacyvm binary (use --bin or STACYVM_BIN)" >&2; exit 2; }
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  KEY=certify-$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  (
    cd "$TMP" || exit 1
    export STACYVM_SERVER_HOST=127.0.0.1 STACYVM_SERVER_PORT=$PORT STACYVM_SERVER_DATA_DIR=$TMP/data
    export STACYVM_PROVIDERS_DEFAULT=$PROVIDER STACYVM_AUTH_ENABLED=true STACYVM_AUTH_ADMIN_API_KEY=$KEY
    export STACYVM_LOGGING_LEVEL=warn
    [ "$PROVIDER" = mock ] && export STACYVM_PROVIDERS_MOCK_ENABLED=true
    [ "$PROVIDER" = docker ] && export STACYVM_PROVIDERS_DOCKER_ENABLED=true
    [ -n "$OCI" ] && export STACYVM_PROVIDERS_DOCKER_RUNTIME=$OCI
    exec "$BIN" serve
  ) >"$TMP/server.log" 2>&1 &
  SERVER_PID=$!
  URL=http://127.0.0.1:$PORT
  for _ in $(seq 1 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "error: stacyvm serve exited:" >&2; cat "$TMP/server.log" >&2; SERVER_PID=; exit 2
    fi
    python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1]+"/api/v1/live",timeout=1)' "$URL" 2>/dev/null && break
    sleep 0.2
  done
fi

python3 - "$URL" "$KEY" "$RUNTIME" "$PROVIDER" "$FORMAT" "$OUTPUT" <<'PY'
import datetime, json, statistics, sys, time, urllib.error, urllib.request

url, key, runtime, provider, fmt, output = sys.argv[1:7]
api = url.rstrip("/") + "/api/v1"
results = []


def call(method, path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, method=method)
    if key:
        req.add_header("X-API-Key", key)
        req.add_header("X-Admin-API-Key", key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def record(name, ok, detail, required=True):
    results.append({"check": name, "required": required,
                    "result": ("pass" if ok else "fail") if required else "info",
                    "detail": str(detail)[:300]})


def sh(sid, script, timeout="30s", **extra):
    body = {"command": "sh", "args": ["-c", script], "timeout": timeout}
    body.update(extra)
    return call("POST", f"/sandboxes/{sid}/exec", body)


_, health = call("GET", "/health")
version = health.get("version", "?") if isinstance(health, dict) else "?"
t0 = time.monotonic()
st, sb = call("POST", "/sandboxes", {"provider": provider, "ttl": "10m"})
spawn_ms = (time.monotonic() - t0) * 1000
sid = sb.get("id") if isinstance(sb, dict) else None
record("spawn", st == 201 and bool(sid), f"HTTP {st} in {spawn_ms:.0f} ms" + ("" if sid else f": {sb}"))

if sid:
    st, r = sh(sid, "exit 7")
    record("exit code propagates", st == 200 and r.get("exit_code") == 7, f"HTTP {st} exit_code={r.get('exit_code') if isinstance(r, dict) else r}")
    st, r = sh(sid, "echo out; echo err >&2")
    ok = st == 200 and r.get("stdout", "").strip() == "out" and r.get("stderr", "").strip() == "err"
    record("stdout and stderr separate", ok, f"stdout={r.get('stdout')!r} stderr={r.get('stderr')!r}" if isinstance(r, dict) else r)
    st, r = sh(sid, 'printf "%s %s" "$CERT_VAR" "$(pwd)"', env={"CERT_VAR": "v1"}, workdir="/tmp")
    ok = st == 200 and r.get("stdout") == "v1 /tmp"
    record("env and workdir", ok, f"stdout={r.get('stdout')!r}" if isinstance(r, dict) else r)
    t0 = time.monotonic()
    st, r = sh(sid, "sleep 20", timeout="2s")
    took = time.monotonic() - t0
    record("exec timeout enforced", st == 408 and took < 10, f"HTTP {st} after {took:.1f}s")
    st1, _ = call("POST", f"/sandboxes/{sid}/files", {"path": "/tmp/cert.txt", "content": "certify"})
    st2, data = call("GET", f"/sandboxes/{sid}/files?path=/tmp/cert.txt")
    st3, listing = call("GET", f"/sandboxes/{sid}/files/list?path=/tmp")
    st4, _ = call("GET", f"/sandboxes/{sid}/files/stat?path=/tmp/cert.txt")
    ok = (st1, st2, st3, st4) == (200, 200, 200, 200) and "certify" in str(data) and "cert.txt" in json.dumps(listing)
    record("file API round trip (write, read, list, stat)", ok, f"HTTP {st1}/{st2}/{st3}/{st4}")
    st, r = sh(sid, "cat /tmp/cert.txt")
    record("API files visible to commands", st == 200 and r.get("stdout") == "certify", f"stdout={r.get('stdout')!r}" if isinstance(r, dict) else r)
    st5, _ = call("DELETE", f"/sandboxes/{sid}/files?path=/tmp/cert.txt")
    st6, _ = call("GET", f"/sandboxes/{sid}/files?path=/tmp/cert.txt")
    record("file delete", st5 == 200 and st6 == 404, f"delete HTTP {st5}, read after HTTP {st6}")
    st, r = sh(sid, "ls /proc | grep -c '^[0-9][0-9]*$'")
    n = int(r.get("stdout", "0").strip() or 0) if st == 200 else -1
    record("own PID namespace", 0 < n <= 32, f"{n} processes visible")
    st, r = sh(sid, "grep CapEff /proc/self/status | awk '{print $2}'")
    capeff = r.get("stdout", "").strip() if isinstance(r, dict) else ""
    try:
        sys_admin = bool(int(capeff, 16) & (1 << 21))
    except ValueError:
        sys_admin = True
    record("no CAP_SYS_ADMIN", st == 200 and not sys_admin, f"CapEff={capeff}")
    st, r = sh(sid, "echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo writable || echo refused")
    record("/proc/sys read-only", st == 200 and r.get("stdout", "").strip() == "refused", f"stdout={r.get('stdout')!r}" if isinstance(r, dict) else r)
    st, r = sh(sid, "(exec 3<>/dev/tcp/1.1.1.1/53) 2>/dev/null && echo open || (command -v wget >/dev/null && wget -q -T 3 -O /dev/null http://1.1.1.1 2>/dev/null && echo open) || echo blocked", timeout="15s")
    record("network egress (default mode)", True, r.get("stdout", "").strip() if isinstance(r, dict) else r, required=False)
    lat = []
    for _ in range(5):
        t0 = time.monotonic()
        call("POST", f"/sandboxes/{sid}/exec", {"command": "true"})
        lat.append((time.monotonic() - t0) * 1000)
    record("exec latency (median of 5)", True, f"{statistics.median(lat):.1f} ms", required=False)
    st, _ = call("DELETE", f"/sandboxes/{sid}")
    st2, _ = call("GET", f"/sandboxes/{sid}")
    record("destroy", st in (200, 204) and st2 == 404, f"HTTP {st}, then GET HTTP {st2}")

required = [r for r in results if r["required"]]
passed = sum(r["result"] == "pass" for r in required)
report = {
    "runtime": runtime, "provider": provider, "server_version": version,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "passed": passed, "required": len(required),
    "certified": passed == len(required) and len(required) > 1,
    "checks": results,
}
if fmt == "json":
    text = json.dumps(report, indent=2) + "\n"
else:
    lines = [f"# Runtime certification: {runtime}", "",
             f"- provider: `{provider}`", f"- server version: `{version}`",
             f"- date: {report['date']}",
             f"- result: **{'CERTIFIED' if report['certified'] else 'NOT CERTIFIED'}** ({passed}/{len(required)} required checks passed)",
             "", "| check | required | result | detail |", "|---|---|---|---|"]
    for r in results:
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['check']} | {'yes' if r['required'] else 'no'} | {r['result'].upper()} | {detail} |")
    text = "\n".join(lines) + "\n"
if output == "-":
    sys.stdout.write(text)
else:
    with open(output, "w") as f:
        f.write(text)
    print(f"{runtime}: {passed}/{len(required)} required checks passed; report in {output}", file=sys.stderr)
sys.exit(0 if report["certified"] else 1)
PY
