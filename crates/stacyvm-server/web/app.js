// StacyVM dashboard. No framework, no build step: this file is embedded in
// the server binary. Every string from the API is attacker-controlled
// (sandbox metadata, file names, command output) and reaches the page
// only through textContent and attribute setters, never as HTML.

const state = { role: "", csrf: "", auth: true, who: "" };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function toast(msg) {
  const t = el("div", { text: msg });
  document.getElementById("toast").append(t);
  setTimeout(() => t.remove(), 5000);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, raw) {
  const headers = {};
  if (state.csrf) headers["X-StacyVM-CSRF"] = state.csrf;
  let payload;
  if (raw !== undefined) {
    payload = raw;
    headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const r = await fetch("/api/v1" + path, {
    method,
    headers,
    body: payload,
    credentials: "same-origin",
  });
  if (r.status === 401 && state.auth) {
    signInView("Your session ended; sign in again.");
    throw new ApiError(401, "signed out");
  }
  if (!r.ok) {
    let msg = r.statusText;
    try {
      const j = await r.json();
      msg = j.message || j.error || JSON.stringify(j);
    } catch (_) {}
    throw new ApiError(r.status, msg);
  }
  return r;
}

const json = async (method, path, body) => (await api(method, path, body)).json();
const canWrite = () => state.role !== "viewer";

function main(...children) {
  const m = document.getElementById("main");
  m.replaceChildren(...children);
  return m;
}

function fail(e) {
  if (e instanceof ApiError && e.status === 401) return;
  toast(e.message || String(e));
}

// ---- sign-in ----

function signInView(message) {
  state.csrf = "";
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  const key = el("input", { id: "key", type: "password", autocomplete: "off", required: true });
  const kind = el("select", { id: "kind" }, el("option", { value: "api", text: "API key" }), el("option", { value: "admin", text: "Admin key" }));
  const msg = el("p", { class: "err", role: "alert", id: "signin-error", text: message || "" });
  const form = el(
    "form",
    { class: "card", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title", text: "Sign in" }),
    el("label", { for: "key" }, "Key", key),
    el("label", { for: "kind" }, "Kind", kind),
    el("p", {}, el("button", { type: "submit", id: "signin", text: "Sign in" })),
    msg,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    msg.textContent = "";
    const r = await fetch("/ui/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: key.value, kind: kind.value }),
      credentials: "same-origin",
    });
    key.value = "";
    if (!r.ok) {
      let m = "Sign-in failed";
      try {
        m = (await r.json()).message || m;
      } catch (_) {}
      msg.textContent = m;
      return;
    }
    await start();
  });
  main(form);
  key.focus();
}

async function start() {
  const r = await fetch("/ui/session", { credentials: "same-origin" });
  if (r.status === 401) return signInView();
  const s = await r.json();
  Object.assign(state, { role: s.role, csrf: s.csrf || "", auth: s.auth, who: s.who || "" });
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = !s.auth;
  document.getElementById("who").textContent = s.auth ? `${state.who} (${state.role})` : "open server (no sign-in)";
  for (const a of document.querySelectorAll("[data-role]")) a.hidden = a.dataset.role !== state.role;
  route();
}

document.getElementById("signout").addEventListener("click", async () => {
  await fetch("/ui/session", { method: "DELETE", headers: { "X-StacyVM-CSRF": state.csrf }, credentials: "same-origin" });
  signInView("Signed out.");
});

// ---- routing ----

