#!/usr/bin/env bash
# Installs StacyVM from a release directory or URL, after verifying it:
# the checksums always, the minisign signature whenever a public key is
# given. Installs the binaries, a systemd unit and — when there is none —
# a config with a freshly generated admin API key; never overwrites a
# config, and keeps the binaries and unit it replaces as `*.bak`.
# `stacyvm uninstall` does the inverse, `stacyvm update` the upgrade.
#
# usage: install.sh --from DIR|URL [--pubkey stacyvm.pub] [--require-signature]
#                   [--root DIR] [--restart] [--no-start]
#
#   --from DIR|URL       a release (SHA256SUMS, its .minisig, the tarball)
#   --pubkey FILE        verify the signature with this key
#   --require-signature  fail closed: refuse a release that is unsigned,
#                        or when no key or no minisign is at hand
#   --root DIR           install under DIR instead of / (a scratch root or
#                        an image; nothing is started there)
#   --restart            replace a running server (stop, install, start);
#                        without it an install over a running server stops
#   --no-start           install only: do not enable or start the unit
set -euo pipefail
die() { echo "install: $*" >&2; exit 1; }
say() { echo "install: $*" >&2; }
FROM="" PUB="" REQUIRE=0 ROOT=/ RESTART=0 START=1
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=${2:?}; shift 2 ;;
    --pubkey) PUB=${2:?}; shift 2 ;;
    --require-signature) REQUIRE=1; shift ;;
    --root) ROOT=${2:?}; shift 2 ;;
    --restart) RESTART=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$FROM" ] || die "--from DIR|URL is required"
[ "$(uname -m)" = x86_64 ] || die "releases are built for x86_64; this machine is $(uname -m)"
mkdir -p "$ROOT"
ROOT=$(realpath "$ROOT")
R=${ROOT%/}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. Fetch what is needed into a scratch dir.
fetch() { # name
  case "$FROM" in
    http://*|https://*)
      curl -fsSL --proto '=https,http' --retry 2 -o "$W/$1" "${FROM%/}/$1" 2>/dev/null || return 1 ;;
    *) [ -f "$FROM/$1" ] || return 1; cp "$FROM/$1" "$W/$1" ;;
  esac
}
fetch SHA256SUMS || die "no SHA256SUMS at $FROM"
signed=0
fetch SHA256SUMS.minisig && signed=1
TARBALL=$(awk '{print $2}' "$W/SHA256SUMS" | grep -E '^stacyvm-[0-9A-Za-z.+-]+-linux-x86_64\.tar\.gz$' | head -n1 || true)
[ -n "$TARBALL" ] || die "SHA256SUMS names no stacyvm-*-linux-x86_64.tar.gz"
fetch "$TARBALL" || die "cannot fetch $TARBALL from $FROM"

# 2. Verify: the signature (when possible or required), then the checksum.
if [ "$signed" = 1 ] && [ -n "$PUB" ]; then
  command -v minisign >/dev/null || die "minisign is not installed (apt-get install minisign); it checks the signature"
  minisign -V -q -p "$PUB" -m "$W/SHA256SUMS" >/dev/null 2>&1 \
    || die "REFUSED: the signature of SHA256SUMS does not verify with $PUB"
  say "signature verified with $PUB"
elif [ "$REQUIRE" = 1 ]; then
  [ "$signed" = 1 ] || die "REFUSED: the release is not signed and --require-signature is set"
  die "REFUSED: --require-signature needs --pubkey"
elif [ "$signed" = 1 ]; then
  say "WARNING: the release is signed but no --pubkey was given: the signature is NOT checked"
else
  say "WARNING: the release is not signed: only its checksum is checked"
fi
want=$(awk -v f="$TARBALL" '$2 == f {print $1}' "$W/SHA256SUMS")
got=$(sha256sum "$W/$TARBALL" | cut -d' ' -f1)
[ "$want" = "$got" ] || die "REFUSED: $TARBALL does not match its checksum"
say "checksum of $TARBALL verified"
tar -xzf "$W/$TARBALL" -C "$W" || die "$TARBALL does not unpack"
S=$W/${TARBALL%.tar.gz}
[ -x "$S/bin/stacyvm" ] && [ -x "$S/bin/stacyvm-agent" ] || die "$TARBALL holds no binaries"
NEW_VERSION=$("$S/bin/stacyvm-agent" version 2>/dev/null | awk '{print $2}')

