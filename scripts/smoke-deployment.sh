#!/usr/bin/env bash
# Smoke test of a running StacyVM deployment.
#
#   scripts/smoke-deployment.sh URL KEY [--no-spawn]
#
# URL is the server root (http://host:8080); KEY an API or admin key ("" when
# the server has no auth). Checks the probes (/live "status":"alive", /health
# "status":"ok", /ready "status":"ready"), that the API refuses a request
# without a key (when KEY is set) and with a wrong key, that
# /metrics/prometheus has stacyvm_uptime_seconds, and (unless --no-spawn)
# a whole sandbox lifecycle: spawn, exec with exit code, file write/read,
# destroy, then 404. Prints one PASS/FAIL line per check; exits 1 if any
# check failed, 2 on usage errors. Needs curl and python3.
set -uo pipefail

usage() { echo "usage: $0 URL KEY [--no-spawn]" >&2; exit 2; }
[ $# -ge 2 ] || usage
URL=${1%/}
KEY=$2
shift 2
SPAWN=1
for a in "$@"; do
  case $a in
    --no-spawn) SPAWN=0 ;;
    *) usage ;;
  esac
done
case $URL in http://*|https://*) ;; *) echo "error: URL must start with http:// or https://" >&2; exit 2 ;; esac
command -v curl >/dev/null || { echo "error: curl is required" >&2; exit 2; }
command -v python3 >/dev/null || { echo "error: python3 is required" >&2; exit 2; }

API=$URL/api/v1
FAILED=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

pass() { printf 'PASS  %s\n' "$1"; }
fail() { printf 'FAIL  %s: %s\n' "$1" "$2"; FAILED=1; }

# req METHOD PATH [BODY] -> sets CODE and BODY file $TMP/body
req() {
  local method=$1 path=$2 data=${3-}
  local args=(-sS -o "$TMP/body" -w '%{http_code}' -X "$method" --max-time 60)
  if [ -n "$KEY" ]; then
    # The key goes in both headers: the server takes whichever it matches,
    # so an admin key also reaches operator/admin routes.
    args+=(-H "X-API-Key: $KEY" -H "X-Admin-API-Key: $KEY")
  fi
  if [ -n "$data" ]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$data")
  fi
  CODE=$(curl "${args[@]}" "$API$path" 2>"$TMP/err") || CODE=000
}

json() { # json EXPR: evaluates a Python expression on the parsed body `b`
  python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$TMP/body" "$1" 2>/dev/null
}

probe() {
  local path=$1 want=$2
  CODE=$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 10 "$API$path" 2>"$TMP/err") || CODE=000
  if [ "$CODE" = 200 ] && grep -q "$want" "$TMP/body"; then
    pass "GET /api/v1$path contains $want (no credentials)"
  else
    fail "GET /api/v1$path" "HTTP $CODE $(head -c 300 "$TMP/body" 2>/dev/null) $(cat "$TMP/err")"
  fi
}

probe /live '"status":"alive"'
probe /health '"status":"ok"'
probe /ready '"status":"ready"'

if [ -n "$KEY" ]; then
  CODE=$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 10 "$API/sandboxes") || CODE=000
  if [ "$CODE" = 401 ] && grep -q '"code":"UNAUTHORIZED"' "$TMP/body"; then
    pass "GET /api/v1/sandboxes without a key is 401"
  else
    fail "auth enforced" "GET /api/v1/sandboxes without a key gave HTTP $CODE (want 401)"
  fi
  CODE=$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 10 -H "X-API-Key: wrong-$RANDOM" "$API/sandboxes") || CODE=000
  if [ "$CODE" = 401 ]; then
    pass "GET /api/v1/sandboxes with a wrong key is 401"
  else
    fail "wrong key refused" "HTTP $CODE (want 401)"
  fi
else
  printf 'WARN  no KEY given: the deployment is expected to run without auth\n'
fi

req GET /sandboxes
if [ "$CODE" = 200 ]; then pass "GET /api/v1/sandboxes with the key"; else fail "list sandboxes" "HTTP $CODE $(head -c 300 "$TMP/body")"; fi

req GET /metrics/prometheus
if [ "$CODE" = 200 ] && grep -q '^stacyvm_uptime_seconds' "$TMP/body"; then
  pass "GET /api/v1/metrics/prometheus has stacyvm_uptime_seconds"
elif [ "$CODE" = 403 ]; then
  fail "prometheus metrics" "HTTP 403: the key lacks operator:* (use the admin key)"
else
  fail "prometheus metrics" "HTTP $CODE $(head -c 300 "$TMP/body")"
fi

if [ "$SPAWN" = 1 ]; then
  req POST /sandboxes '{"ttl":"5m"}'
  ID=$(json 'b["id"]')
  if [ "$CODE" = 201 ] && [ -n "$ID" ]; then
    pass "spawn $ID"
    req POST "/sandboxes/$ID/exec" '{"command":"sh","args":["-c","echo smoke-out; exit 3"],"timeout":"30s"}'
    if [ "$CODE" = 200 ] && [ "$(json 'b["exit_code"]')" = 3 ] && [ "$(json 'b["stdout"].strip()')" = smoke-out ]; then
      pass "exec: stdout and exit code 3"
    else
      fail "exec" "HTTP $CODE $(head -c 300 "$TMP/body")"
    fi
    req POST "/sandboxes/$ID/files" '{"path":"/tmp/smoke.txt","content":"hello smoke"}'
    if [ "$CODE" = 200 ]; then
      req GET "/sandboxes/$ID/files?path=/tmp/smoke.txt"
      if [ "$CODE" = 200 ] && grep -q 'hello smoke' "$TMP/body"; then
        pass "file write and read back"
      else
        fail "file read" "HTTP $CODE $(head -c 300 "$TMP/body")"
      fi
    else
      fail "file write" "HTTP $CODE $(head -c 300 "$TMP/body")"
    fi
    req DELETE "/sandboxes/$ID"
    if [ "$CODE" = 200 ] || [ "$CODE" = 204 ]; then pass "destroy $ID"; else fail "destroy" "HTTP $CODE $(head -c 300 "$TMP/body")"; fi
    req GET "/sandboxes/$ID"
    if [ "$CODE" = 404 ]; then pass "destroyed sandbox is 404"; else fail "after destroy" "HTTP $CODE (want 404)"; fi
  else
    fail "spawn" "HTTP $CODE $(head -c 300 "$TMP/body")"
  fi
fi

if [ "$FAILED" = 0 ]; then echo "smoke: all checks passed"; else echo "smoke: FAILED"; fi
exit "$FAILED"