function route() {
  if (!state.role) return;
  const h = location.hash || "#/sandboxes";
  for (const a of document.querySelectorAll("nav a")) {
    if (h.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const m = h.match(/^#\/sandboxes\/(sb-[0-9a-f]+)$/);
  stopLive();
  const t = h.match(/^#\/tenants\/([A-Za-z0-9._-]+)$/);
  const view = m
    ? sandboxView(m[1])
    : t
      ? tenantView(t[1])
      : h === "#/providers"
        ? providersView()
        : h === "#/audit"
          ? auditView()
          : h === "#/tenants"
            ? tenantsView()
            : sandboxesView();
  view.catch(fail);
  document.getElementById("main").focus();
}
window.addEventListener("hashchange", route);

// ---- sandboxes ----

async function sandboxesView() {
  const list = await json("GET", "/sandboxes");
  const rows = (Array.isArray(list) ? list : list.sandboxes || []).map((s) =>
    el(
      "tr",
      {},
      el("td", { class: "mono" }, el("a", { href: `#/sandboxes/${s.id}`, text: s.id })),
      el("td", { class: `state-${s.state}`, text: s.state }),
      el("td", { text: s.provider }),
      el("td", { class: "mono", text: s.image }),
      el("td", { text: s.created_at || "" }),
      el("td", { class: "mono", text: Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ") }),
    ),
  );
  const filter = el("input", { id: "filter", type: "search", placeholder: "id, state, provider, image, metadata" });
  filter.addEventListener("input", () => {
    const q = filter.value.toLowerCase();
    for (const r of rows) r.hidden = q && !r.textContent.toLowerCase().includes(q);
  });
  const table = el(
    "table",
    { "aria-label": "Sandboxes" },
    el("thead", {}, el("tr", {}, ...["Id", "State", "Provider", "Image", "Created", "Metadata"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, text: "No sandboxes." }))),
  );
  main(el("h1", { text: "Sandboxes" }), canWrite() ? await spawnForm() : null, el("label", { for: "filter" }, "Filter", filter), table);
}

async function spawnForm() {
  let providers = [];
  try {
    const p = await json("GET", "/providers");
    providers = (Array.isArray(p) ? p : p.providers || p.items || []).map((x) => x.name).filter(Boolean);
  } catch (_) {}
  const image = el("input", { id: "spawn-image", placeholder: "default image" });
  const provider = el("select", { id: "spawn-provider" }, el("option", { value: "", text: "default" }), ...providers.map((n) => el("option", { value: n, text: n })));
  const form = el(
    "form",
    { class: "row", "aria-label": "Spawn a sandbox" },
    el("label", { for: "spawn-image" }, "Image", image),
    el("label", { for: "spawn-provider" }, "Provider", provider),
    el("button", { type: "submit", id: "spawn", text: "Spawn" }),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const body = {};
      if (image.value) body.image = image.value;
      if (provider.value) body.provider = provider.value;
      const sb = await json("POST", "/sandboxes", body);
      location.hash = `#/sandboxes/${sb.id}`;
    } catch (e) {
      fail(e);
    }
  });
  return form;
}

async function sandboxView(id) {
  const s = await json("GET", `/sandboxes/${id}`);
  const facts = el("dl", { class: "facts" });
  for (const [k, v] of [["Id", s.id], ["State", s.state], ["Provider", s.provider], ["Image", s.image], ["Owner", s.owner_id], ["Created", s.created_at], ["Expires", s.expires_at]]) {
    facts.append(el("dt", { text: k }), el("dd", { class: "mono", text: v ?? "" }));
  }
  for (const [k, v] of Object.entries(s.metadata || {})) facts.append(el("dt", { text: `metadata ${k}` }), el("dd", { class: "mono", text: v }));
  const parts = [el("h1", {}, "Sandbox ", el("span", { class: "mono", text: id })), facts];
  parts.push(livePanel(id));
  if (canWrite()) parts.push(execPanel(id), terminalPanel(id));
  parts.push(await filesPanel(id, "/workspace"));
  if (canWrite()) {
    const destroy = el("button", { type: "button", class: "danger", id: "destroy", text: "Destroy" });
    destroy.addEventListener("click", async () => {
      if (!confirm(`Destroy ${id}?`)) return;
      try {
        await api("DELETE", `/sandboxes/${id}`);
        location.hash = "#/sandboxes";
      } catch (e) {
        fail(e);
      }
    });
    parts.push(el("h2", { text: "Danger" }), destroy);
  }
  main(...parts);
}

function execPanel(id) {
  const cmd = el("input", { id: "command", class: "mono", placeholder: "echo hello", size: 60 });
  const out = el("pre", { class: "out", id: "output", "aria-live": "polite", "aria-label": "Command output" });
  const form = el("form", { class: "row", "aria-label": "Run a command" }, el("label", { for: "command" }, "Command", cmd), el("button", { type: "submit", id: "run", text: "Run" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.textContent = "…";
    try {
      const r = await json("POST", `/sandboxes/${id}/exec`, { command: cmd.value });
      out.textContent = (r.stdout || "") + (r.stderr || "") + `\n[exit ${r.exit_code}]`;
    } catch (e) {
      out.textContent = "";
      fail(e);
    }
  });
  return el("section", { "aria-labelledby": "exec-title" }, el("h2", { id: "exec-title", text: "Run a command" }), form, out);
}

async function filesPanel(id, dir) {
  const section = el("section", { "aria-labelledby": "files-title", id: "files" });
  const render = async (path) => {
    let items = [];
    try {
      items = await json("GET", `/sandboxes/${id}/files/list?path=${encodeURIComponent(path)}`);
    } catch (e) {
      fail(e);
    }
    const rows = items.map((f) => {
      const name = f.name || (f.path || "").split("/").pop();
      const full = f.path || `${path}/${name}`;
      const dl = el("button", { type: "button", class: "secondary", text: "Download", "aria-label": `Download ${name}` });
      dl.addEventListener("click", async () => {
        try {
          const r = await api("GET", `/sandboxes/${id}/files?path=${encodeURIComponent(full)}`);
          const url = URL.createObjectURL(await r.blob());
          const a = el("a", { href: url, download: name });
          document.body.append(a);
          a.click();
          a.remove();
          setTimeout(() => URL.revokeObjectURL(url), 10000);
        } catch (e) {
          fail(e);
        }
      });
      return el("tr", {}, el("td", { class: "mono", text: name }), el("td", { text: f.is_dir ? "dir" : String(f.size ?? "") }), el("td", {}, f.is_dir ? "" : dl));
    });
    const upload = el("input", { type: "file", id: "upload" });
    upload.addEventListener("change", async () => {
      const file = upload.files[0];
      if (!file) return;
      try {
        await api("PUT", `/sandboxes/${id}/files?path=${encodeURIComponent(`${path}/${file.name}`)}`, undefined, file);
        toast(`Uploaded ${file.name}`);
        render(path);
      } catch (e) {
        fail(e);
      }
    });
    section.replaceChildren(
      el("h2", { id: "files-title" }, "Files in ", el("span", { class: "mono", text: path })),
      canWrite() ? el("label", { for: "upload" }, "Upload a file", upload) : null,
      el(
        "table",
        { "aria-label": "Files" },
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Name" }), el("th", { scope: "col", text: "Size" }), el("th", { scope: "col", text: "" }))),
        el("tbody", {}, rows),
      ),
    );
  };
  await render(dir);
  return section;
}

// ---- live stats and logs ----

let live = [];
function stopLive() {
  for (const stop of live) stop();
  live = [];
}

function livePanel(id) {
  const stats = el("dl", { class: "facts", id: "stats", "aria-live": "off" });
  const logs = el("pre", { class: "out", id: "logs", "aria-label": "Log lines" });
  const tick = async () => {
    try {
      const s = await json("GET", `/sandboxes/${id}/stats`);
      const rows = [];
      for (const [k, v] of Object.entries(s)) if (typeof v !== "object") rows.push(el("dt", { text: k }), el("dd", { class: "mono", text: v }));
      stats.replaceChildren(...rows);
    } catch (e) {
      stats.replaceChildren(el("dt", { text: "stats" }), el("dd", { text: e.message }));
    }
    try {
      const l = await json("GET", `/sandboxes/${id}/logs?lines=50`);
      logs.textContent = (Array.isArray(l) ? l : l.lines || []).join("\n") || "(no log lines)";
    } catch (_) {}
  };
  tick();
  const timer = setInterval(tick, 2000);
  live.push(() => clearInterval(timer));
  return el("section", { "aria-labelledby": "live-title" }, el("h2", { id: "live-title", text: "Live" }), stats, el("h3", { text: "Logs" }), logs);
}

// ---- terminal ----

// A terminal on the WebSocket pty exec. It keeps the text a shell writes
// (carriage returns, backspaces and line feeds applied) and drops other
// escape sequences (colours, cursor moves, titles).
function terminalPanel(id) {
  const screen = el("pre", { class: "out term", id: "terminal", tabindex: 0, role: "log", "aria-label": "Terminal: click here and type" });
  const open = el("button", { type: "button", class: "secondary", id: "terminal-open", text: "Open a terminal" });
  let ws = null;
  let cr = false;
  const write = (data) => {
    const clean = data
      .replace(/\x1b\][^\x07\x1b]*(\x07|\x1b\\)/g, "")
      .replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "")
      .replace(/\x1b[@-Z\\-_]/g, "");
    let text = screen.textContent;
    for (const ch of clean) {
      // A carriage return not followed by a line feed rewrites the line
      // (progress bars); "\r\n" is just a new line.
      if (cr && ch !== "\n") text = text.slice(0, text.lastIndexOf("\n") + 1);
      cr = false;
      if (ch === "\r") {
        cr = true;
      } else if (ch === "\b") {
        if (!text.endsWith("\n")) text = text.slice(0, -1);
      } else if (ch === "\n") {
        text += "\n";
      } else if (ch >= " " || ch === "\t") {
        text += ch;
      }
    }
    screen.textContent = text.slice(-100000);
    screen.scrollTop = screen.scrollHeight;
  };
  const keys = { Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b", ArrowUp: "\x1b[A", ArrowDown: "\x1b[B", ArrowRight: "\x1b[C", ArrowLeft: "\x1b[D" };
  screen.addEventListener("keydown", (ev) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    let data = keys[ev.key];
    if (!data && ev.ctrlKey && ev.key.length === 1) data = String.fromCharCode(ev.key.toUpperCase().charCodeAt(0) - 64);
    if (!data && ev.key.length === 1 && !ev.metaKey) data = ev.key;
    if (!data) return;
    ev.preventDefault();
    ws.send(JSON.stringify({ type: "stdin", data }));
  });
  screen.addEventListener("paste", (ev) => {
    if (!ws) return;
    ev.preventDefault();
    ws.send(JSON.stringify({ type: "stdin", data: ev.clipboardData.getData("text") }));
  });
  open.addEventListener("click", () => {
    if (ws) ws.close();
    screen.textContent = "";
    const proto = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${proto}://${location.host}/api/v1/sandboxes/${id}/exec/ws`);
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ command: "/bin/sh", args: ["-i"], interactive: true, tty: { rows: 24, cols: 100 } }));
      screen.focus();
    });
    ws.addEventListener("message", (ev) => {
      try {
        const m = JSON.parse(ev.data);
        if (m.data !== undefined) write(m.data);
        else if (m.type === "done") write(`\n[exit ${m.exit_code}]\n`);
        else if (m.error) write(`\n[${m.error}]\n`);
      } catch (_) {}
    });
    ws.addEventListener("close", (ev) => {
      write(`\n[connection closed${ev.reason ? `: ${ev.reason}` : ""} (${ev.code})]\n`);
      ws = null;
    });
    live.push(() => ws && ws.close());
  });
  return el("section", { "aria-labelledby": "term-title" }, el("h2", { id: "term-title", text: "Terminal" }), open, screen);
}

// ---- tenants ----

async function tenantsView() {
  const t = await json("GET", "/admin/tenants");
  const list = t.tenants || [];
  const id = el("input", { id: "tenant-id", placeholder: "team-a" });
  const name = el("input", { id: "tenant-name", placeholder: "Team A" });
  const form = el("form", { class: "row", "aria-label": "Create a tenant" }, el("label", { for: "tenant-id" }, "Id", id), el("label", { for: "tenant-name" }, "Name", name), el("button", { type: "submit", id: "tenant-create", text: "Create" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await json("POST", "/admin/tenants", { id: id.value, name: name.value });
      route();
    } catch (e) {
      fail(e);
    }
  });
  main(
    el("h1", { text: "Tenants" }),
    form,
    el(
      "table",
      { "aria-label": "Tenants" },
      el("thead", {}, el("tr", {}, ...["Id", "Name", "Owner"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, list.map((x) => el("tr", {}, el("td", { class: "mono" }, el("a", { href: `#/tenants/${x.id}`, text: x.id })), el("td", { text: x.name || "" }), el("td", { text: x.owner_id || "" })))),
    ),
  );
}

const ROLES = ["viewer", "operator", "admin"];

async function tenantView(tid) {
  const m = await json("GET", `/admin/tenants/${encodeURIComponent(tid)}/members`);
  const p = await json("GET", `/admin/tenants/${encodeURIComponent(tid)}/policies`).catch(() => ({ policies: [] }));
  const setRole = async (user, role) => {
    try {
      await json("PUT", `/admin/tenants/${encodeURIComponent(tid)}/members/${encodeURIComponent(user)}`, { role });
      toast(`${user} is now ${role}`);
      route();
    } catch (e) {
      fail(e);
    }
  };
  const rows = (m.members || []).map((x) => {
    const sel = el("select", { "aria-label": `Role of ${x.user_id}`, class: "member-role" }, ...ROLES.map((r) => el("option", { value: r, text: r, selected: r === x.role })));
    sel.addEventListener("change", () => setRole(x.user_id, sel.value));
    const rm = el("button", { type: "button", class: "danger", text: "Remove", "aria-label": `Remove ${x.user_id}` });
    rm.addEventListener("click", async () => {
      try {
        await api("DELETE", `/admin/tenants/${encodeURIComponent(tid)}/members/${encodeURIComponent(x.user_id)}`);
        route();
      } catch (e) {
        fail(e);
      }
    });
    return el("tr", {}, el("td", { class: "mono", text: x.user_id }), el("td", {}, sel), el("td", {}, rm));
  });
  const user = el("input", { id: "member-user", placeholder: "user id" });
  const role = el("select", { id: "member-role" }, ...ROLES.map((r) => el("option", { value: r, text: r })));
  const add = el("form", { class: "row", "aria-label": "Add a member" }, el("label", { for: "member-user" }, "User", user), el("label", { for: "member-role" }, "Role", role), el("button", { type: "submit", id: "member-add", text: "Add member" }));
  add.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setRole(user.value, role.value);
  });
  main(
    el("h1", {}, "Tenant ", el("span", { class: "mono", text: tid })),
    add,
    el("table", { "aria-label": "Members", id: "members" }, el("thead", {}, el("tr", {}, ...["User", "Role", ""].map((h) => el("th", { scope: "col", text: h })))), el("tbody", {}, rows)),
    el("h2", { text: "Policies" }),
    el("pre", { class: "out", text: JSON.stringify(p.policies || p, null, 2) }),
  );
}

// ---- providers and audit ----

async function providersView() {
  const p = await json("GET", "/providers");
  const list = Array.isArray(p) ? p : p.providers || p.items || [];
  main(
    el("h1", { text: "Providers" }),
    el(
      "table",
      { "aria-label": "Providers" },
      el("thead", {}, el("tr", {}, ...["Name", "Healthy", "Isolation", "Capabilities"].map((h) => el("th", { scope: "col", text: h })))),
      el(
        "tbody",
        {},
        list.map((x) =>
          el("tr", {}, el("td", { text: x.name }), el("td", { text: x.healthy ? "yes" : `no ${x.error || ""}` }), el("td", { text: x.isolation || "" }), el("td", { class: "mono", text: (x.capabilities || []).join(" ") })),
        ),
      ),
    ),
  );
}

async function auditView() {
  const a = await json("GET", "/admin/op-audit?limit=100");
  const rows = Array.isArray(a) ? a : a.records || a.items || [];
  main(
    el("h1", { text: "Audit" }),
    el(
      "table",
      { "aria-label": "Audit" },
      el("thead", {}, el("tr", {}, ...["Time", "Actor", "Action", "Sandbox", "Result", "Detail"].map((h) => el("th", { scope: "col", text: h })))),
      el(
        "tbody",
        {},
        rows.map((r) =>
          el("tr", {}, el("td", { text: r.created_at || r.time || "" }), el("td", { text: r.actor || "" }), el("td", { text: r.action || "" }), el("td", { class: "mono", text: r.sandbox_id || "" }), el("td", { text: r.success === false ? "failed" : "ok" }), el("td", { class: "mono", text: r.detail || "" })),
        ),
      ),
    ),
  );
}

start().catch(fail);
