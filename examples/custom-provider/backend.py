#!/usr/bin/env python3
"""StacyVM reference backend for the custom HTTP provider, on bubblewrap.

Implements the whole contract of docs/custom-provider.md (and every
extension StacyVM understands) with Python's standard library only:

* a sandbox is a directory ``<state>/sandboxes/<id>/`` holding ``meta.json``,
  ``workspace/`` and ``tmp/``; state lives on disk, so sandboxes survive a
  restart of this program (running commands do not);
* every command runs in a fresh ``bwrap`` with all namespaces unshared (no
  network), no capabilities, the host's ``/usr`` read-only, the sandbox's
  ``workspace/`` at ``/workspace`` and ``tmp/`` at ``/tmp``, private
  ``/proc`` and ``/dev``; a timeout kills the whole process group, and the
  pid namespace takes every background process with it;
* the files API sees exactly what commands see. Paths are resolved one
  component at a time with ``openat``-style calls that never follow a
  symlink in the kernel; a symlink is resolved *inside the sandbox's view*,
  so ``ln -s /etc/shadow x`` or ``../../..`` never reach host files.

It listens on 127.0.0.1 only. Run ``./backend.py --help`` for the options
and see README.md next to it.
"""

import argparse
import base64
import binascii
import errno
import hmac
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

EXTENSIONS = ["exit_status", "stdin", "timeout", "base64", "raw_files", "interactive"]
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_JSON_BODY = 64 << 20  # request bodies of JSON routes
MAX_BUFFERED_OUTPUT = 16 << 20  # per stream, for non-streamed execs
MAX_GLOB_RESULTS = 10_000
MAX_GLOB_VISITS = 200_000
MAX_SYMLINK_HOPS = 40
READ_CHUNK = 64 << 10
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# What a sandbox's root directory holds: bind mounts, symlinks, special dirs.
MOUNTS = {"workspace": True, "tmp": True, "usr": False}  # name -> writable
ROOT_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib"}
if os.path.isdir("/usr/lib64"):
    ROOT_LINKS["lib64"] = "usr/lib64"
DEVICES = ["full", "null", "random", "tty", "urandom", "zero"]


class ApiError(Exception):
    """An error answer: HTTP status, message, contract error kind."""

    def __init__(self, status, message, kind):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def invalid(msg):
    return ApiError(400, msg, "invalid_input")


def not_found(msg):
    return ApiError(404, msg, "not_found")


def os_error(e, vpath):
    """Maps an OSError on a sandbox path to an ApiError."""
    code = e.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return not_found(f"{vpath}: no such file or directory")
    if code == errno.ENOTEMPTY:
        return invalid(f"{vpath}: directory not empty (use recursive)")
    if code == errno.EISDIR:
        return invalid(f"{vpath}: is a directory")
    if code in (errno.EROFS, errno.EPERM, errno.EACCES):
        return invalid(f"{vpath}: read-only or not permitted")
    if code == errno.ELOOP:
        return invalid(f"{vpath}: too many levels of symbolic links")
    if code == errno.EXDEV:
        return invalid(f"{vpath}: cannot move between /workspace, /tmp and /usr")
    if code == errno.ENOSPC:
        return ApiError(507, "no space left on the backend's disk", "resource_limit")
    return ApiError(500, f"{vpath}: {os.strerror(code or 0)}", "internal")


def clean(vpath):
    """Lexically cleans an absolute sandbox path ('..' stops at the root)."""
    if not isinstance(vpath, str) or not vpath or "\0" in vpath:
        raise invalid("path is required and must not contain NUL")
    if not vpath.startswith("/"):
        vpath = "/workspace/" + vpath
    parts = []
    for c in vpath.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if parts:
                parts.pop()
            continue
        parts.append(c)
    return "/" + "/".join(parts)


def fmt_time(ts):
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_info(vpath, st):
    return {
        "path": vpath,
        "name": vpath.rsplit("/", 1)[-1],
        "size": st.st_size,
        "mode": format(stat.S_IMODE(st.st_mode), "o"),
        "is_dir": stat.S_ISDIR(st.st_mode),
        "mod_time": fmt_time(st.st_mtime),
    }


def virtual_dir_info(vpath):
    return {"path": vpath, "name": vpath.rsplit("/", 1)[-1], "size": 0, "mode": "755",
            "is_dir": True, "mod_time": fmt_time(0)}