# 3. A server already running from this root?
live=0
if [ "$R" = "" ] && command -v systemctl >/dev/null && systemctl is-active --quiet stacyvm 2>/dev/null; then
  live=1
fi
if [ "$live" = 1 ] && [ "$RESTART" = 0 ]; then
  die "stacyvm is running: stop it (systemctl stop stacyvm), or pass --restart, or use \`stacyvm update\`"
fi
# A server started by hand from this install (not the unit's).
if [ "$live" = 0 ]; then
  pids=""
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$exe" in "$R/usr/local/bin/stacyvm"|"$R/usr/local/bin/stacyvm (deleted)") pids="$pids ${p#/proc/}" ;; esac
  done
  [ -z "$pids" ] || die "stacyvm runs from $R/usr/local/bin/stacyvm outside systemd (pid$pids): stop it first; nothing was changed"
fi
[ "$live" = 1 ] && { say "stopping stacyvm"; systemctl stop stacyvm; }

# 4. Files. What is replaced is kept as *.bak; the config is never replaced.
put() { # src dest mode
  local dest=$R$2
  install -d -m 0755 "$(dirname "$dest")"
  if [ -e "$dest" ] && ! cmp -s "$1" "$dest"; then
    cp -p "$dest" "$dest.bak"
    say "kept the previous $2 as $2.bak"
  fi
  install -m "$3" "$1" "$dest.new" && mv -f "$dest.new" "$dest"
}
put "$S/bin/stacyvm" /usr/local/bin/stacyvm 0755
put "$S/bin/stacyvm-agent" /usr/local/bin/stacyvm-agent 0755
put "$S/packaging/stacyvm.service" /etc/systemd/system/stacyvm.service 0644
install -d -m 0700 "$R/etc/stacyvm" "$R/var/lib/stacyvm"
if [ ! -e "$R/etc/stacyvm/config.yaml" ]; then
  newkey() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  hashed() { printf 'sha256:%s' "$(printf '%s' "$1" | sha256sum | cut -d' ' -f1)"; }
  api_key=$(newkey) admin_key=$(newkey)
  umask 077
  cat > "$R/etc/stacyvm/config.yaml" <<EOF
# Written by install.sh for stacyvm $NEW_VERSION; passes
# \`stacyvm config lint --production\`. Reference: docs/configuration.md.
server:
  port: 7423
  data_dir: /var/lib/stacyvm
auth:
  enabled: true
  # SHA-256 of the keys; the keys themselves are in /etc/stacyvm/api.key
  # (applications) and /etc/stacyvm/admin.key (operators), mode 0600.
  api_key: "$(hashed "$api_key")"
  admin_api_key: "$(hashed "$admin_key")"
  admin_fallback_enabled: false
rate_limit:
  enabled: true
defaults:
  max_sandboxes: 100
  max_sandboxes_per_owner: 20
  default_exec_timeout: 60s
  max_exec_timeout: 10m
logging:
  format: json
EOF
  printf '%s\n' "$api_key" > "$R/etc/stacyvm/api.key"
  printf '%s\n' "$admin_key" > "$R/etc/stacyvm/admin.key"
  chmod 0600 "$R/etc/stacyvm/config.yaml" "$R/etc/stacyvm/api.key" "$R/etc/stacyvm/admin.key"
  say "wrote /etc/stacyvm/config.yaml; the API keys are in /etc/stacyvm/api.key and /etc/stacyvm/admin.key (0600)"
else
  say "kept the existing /etc/stacyvm/config.yaml"
fi
"$S/bin/stacyvm" config lint --production -f "$R/etc/stacyvm/config.yaml" >"$W/lint.txt" 2>&1 \
  || { say "WARNING: \`stacyvm config lint --production\` reports problems in /etc/stacyvm/config.yaml:"; cat "$W/lint.txt" >&2; }

# 5. The service (a real root only).
if [ "$R" = "" ] && [ "$START" = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now stacyvm >/dev/null 2>&1 || die "systemctl could not start stacyvm (journalctl -u stacyvm)"
  say "stacyvm $NEW_VERSION is running (systemctl status stacyvm)"
else
  say "installed stacyvm $NEW_VERSION under $ROOT (not started)"
fi