class Node:
    """The result of resolving a sandbox path.

    kind: "fs" (a real file system object or a missing last component),
    "root" (the synthetic /), "dev" (/dev or a device), "proc" (procfs).
    For "fs": parent_fd is an O_PATH descriptor of the containing directory
    (None for a mount point, whose parent is the synthetic root), name the
    last component, fd an O_PATH descriptor of the object (None if missing).
    """

    def __init__(self, kind, vpath, parent_fd=None, name=None, fd=None, writable=False, mount_host=None):
        self.kind, self.vpath = kind, vpath
        self.parent_fd, self.name, self.fd = parent_fd, name, fd
        self.writable, self.mount_host = writable, mount_host

    def close(self):
        for fd in (self.parent_fd, self.fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.parent_fd = self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stat(self):
        return os.fstat(self.fd)

    def proc_path(self):
        """A path that reopens exactly this object (never a symlink)."""
        return f"/proc/self/fd/{self.fd}"


class Sandbox:
    def __init__(self, root):
        self.root = root
        self.hosts = {
            "workspace": os.path.join(root, "workspace"),
            "tmp": os.path.join(root, "tmp"),
            "usr": "/usr",
        }

    # -- path resolution ------------------------------------------------------

    def resolve(self, vpath, follow=True, mkdirs=False):
        """Resolves `vpath` inside this sandbox's view (see Node).

        Every step is an openat relative to a held directory descriptor with
        O_NOFOLLOW, so a concurrent swap of a directory for a symlink cannot
        redirect it; symlinks are read and resolved here, inside the view.
        `follow` says whether a symlink as the LAST component is followed.
        `mkdirs` creates missing directories on the way (0755).
        """
        pending = [c for c in clean(vpath).split("/") if c]
        done = []  # resolved components: real directories, no symlinks
        fd = None  # O_PATH descriptor of `done` (None at the synthetic root)
        hops = 0
        try:
            while pending:
                c = pending.pop(0)
                last = not pending
                if c == "..":
                    done = done[:-1]
                    if fd is not None:
                        os.close(fd)
                    fd = self._reopen(done)
                    continue
                if not done:
                    if c in ROOT_LINKS and (follow or not last):
                        hops += 1
                        pending = ROOT_LINKS[c].split("/") + pending
                        continue
                    if c in MOUNTS:
                        mfd = os.open(self.hosts[c], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                        if last:
                            return Node("fs", "/" + c, None, c, mfd, MOUNTS[c], self.hosts[c])
                        fd, done = mfd, [c]
                        continue
                    if c == "dev":
                        if last:
                            return Node("dev", "/dev")
                        if len(pending) == 1 and pending[0] in DEVICES:
                            return Node("dev", "/dev/" + pending[0])
                        raise not_found(f"{vpath}: no such file or directory")
                    if c == "proc":
                        raise invalid(f"{vpath}: /proc is not available through the files API")
                    if c in ROOT_LINKS:  # not followed: the link itself
                        return Node("rootlink", "/" + c, name=c)
                    raise not_found(f"{vpath}: no such file or directory")
                vp = "/" + "/".join(done + [c])
                try:
                    st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if last and not mkdirs:
                        return Node("fs", vp, fd, c, None, MOUNTS[done[0]])
                    if not mkdirs:
                        raise not_found(f"{vpath}: no such file or directory")
                    if not MOUNTS[done[0]]:
                        raise invalid(f"{vpath}: read-only file system")
                    os.mkdir(c, 0o755, dir_fd=fd)
                    st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) and (follow or not last):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise invalid(f"{vpath}: too many levels of symbolic links")
                    target = os.readlink(c, dir_fd=fd)
                    if target.startswith("/"):
                        os.close(fd)
                        fd, done = None, []
                    pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                    continue
                if last:
                    child = os.open(c, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    return Node("fs", vp, fd, c, child, MOUNTS[done[0]])
                if not stat.S_ISDIR(st.st_mode):
                    raise not_found(f"{vpath}: {vp} is not a directory")
                child = os.open(c, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
                done.append(c)
            # The path named a directory reached through '..' or the root.
            if not done:
                return Node("root", "/")
            name = done[-1]
            if len(done) == 1:
                os.close(fd)
                fd = None
                mfd = os.open(self.hosts[name], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                return Node("fs", "/" + name, None, name, mfd, MOUNTS[name], self.hosts[name])
            parent = self._reopen(done[:-1])
            return Node("fs", "/" + "/".join(done), parent, name, fd, MOUNTS[done[0]])
        except ApiError:
            if fd is not None:
                os.close(fd)
            raise
        except OSError as e:
            if fd is not None:
                os.close(fd)
            raise os_error(e, vpath)

    def _reopen(self, comps):
        """O_PATH descriptor of a directory path made of real components."""
        if not comps:
            return None
        fd = os.open(self.hosts[comps[0]], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for c in comps[1:]:
            nfd = os.open(c, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd

    # -- file operations --------------------------------------------------------

    def stat(self, vpath):
        with self.resolve(vpath) as n:
            if n.kind == "root" or (n.kind == "dev" and n.vpath == "/dev"):
                return virtual_dir_info(n.vpath)
            if n.kind == "dev":
                return {"path": n.vpath, "name": n.vpath[5:], "size": 0, "mode": "666",
                        "is_dir": False, "mod_time": fmt_time(0)}
            if n.kind != "fs" or n.fd is None:
                raise not_found(f"{vpath}: no such file or directory")
            info = file_info(n.vpath, n.stat())
            info["path"] = clean(vpath)
            info["name"] = info["path"].rsplit("/", 1)[-1]
            return info

    def list(self, vpath):
        with self.resolve(vpath) as n:
            if n.kind == "root":
                names = sorted(list(MOUNTS) + list(ROOT_LINKS) + ["dev", "proc"])
                return [virtual_dir_info("/" + x) for x in names]
            if n.kind == "dev":
                if n.vpath != "/dev":
                    raise invalid(f"{vpath}: not a directory")
                return [self.stat("/dev/" + d) for d in DEVICES]
            if n.kind != "fs" or n.fd is None:
                raise not_found(f"{vpath}: no such file or directory")
            if not stat.S_ISDIR(n.stat().st_mode):
                raise invalid(f"{vpath}: not a directory")
            dfd = os.open(n.proc_path(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            base = n.vpath.rstrip("/")
            out = []
            try:
                for name in os.listdir(dfd):
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out.append(file_info(f"{base}/{name}", st))
            finally:
                os.close(dfd)
            out.sort(key=lambda f: f["path"])
            return out

    def open_read(self, vpath, max_bytes):
        """(file object, size) of a regular file of at most max_bytes."""
        with self.resolve(vpath) as n:
            if n.kind in ("dev", "proc"):
                raise invalid(f"{vpath}: not a regular file")
            if n.kind != "fs" or n.fd is None:
                if n.kind == "root":
                    raise invalid(f"{vpath}: is a directory")
                raise not_found(f"{vpath}: no such file or directory")
            st = n.stat()
            if stat.S_ISDIR(st.st_mode):
                raise invalid(f"{vpath}: is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise invalid(f"{vpath}: not a regular file (device, FIFO, socket or symlink)")
            if max_bytes is not None and st.st_size > max_bytes:
                raise ApiError(413, f"{vpath} is {st.st_size} bytes, over the limit of {max_bytes}",
                               "payload_too_large")
            fd = os.open(n.proc_path(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            f = os.fdopen(fd, "rb", buffering=0)
            # Same object as checked (the magic link cannot be swapped).
            if os.fstat(fd).st_ino != st.st_ino:
                f.close()
                raise ApiError(409, f"{vpath} changed while opening", "conflict")
            return f, st.st_size

    def write(self, vpath, chunks, mode):
        """Writes the file from an iterable of byte chunks; replaces it only
        when the iterable ends normally (an exception leaves the old file)."""
        vpath = clean(vpath)
        parent, name = vpath.rsplit("/", 1)
        if not name:
            raise invalid(f"{vpath}: is a directory")
        with self.resolve(parent or "/", mkdirs=True) as d:
            if d.kind != "fs" or d.fd is None:
                raise invalid(f"{vpath}: cannot write here")
            if not d.writable:
                raise invalid(f"{vpath}: read-only file system")
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise invalid(f"{vpath}: is a directory")
            except FileNotFoundError:
                pass
            tmp = f".stacyvm-upload-{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=d.fd)
            except OSError as e:
                raise os_error(e, vpath)
            size = 0
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        size += len(chunk)
                    os.fchmod(f.fileno(), mode & 0o1777)
                os.rename(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            except BaseException as e:
                try:
                    os.unlink(tmp, dir_fd=d.fd)
                except OSError:
                    pass
                if isinstance(e, OSError):
                    raise os_error(e, vpath)
                raise
            return size

    def delete(self, vpath, recursive):
        with self.resolve(vpath, follow=False) as n:
            if n.kind != "fs":
                raise invalid(f"{vpath}: cannot delete this")
            if n.fd is None:
                return  # missing: nothing to do
            if n.parent_fd is None:
                raise invalid(f"{vpath}: is a mount point of the sandbox")
            if not n.writable:
                raise invalid(f"{vpath}: read-only file system")
            try:
                st = n.stat()
                if stat.S_ISDIR(st.st_mode):
                    if recursive:
                        shutil.rmtree(n.name, dir_fd=n.parent_fd)
                    else:
                        os.rmdir(n.name, dir_fd=n.parent_fd)
                else:
                    os.unlink(n.name, dir_fd=n.parent_fd)
            except FileNotFoundError:
                return
            except OSError as e:
                raise os_error(e, vpath)

    def move(self, old, new):
        old, new = clean(old), clean(new)
        with self.resolve(old, follow=False) as src:
            if src.kind != "fs" or src.fd is None:
                raise not_found(f"{old}: no such file or directory")
            if src.parent_fd is None:
                raise invalid(f"{old}: is a mount point of the sandbox")
            parent, name = new.rsplit("/", 1)
            with self.resolve(parent or "/", mkdirs=True) as d:
                if d.kind != "fs" or d.fd is None or not name:
                    raise invalid(f"{new}: cannot move here")
                if not (src.writable and d.writable):
                    raise invalid(f"{old} -> {new}: read-only file system")
                try:
                    os.rename(src.name, name, src_dir_fd=src.parent_fd, dst_dir_fd=d.fd)
                except OSError as e:
                    raise os_error(e, f"{old} -> {new}")

    def chmod(self, vpath, mode):
        with self.resolve(vpath) as n:
            if n.kind != "fs" or n.fd is None:
                if n.kind == "fs":
                    raise not_found(f"{vpath}: no such file or directory")
                raise invalid(f"{vpath}: cannot chmod this")
            if not n.writable or n.parent_fd is None:
                raise invalid(f"{vpath}: read-only file system or mount point")
            try:
                os.chmod(n.proc_path(), mode & 0o1777)
            except OSError as e:
                raise os_error(e, vpath)

    def glob(self, pattern):
        """Absolute matching paths; '**' matches zero or more directories,
        names starting with '.' only match patterns starting with '.'.
        Directory symlinks are not descended."""
        comps = []
        for c in clean(pattern).split("/"):
            if c and not (c == "**" and comps and comps[-1] == "**"):
                comps.append(c)
        out = set()
        budget = [MAX_GLOB_VISITS]

        def entries(vdir):
            budget[0] -= 1
            if budget[0] < 0:
                raise ApiError(413, f"glob {pattern!r} visits too many directories; narrow it",
                               "payload_too_large")
            try:
                return [(f["name"], f["is_dir"]) for f in self.list(vdir)
                        if not (vdir == "/" and f["name"] in ROOT_LINKS)]
            except ApiError:
                return []

        def add(vp):
            out.add(vp)
            if len(out) > MAX_GLOB_RESULTS:
                raise ApiError(413, f"glob {pattern!r} matches more than {MAX_GLOB_RESULTS} paths; narrow it",
                               "payload_too_large")

        def walk(vdir, i):
            if i == len(comps):
                add(vdir)
                return
            c = comps[i]
            join = (lambda n: "/" + n) if vdir == "/" else (lambda n: vdir + "/" + n)
            if c == "**":
                walk(vdir, i + 1)
                for name, is_dir in entries(vdir):
                    if is_dir and not name.startswith("."):
                        walk(join(name), i)
                return
            for name, is_dir in entries(vdir):
                if name.startswith(".") and not c.startswith("."):
                    continue
                if fnmatchcase(name, c) and (i + 1 == len(comps) or is_dir):
                    walk(join(name), i + 1)

        walk("/", 0)
        return sorted(out)


class Exec:
    """A running command: its bwrap process and, when interactive, stdin."""

    def __init__(self, proc):
        self.proc = proc
        self.stdin_lock = threading.Lock()  # keeps stdin chunks in order
        self.reap_lock = threading.Lock()  # no signal after the pid is reaped
        self.done = False

    def kill(self, sig=signal.SIGKILL):
        with self.reap_lock:
            if not self.done:
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def reap(self):
        """Kills what is left of the command and waits for bwrap."""
        with self.reap_lock:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.done = True


class Backend:
    def __init__(self, state_dir, api_key, max_exec_seconds, max_file_bytes, verbose):
        self.state_dir = state_dir
        self.boxes = os.path.join(state_dir, "sandboxes")
        os.makedirs(self.boxes, mode=0o700, exist_ok=True)
        self.api_key = api_key
        self.max_exec_seconds = max_exec_seconds
        self.max_file_bytes = max_file_bytes
        self.verbose = verbose
        self.lock = threading.Lock()
        self.running = set()  # every live Exec, killed at shutdown
        self.interactive = {}  # exec_id -> Exec

    def sandbox(self, sid):
        if not isinstance(sid, str) or not ID_RE.match(sid):
            raise ApiError(404, f"sandbox {sid!r} not found", "sandbox_not_found")
        root = os.path.join(self.boxes, sid)
        if not os.path.isfile(os.path.join(root, "meta.json")):
            raise ApiError(404, f"sandbox {sid} not found", "sandbox_not_found")
        return Sandbox(root)

    def spawn(self, req):
        image = req.get("image", "")
        if not isinstance(image, str):
            raise invalid("image must be a string")
        meta = {
            "image": image,
            "memory_mb": req.get("memory_mb", 0),
            "vcpus": req.get("vcpus", 0),
            "metadata": req.get("metadata") or {},
            "created_at": fmt_time(time.time()),
        }
        wanted = req.get("sandbox_id")
        sid = wanted if isinstance(wanted, str) and ID_RE.match(wanted) else "bw-" + secrets.token_hex(6)
        root = os.path.join(self.boxes, sid)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            raise ApiError(409, f"sandbox {sid} already exists", "conflict")
        os.mkdir(os.path.join(root, "workspace"), 0o755)
        os.mkdir(os.path.join(root, "tmp"), 0o1777)
        os.chmod(os.path.join(root, "tmp"), 0o1777)
        # meta.json appears last, atomically: it marks a complete sandbox.
        tmp = os.path.join(root, ".meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.rename(tmp, os.path.join(root, "meta.json"))
        return sid

    def destroy(self, sid):
        self.sandbox(sid)
        root = os.path.join(self.boxes, sid)
        os.unlink(os.path.join(root, "meta.json"))  # no longer "live"
        shutil.rmtree(root, ignore_errors=True)

    def command(self, sb, req):
        """The bwrap argv, environment and working directory of an exec."""
        cmd = req.get("command")
        args = req.get("args") or []
        mode = req.get("mode") or "shell"
        if not isinstance(cmd, str) or not cmd:
            raise invalid("command is required")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise invalid("args must be a list of strings")
        if mode == "argv":
            argv = [cmd] + args
        elif mode == "shell":
            quoted = "".join(" '" + a.replace("'", "'\"'\"'") + "'" for a in args)
            argv = ["sh", "-c", cmd + quoted]
        else:
            raise invalid(f"mode {mode!r} must be shell or argv")
        if any("\0" in a for a in argv):
            raise invalid("command and args must not contain NUL")
        env = {"PATH": PATH_ENV, "HOME": "/workspace", "LANG": "C.UTF-8", "TERM": "xterm"}
        user_env = req.get("env") or {}
        if not isinstance(user_env, dict):
            raise invalid("env must be an object")
        for k, v in user_env.items():
            if not isinstance(v, str) or not k or "=" in k or "\0" in k or "\0" in v:
                raise invalid(f"env {k!r} is not a valid variable")
            env[k] = v
        workdir = clean(req.get("workdir") or "/workspace")
        try:
            with sb.resolve(workdir) as n:
                is_dir = n.kind == "fs" and n.fd is not None and stat.S_ISDIR(n.stat().st_mode)
        except ApiError as e:
            if e.status != 404:
                raise
            is_dir = False
        if not is_dir:
            raise invalid(f"workdir {workdir!r} does not exist in the sandbox")
        bwrap = [
            "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr",
        ]
        for name, target in ROOT_LINKS.items():
            bwrap += ["--symlink", target, "/" + name]
        bwrap += [
            "--bind", sb.hosts["workspace"], "/workspace",
            "--bind", sb.hosts["tmp"], "/tmp",
            "--proc", "/proc", "--dev", "/dev",
            "--chdir", workdir,
            # The shell reports a missing program as 127, like everywhere else.
            "--", "/bin/sh", "-c", 'exec "$@"', "sh",
        ]
        return bwrap + argv, env

    def run(self, sb, req, emit, interactive_cb=None, client=None):
        """Runs one exec; emit(stream, bytes) gets output as it arrives.

        Returns ("exit", code, signal) or ("timeout", seconds) or ("gone",).
        """
        argv, env = self.command(sb, req)
        stdin_data = None
        if req.get("stdin") is not None:
            try:
                stdin_data = base64.b64decode(req["stdin"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise invalid("stdin must be base64")
        timeout = self.max_exec_seconds
        if req.get("timeout_ms") is not None:
            try:
                timeout = min(timeout, max(0.001, int(req["timeout_ms"]) / 1000))
            except (TypeError, ValueError):
                raise invalid("timeout_ms must be an integer")
        interactive = interactive_cb is not None
        proc = subprocess.Popen(
            argv, env=env, start_new_session=True, close_fds=True,
            stdin=subprocess.PIPE if (stdin_data is not None or interactive) else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        ex = Exec(proc)
        with self.lock:
            self.running.add(ex)
        exec_id = None
        try:
            if interactive:
                exec_id = secrets.token_hex(16)
                with self.lock:
                    self.interactive[exec_id] = ex
                interactive_cb(exec_id)
            elif stdin_data is not None:
                def feed():
                    try:
                        proc.stdin.write(stdin_data)
                    except OSError:
                        pass
                    finally:
                        try:
                            proc.stdin.close()
                        except OSError:
                            pass
                threading.Thread(target=feed, daemon=True).start()
            return self._pump(ex, timeout, emit, client)
        finally:
            # Unregister first, then reap: no signal reaches a reused pid.
            with self.lock:
                self.running.discard(ex)
                if exec_id is not None:
                    self.interactive.pop(exec_id, None)
            ex.reap()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass

    def _pump(self, ex, timeout, emit, client):
        proc = ex.proc
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        if client is not None:
            sel.register(client, selectors.EVENT_READ, "client")
        open_pipes = 2
        try:
            while open_pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    ex.kill()
                    return ("timeout", timeout)
                for key, _ in sel.select(timeout=min(left, 1.0)):
                    if key.data == "client":
                        # The caller hung up (or timed out): stop the command.
                        try:
                            gone = key.fileobj.recv(1, socket.MSG_PEEK) == b""
                        except OSError:
                            gone = True
                        if gone:
                            ex.kill()
                            return ("gone",)
                        sel.unregister(key.fileobj)
                        continue
                    data = os.read(key.fileobj.fileno(), READ_CHUNK)
                    if not data:
                        sel.unregister(key.fileobj)
                        open_pipes -= 1
                        continue
                    try:
                        emit(key.data, data)
                    except OSError:
                        ex.kill()
                        return ("gone",)
            left = max(0.0, deadline - time.monotonic())
            try:
                code = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                ex.kill()
                return ("timeout", timeout)
        finally:
            sel.close()
        if code < 0:
            return ("exit", 128 - code, -code)
        return ("exit", code, None)

    def shutdown(self):
        with self.lock:
            running = list(self.running)
        for ex in running:
            ex.kill()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stacyvm-bwrap-backend/1"
    backend = None  # set by main

    def log_message(self, fmt, *args):
        if self.backend.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    # -- plumbing ----------------------------------------------------------------

    def send_json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, e):
        self.close_connection = True  # the request body may be unread
        self.send_json(e.status, {"error": e.message, "kind": e.kind})

    def body_chunks(self, limit):
        """Yields the request body (Content-Length or chunked); raises
        ApiError 413 past `limit` and ConnectionError on a truncated body."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise ConnectionError("truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > limit:
                    raise ApiError(413, f"body larger than {limit} bytes", "payload_too_large")
                while size:
                    data = self.rfile.read(min(size, READ_CHUNK))
                    if not data:
                        raise ConnectionError("truncated chunked body")
                    size -= len(data)
                    yield data
                if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                    raise ConnectionError("bad chunk terminator")
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                raise ApiError(413, f"body larger than {limit} bytes", "payload_too_large")
            while length:
                data = self.rfile.read(min(length, READ_CHUNK))
                if not data:
                    raise ConnectionError("truncated body")
                length -= len(data)
                yield data

    def json_body(self):
        data = b"".join(self.body_chunks(MAX_JSON_BODY))
        try:
            v = json.loads(data or b"{}")
        except ValueError:
            raise invalid("the body is not JSON")
        if not isinstance(v, dict):
            raise invalid("the body must be a JSON object")
        return v

    def start_chunked(self, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")

    # -- dispatch ------------------------------------------------------------------

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path
        try:
            key = self.headers.get("X-API-Key", "")
            if self.backend.api_key and not hmac.compare_digest(key.encode(), self.backend.api_key.encode()):
                raise ApiError(401, "missing or wrong X-API-Key", "unauthorized")
            route = ROUTES.get((method, path))
            if route is None:
                for (m, prefix), fn in PREFIX_ROUTES.items():
                    if m == method and path.startswith(prefix) and len(path) > len(prefix):
                        return fn(self, unquote(path[len(prefix):]))
                raise ApiError(404, f"no route {method} {path}", "unsupported")
            route(self)
        except ApiError as e:
            self.send_error_json(e)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as e:  # a bug here must not kill the server
            sys.stderr.write(f"error: {method} {path}: {e!r}\n")
            self.send_error_json(ApiError(500, "internal error, see the backend's log", "internal"))

    # -- routes ----------------------------------------------------------------------

    def health(self):
        with self.backend.lock:
            running = len(self.backend.running)
        self.send_json(200, {"status": "ok", "extensions": EXTENSIONS, "running_execs": running})

    def spawn(self):
        sid = self.backend.spawn(self.json_body())
        self.send_json(200, {"id": sid})

    def status(self, sid):
        self.backend.sandbox(sid)
        self.send_json(200, {"id": sid, "state": "running"})

    def destroy(self, sid):
        self.backend.destroy(sid)
        self.send_json(200, {})

    def exec(self):
        req = self.json_body()
        sb = self.backend.sandbox(req.get("sandbox_id"))
        if not req.get("stream"):
            out = {"stdout": bytearray(), "stderr": bytearray()}

            def collect(stream, data):
                room = MAX_BUFFERED_OUTPUT - len(out[stream])
                out[stream] += data[:max(0, room)]

            r = self.backend.run(sb, req, collect, client=self.connection)
            if r[0] == "timeout":
                raise ApiError(408, f"exec timeout after {r[1]:g}s", "exec_timeout")
            if r[0] == "gone":
                self.close_connection = True
                return
            self.send_json(200, {
                "exit_code": r[1],
                "stdout": out["stdout"].decode("utf-8", "replace"),
                "stderr": out["stderr"].decode("utf-8", "replace"),
            })
            return
        # Streamed: validate before the 200 goes out, so errors keep their status.
        self.backend.command(sb, req)
        started = []

        def start():
            if not started:
                self.start_chunked("application/x-ndjson")
                started.append(True)

        def record(value):
            start()
            self.chunk(json.dumps(value).encode() + b"\n")

        def emit(stream, data):
            record({"stream": stream, "data": base64.b64encode(data).decode(), "encoding": "base64"})

        on_id = (lambda eid: record({"exec_id": eid})) if req.get("interactive") else None
        try:
            r = self.backend.run(sb, req, emit, interactive_cb=on_id, client=self.connection)
        except ApiError as e:
            if started:
                record({"error": e.message, "kind": e.kind})
                self.end_chunked()
                return
            raise
        if r[0] == "gone":
            self.close_connection = True
            return
        if r[0] == "timeout":
            record({"error": f"exec timeout after {r[1]:g}s", "kind": "exec_timeout"})
        else:
            rec = {"exit_code": r[1]}
            if r[2]:
                rec["signal"] = r[2]
            record(rec)
        self.end_chunked()

    def exec_input(self):
        req = self.json_body()
        with self.backend.lock:
            ex = self.backend.interactive.get(req.get("exec_id"))
        if ex is None:
            raise ApiError(404, "no such running exec", "not_found")
        sig = req.get("signal")
        if sig is not None:
            if not isinstance(sig, int) or not 1 <= sig <= 64:
                raise invalid("signal must be a number between 1 and 64")
            ex.kill(sig)  # never waits for a stdin write in progress
        data = None
        if req.get("stdin") is not None:
            try:
                data = base64.b64decode(req["stdin"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise invalid("stdin must be base64")
        with ex.stdin_lock:
            stdin = ex.proc.stdin
            try:
                if data and not stdin.closed:
                    stdin.write(data)
                    stdin.flush()
                if req.get("close_stdin"):
                    stdin.close()
            except OSError:
                pass  # the command is gone or closed its stdin
        self.send_json(200, {})

    def _path(self):
        p = self.query.get("path")
        if not p:
            raise invalid("path is required")
        return p

    def _sb(self, req=None):
        return self.backend.sandbox((req or self.query).get("sandbox_id"))

    def files_read(self):
        sb = self._sb()
        limit = self.backend.max_file_bytes
        if self.query.get("max_bytes"):
            try:
                limit = min(limit, int(self.query["max_bytes"]))
            except ValueError:
                raise invalid("max_bytes must be an integer")
        f, size = sb.open_read(self._path(), limit)
        with f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            left = size
            while left:
                data = f.read(min(left, READ_CHUNK))
                if not data:  # the file shrank: the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(data)
                left -= len(data)

    def files_write(self):
        req = self.json_body()
        sb = self._sb(req)
        content = req.get("content", "")
        if not isinstance(content, str):
            raise invalid("content must be a string")
        if req.get("encoding") == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise invalid("content is not base64")
        else:
            data = content.encode()
        sb.write(req.get("path"), [data], parse_mode(req.get("mode")))
        self.send_json(200, {})

    def files_write_raw(self):
        sb = self._sb()
        path, mode = self._path(), parse_mode(self.query.get("mode"))
        size = sb.write(path, self.body_chunks(self.backend.max_file_bytes), mode)
        self.send_json(200, {"size": size})

    def files_list(self):
        self.send_json(200, self._sb().list(self._path()))

    def files_stat(self):
        self.send_json(200, self._sb().stat(self._path()))

    def files_glob(self):
        pattern = self.query.get("pattern")
        if not pattern:
            raise invalid("pattern is required")
        self.send_json(200, self._sb().glob(pattern))

    def files_delete(self):
        req = self.json_body()
        self._sb(req).delete(req.get("path"), bool(req.get("recursive")))
        self.send_json(200, {})

    def files_move(self):
        req = self.json_body()
        self._sb(req).move(req.get("old_path"), req.get("new_path"))
        self.send_json(200, {})

    def files_chmod(self):
        req = self.json_body()
        self._sb(req).chmod(req.get("path"), parse_mode(req.get("mode")))
        self.send_json(200, {})


def parse_mode(mode):
    if mode in (None, ""):
        return 0o644
    if not isinstance(mode, str) or not re.fullmatch(r"(0o)?[0-7]{1,5}", mode):
        raise invalid(f"mode {mode!r} is not an octal mode like 0644")
    v = int(mode.removeprefix("0o"), 8)
    if v & 0o6000 or v > 0o7777:
        raise invalid(f"mode {mode!r}: setuid/setgid bits are not allowed")
    return v


ROUTES = {
    ("GET", "/health"): Handler.health,
    ("POST", "/spawn"): Handler.spawn,
    ("POST", "/exec"): Handler.exec,
    ("POST", "/exec/input"): Handler.exec_input,
    ("GET", "/files"): Handler.files_read,
    ("POST", "/files"): Handler.files_write,
    ("PUT", "/files/raw"): Handler.files_write_raw,
    ("DELETE", "/files"): Handler.files_delete,
    ("GET", "/files/list"): Handler.files_list,
    ("GET", "/files/stat"): Handler.files_stat,
    ("GET", "/files/glob"): Handler.files_glob,
    ("POST", "/files/move"): Handler.files_move,
    ("POST", "/files/chmod"): Handler.files_chmod,
}
PREFIX_ROUTES = {
    ("GET", "/status/"): Handler.status,
    ("DELETE", "/sandboxes/"): Handler.destroy,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8090, help="port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--state-dir", default=os.path.expanduser("~/.local/state/stacyvm-bwrap-backend"),
                    help="where sandboxes live (kept across restarts)")
    ap.add_argument("--ephemeral", action="store_true",
                    help="use a fresh temporary state dir, removed at exit (tests)")
    ap.add_argument("--api-key", default=os.environ.get("STACYVM_BACKEND_API_KEY", ""),
                    help="require this X-API-Key (default: $STACYVM_BACKEND_API_KEY; empty = no key)")
    ap.add_argument("--max-exec-seconds", type=float, default=600, help="upper bound of every exec")
    ap.add_argument("--max-file-bytes", type=int, default=1 << 30, help="largest file read or written")
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="exit when stdin closes (lets a parent process own this one)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args()

    if shutil.which("bwrap") is None:
        sys.exit("error: bwrap not found; install bubblewrap (apt-get install bubblewrap)")
    state = tempfile.mkdtemp(prefix="stacyvm-bwrap-") if args.ephemeral else args.state_dir
    backend = Backend(state, args.api_key, args.max_exec_seconds, args.max_file_bytes, args.verbose)
    Handler.backend = backend
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    stopping = threading.Event()

    def stop(*_):
        if stopping.is_set():
            return
        stopping.set()
        backend.shutdown()
        if args.ephemeral:
            shutil.rmtree(state, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_on_stdin_eof:
        def watch():
            while sys.stdin.buffer.read(4096):
                pass
            stop()
        threading.Thread(target=watch, daemon=True).start()
    print(f"listening on http://127.0.0.1:{server.server_address[1]} state={state}", flush=True)
    try:
        server.serve_forever()
    finally:
        stop()


if __name__ == "__main__":
    main()
