// StacyVM dashboard. No framework, no build step: this file is embedded in
// the server binary. Every string from the API is attacker-controlled
// (sandbox metadata, file names, command output) and reaches the page
// only through textContent and attribute setters, never as HTML.

const state = { role: "", csrf: "", auth: true, who: "", tenant: "", can: {} };

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
// What the signed-in caller may do, as the server computed it from the
// same permission table the API enforces: a control the API would refuse
// is not shown.
const can = (what) => Boolean(state.can[what]);
const canWrite = () => can("write");

// Replaces a node's children, skipping the absent ones (a control the
// role may not use is `null`).
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const main = (...children) => fill(document.getElementById("main"), ...children);

// A table with a header row; `rows` are <tr> elements.
function table(label, headers, rows, attrs = {}) {
  return el(
    "table",
    { "aria-label": label, ...attrs },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: headers.length, text: "None." }))),
  );
}

const row = (...cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c ?? ""))));
const mono = (text) => el("td", { class: "mono", text: text ?? "" });

// Saves a blob as a file the browser downloads.
function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// A button that runs `action`, showing failures.
function button(text, action, attrs = {}) {
  const b = el("button", { type: "button", text, ...attrs });
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await action();
    } catch (e) {
      fail(e);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

// A link only to http(s) addresses (never javascript: or data:).
function safeLink(url, text, attrs = {}) {
  if (!/^https?:\/\//i.test(url || "")) return el("span", { class: "mono", text: url || "" });
  return el("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "mono", text: text || url, ...attrs });
}

function fail(e) {
  if (e instanceof ApiError && e.status === 401) return;
  toast(e.message || String(e));
}

// ---- sign-in ----

// The messages for an OIDC sign-in that came back refused (the server
// puts only the code in the URL; details stay in its log).
const SIGNIN_ERRORS = {
  state: "That sign-in link was not started by this browser, or it was already used or expired. Start again.",
  denied: "The identity provider did not sign you in.",
  exchange: "The identity provider did not accept the sign-in (code exchange failed).",
  token: "The identity provider's token was not accepted.",
  unavailable: "The identity provider cannot be reached or is misconfigured.",
  request: "The sign-in request was malformed.",
  rate_limited: "Too many failed sign-ins from this address; retry later.",
};

function signInView(message, oidc) {
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
    oidc ? el("p", {}, el("a", { href: "/ui/oidc/start", id: "signin-oidc", class: "button", text: "Sign in with single sign-on" })) : null,
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

async function start(message) {
  const r = await fetch("/ui/session", { credentials: "same-origin" });
  if (r.status === 401) {
    const body = await r.json().catch(() => ({}));
    const code = (location.hash.match(/^#signin-error=([a-z_]+)$/) || [])[1];
    if (code) history.replaceState(null, "", "/ui/");
    return signInView(code ? SIGNIN_ERRORS[code] || "Sign-in failed." : message || "", body.oidc);
  }
  const s = await r.json();
  Object.assign(state, { role: s.role, csrf: s.csrf || "", auth: s.auth, who: s.who || "", tenant: s.tenant || "", can: s.can || {} });
  if (location.hash.startsWith("#signin-error=")) history.replaceState(null, "", "/ui/");
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = !s.auth;
  document.getElementById("who").textContent = s.auth ? `${state.who} (${state.role})` : "open server (no sign-in)";
  for (const a of document.querySelectorAll("[data-need]")) a.hidden = !can(a.dataset.need);
  route();
}

document.getElementById("signout").addEventListener("click", async () => {
  await fetch("/ui/session", { method: "DELETE", headers: { "X-StacyVM-CSRF": state.csrf }, credentials: "same-origin" });
  start("Signed out.");
});

// ---- routing ----

function route() {
  if (!state.role) return;
  const h = location.hash || "#/sandboxes";
  for (const a of document.querySelectorAll("nav a")) {
    if (h.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  stopLive();
  let view = null;
  for (const [pattern, show] of ROUTES) {
    const m = h.match(pattern);
    if (m) {
      view = show(...m.slice(1).map(decodeURIComponent));
      break;
    }
  }
  (view || sandboxesView()).catch(fail);
  document.getElementById("main").focus();
}
window.addEventListener("hashchange", route);

// Views by address; ids in addresses are the API's own (checked shapes).
const ROUTES = [
  [/^#\/sandboxes\/(sb-[0-9a-f]+)$/, (id) => sandboxView(id)],
  [/^#\/sandboxes$/, () => sandboxesView()],
  [/^#\/templates$/, () => templatesView()],
  [/^#\/environments$/, () => environmentsView()],
  [/^#\/builds\/([A-Za-z0-9_-]+)$/, (id) => buildView(id)],
  [/^#\/quotas$/, () => quotasView()],
  [/^#\/workers$/, () => workersView()],
  [/^#\/providers$/, () => providersView()],
  [/^#\/system$/, () => systemView()],
  [/^#\/tenants$/, () => tenantsView()],
  [/^#\/tenants\/([A-Za-z0-9._-]+)$/, (t) => tenantView(t)],
  [/^#\/audit$/, () => auditView()],
];

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
  parts.push(await previewsPanel(id));
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

// A path's parent ("/" stays "/").
const parentOf = (path) => path.replace(/\/[^/]*\/?$/, "") || "/";
const joinPath = (dir, name) => `${dir.replace(/\/$/, "")}/${name}`;

// The sandbox's files: browse directories (a path field, names that open
// directories, "..") with upload and download.
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
      const full = f.path || joinPath(path, name);
      if (f.is_dir) {
        const open = el("button", { type: "button", class: "link mono", text: `${name}/`, "aria-label": `Open directory ${name}` });
        open.addEventListener("click", () => render(full).catch(fail));
        return row(open, "dir", "");
      }
      const dl = button("Download", async () => {
        const r = await api("GET", `/sandboxes/${id}/files?path=${encodeURIComponent(full)}`);
        download(await r.blob(), name);
      }, { class: "secondary", "aria-label": `Download ${name}` });
      return row(el("span", { class: "mono", text: name }), String(f.size ?? ""), dl);
    });
    if (path !== "/") {
      const up = el("button", { type: "button", class: "link mono", text: "..", id: "files-up", "aria-label": "Open the parent directory" });
      up.addEventListener("click", () => render(parentOf(path)).catch(fail));
      rows.unshift(row(up, "dir", ""));
    }
    const where = el("input", { id: "files-path", class: "mono", value: path });
    const go = el("form", { class: "row", "aria-label": "Open a directory" }, el("label", { for: "files-path" }, "Directory", where), el("button", { type: "submit", class: "secondary", id: "files-go", text: "Open" }));
    go.addEventListener("submit", (ev) => {
      ev.preventDefault();
      render(where.value.trim() || "/").catch(fail);
    });
    const upload = el("input", { type: "file", id: "upload" });
    upload.addEventListener("change", async () => {
      const file = upload.files[0];
      if (!file) return;
      try {
        await api("PUT", `/sandboxes/${id}/files?path=${encodeURIComponent(joinPath(path, file.name))}`, undefined, file);
        toast(`Uploaded ${file.name}`);
        render(path);
      } catch (e) {
        fail(e);
      }
    });
    fill(
      section,
      el("h2", { id: "files-title" }, "Files in ", el("span", { class: "mono", id: "files-dir", text: path })),
      go,
      canWrite() ? el("label", { for: "upload" }, "Upload a file here", upload) : null,
      table("Files", ["Name", "Size", ""], rows),
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

// A terminal on the WebSocket pty exec: term.js emulates the screen
// (cursor addressing, colours, the alternate screen of full-screen
// programs), the pty is sized to the panel and resized with it.
function terminalPanel(id) {
  const box = el("div", { id: "terminal", "aria-label": "Terminal: click here and type", role: "application" });
  const status = el("p", { id: "terminal-status", class: "muted", "aria-live": "polite" });
  const open = el("button", { type: "button", class: "secondary", id: "terminal-open", text: "Open a terminal" });
  let ws = null;
  let view = null;
  const send = (m) => ws && ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(m));
  const close = () => {
    if (ws) ws.close();
    if (view) view.dispose();
    ws = view = null;
  };
  open.addEventListener("click", () => {
    close();
    const model = new StacyTerm.TermModel(100, 24, { scrollback: 2000 });
    view = new StacyTerm.TermView(box, model, {
      onData: (data) => send({ type: "stdin", data }),
      onResize: ({ cols, rows }) => {
        box.dataset.size = `${rows} ${cols}`;
        send({ type: "resize", rows, cols });
      },
    });
    const { cols, rows } = view.fit();
    box.dataset.size = `${rows} ${cols}`;
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${proto}://${location.host}/api/v1/sandboxes/${id}/exec/ws`);
    ws = socket;
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ command: "/bin/sh", args: ["-i"], interactive: true, tty: { rows, cols }, env: { TERM: "xterm-256color" } }));
      status.textContent = "Connected.";
      view.focus();
    });
    socket.addEventListener("message", (ev) => {
      try {
        const m = JSON.parse(ev.data);
        if (m.data !== undefined) model.write(m.data);
        else if (m.type === "done") status.textContent = `The shell exited (${m.exit_code}).`;
        else if (m.error) status.textContent = m.error;
      } catch (_) {}
    });
    socket.addEventListener("close", (ev) => {
      if (ws !== socket) return;
      status.textContent = `Connection closed${ev.reason ? `: ${ev.reason}` : ""} (${ev.code}).`;
      ws = null;
    });
    const refit = () => view && view.fit();
    window.addEventListener("resize", refit);
    live.push(() => {
      window.removeEventListener("resize", refit);
      close();
    });
  });
  return el("section", { "aria-labelledby": "term-title" }, el("h2", { id: "term-title", text: "Terminal" }), open, status, box);
}

// ---- previews ----

async function previewsPanel(id) {
  const section = el("section", { "aria-labelledby": "previews-title", id: "previews" });
  const minted = el("pre", { class: "out", id: "preview-token", hidden: true, "aria-live": "polite", "aria-label": "New preview link" });
  const render = async () => {
    const ports = await json("GET", `/sandboxes/${id}/ports`).catch((e) => (fail(e), []));
    const rows = ports.map((p) => {
      const actions = [];
      if (canWrite()) {
        if (p.mode === "token")
          actions.push(
            button("New link", async () => {
              const t = await json("POST", `/sandboxes/${id}/ports/${p.port}/tokens`, { ttl: "1h" });
              minted.hidden = false;
              minted.textContent = `Link for port ${p.port} (shown once, expires ${t.expires_at}):\n${t.url}`;
            }, { class: "secondary", "aria-label": `New link for port ${p.port}` }),
          );
        actions.push(
          button("Unexpose", async () => {
            await api("DELETE", `/sandboxes/${id}/ports/${p.port}`);
            render();
          }, { class: "danger", "aria-label": `Unexpose port ${p.port}` }),
        );
      }
      return row(String(p.port), p.mode, safeLink(p.url), el("span", { class: "mono", text: p.path || "" }), p.created_at || "", el("span", {}, ...actions));
    });
    const port = el("input", { id: "expose-port", type: "number", min: 1, max: 65535, placeholder: "8080" });
    const mode = el("select", { id: "expose-mode" }, el("option", { value: "token", text: "token (links that expire)" }), el("option", { value: "public", text: "public" }));
    const form = el("form", { class: "row", "aria-label": "Expose a port" }, el("label", { for: "expose-port" }, "Port", port), el("label", { for: "expose-mode" }, "Access", mode), el("button", { type: "submit", id: "expose", text: "Expose" }));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        await json("POST", `/sandboxes/${id}/ports/${Number(port.value)}`, { mode: mode.value });
        render();
      } catch (e) {
        fail(e);
      }
    });
    fill(section, 
      el("h2", { id: "previews-title", text: "Previews" }),
      canWrite() ? form : null,
      table("Exposed ports", ["Port", "Access", "URL", "Path", "Since", ""], rows, { id: "ports" }),
      minted,
    );
  };
  await render();
  return section;
}

// ---- templates ----

async function templatesView() {
  const list = await json("GET", "/templates");
  const rows = list.map((t) => {
    const pool = t.pool ? `${t.pool.ready}/${t.pool.target} ready, ${t.pool.hits} hits, ${t.pool.misses} misses` : String(t.pool_size || 0);
    const actions = [];
    if (canWrite())
      actions.push(
        button("Spawn", async () => {
          const sb = await json("POST", `/templates/${encodeURIComponent(t.name)}/spawn`, {});
          location.hash = `#/sandboxes/${sb.id || (sb.sandbox && sb.sandbox.id)}`;
        }, { "aria-label": `Spawn from ${t.name}`, class: "template-spawn" }),
      );
    if (can("shared"))
      actions.push(
        button("Delete", async () => {
          if (!confirm(`Delete template ${t.name}?`)) return;
          await api("DELETE", `/templates/${encodeURIComponent(t.name)}`);
          route();
        }, { class: "danger", "aria-label": `Delete template ${t.name}` }),
      );
    return row(el("span", { class: "mono", text: t.name }), mono(t.image), t.provider || "default", `${t.memory_mb} MiB, ${t.vcpus} vCPU, ${t.ttl}`, Object.keys(t.env || {}).join(" "), pool, el("span", {}, ...actions));
  });
  const parts = [el("h1", { text: "Templates" }), table("Templates", ["Name", "Image", "Provider", "Resources", "Env", "Pool", ""], rows, { id: "templates" })];
  if (can("shared")) parts.splice(1, 0, templateForm());
  main(...parts);
}

function templateForm() {
  const name = el("input", { id: "template-name", placeholder: "python-dev", required: true });
  const image = el("input", { id: "template-image", placeholder: "host", required: true });
  const setup = el("input", { id: "template-setup", class: "mono", placeholder: "pip install -r requirements.txt", size: 40 });
  const form = el(
    "form",
    { class: "row", "aria-label": "Create a template" },
    el("label", { for: "template-name" }, "Name", name),
    el("label", { for: "template-image" }, "Image", image),
    el("label", { for: "template-setup" }, "Setup command", setup),
    el("button", { type: "submit", id: "template-create", text: "Create template" }),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const body = { name: name.value, image: image.value };
      if (setup.value) body.setup = [setup.value];
      await json("POST", "/templates", body);
      route();
    } catch (e) {
      fail(e);
    }
  });
  return form;
}

// ---- environments and builds ----

async function environmentsView() {
  const specs = await json("GET", "/environments/specs");
  const builds = await json("GET", "/environments/builds?limit=50");
  const specRows = specs.map((s) =>
    row(
      mono(s.name),
      mono(s.base_image),
      [...(s.apt_packages || []), ...(s.python_packages || [])].join(" ") || (s.dockerfile ? "Dockerfile" : ""),
      s.updated_at || "",
      canWrite()
        ? button("Build", async () => {
            const b = await json("POST", "/environments/builds", { spec_id: s.id });
            location.hash = `#/builds/${b.id}`;
          }, { "aria-label": `Build ${s.name}`, class: "spec-build" })
        : "",
    ),
  );
  const buildRows = builds.map(({ build: b, spec }) =>
    row(el("a", { href: `#/builds/${b.id}`, class: "mono", text: b.id }), mono(spec ? spec.name : b.spec_id), el("span", { class: `state-${b.status}`, text: b.status }), b.current_step || "", b.created_at || ""),
  );
  const parts = [el("h1", { text: "Environments" })];
  if (canWrite()) parts.push(specForm());
  parts.push(table("Environment specs", ["Name", "Base", "Packages", "Updated", ""], specRows, { id: "specs" }), el("h2", { text: "Builds" }), table("Builds", ["Build", "Spec", "Status", "Step", "Created"], buildRows, { id: "builds" }));
  main(...parts);
}

function specForm() {
  const name = el("input", { id: "spec-name", placeholder: "data-science", required: true });
  const dockerfile = el("textarea", { id: "spec-dockerfile", class: "mono", rows: 4, cols: 60, placeholder: "FROM host\nRUN echo ready > /etc/motd" });
  const form = el(
    "form",
    { class: "row", "aria-label": "Create an environment spec" },
    el("label", { for: "spec-name" }, "Name", name),
    el("label", { for: "spec-dockerfile" }, "Dockerfile", dockerfile),
    el("button", { type: "submit", id: "spec-create", text: "Create spec" }),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await json("POST", "/environments/specs", { name: name.value, dockerfile: dockerfile.value });
      route();
    } catch (e) {
      fail(e);
    }
  });
  return form;
}

async function buildView(id) {
  const path = `/environments/builds/${encodeURIComponent(id)}`;
  const b = await json("GET", path);
  const facts = el("dl", { class: "facts", id: "build-facts" });
  const status = el("dd", { class: `mono state-${b.status}`, id: "build-status" });
  const actions = el("p", { class: "row", id: "build-actions" });
  // The facts and actions of the build as it stands.
  const show = (x) => {
    status.textContent = x.status;
    status.className = `mono state-${x.status}`;
    fill(facts, el("dt", { text: "Status" }), status);
    for (const [k, v] of [["Spec", x.spec_id], ["Provider", x.provider], ["Image", x.digest_local], ["Error", x.error]]) if (v) facts.append(el("dt", { text: k }), el("dd", { class: "mono", text: v }));
    const running = ["queued", "building"].includes(x.status);
    fill(
      actions,
      canWrite() && running
        ? button("Cancel build", async () => {
            show(await json("POST", `${path}/cancel`));
          }, { class: "danger", id: "build-cancel" })
        : null,
      canWrite() && x.status === "ready"
        ? button("Spawn a sandbox from it", async () => {
            const c = await json("GET", `${path}/spawn-config`);
            const body = { image: c.image };
            if (c.provider) body.provider = c.provider;
            const sb = await json("POST", "/sandboxes", body);
            location.hash = `#/sandboxes/${sb.id}`;
          }, { id: "build-spawn" })
        : null,
    );
  };
  show(b);
  const log = el("pre", { class: "out", id: "build-log", "aria-label": "Build log", "aria-live": "off" });
  main(el("h1", {}, "Build ", el("span", { class: "mono", text: id })), facts, actions, el("h2", { text: "Log" }), log);
  // Follow the log as it is written; the stream ends with the build.
  const abort = new AbortController();
  live.push(() => abort.abort());
  try {
    const r = await fetch(`/api/v1${path}/logs?follow=1`, { headers: { "X-StacyVM-CSRF": state.csrf }, credentials: "same-origin", signal: abort.signal });
    if (!r.ok) throw new ApiError(r.status, `log: HTTP ${r.status}`);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      log.textContent = (log.textContent + dec.decode(value, { stream: true })).slice(-500000);
      log.scrollTop = log.scrollHeight;
    }
    show(await json("GET", path));
  } catch (e) {
    if (e.name !== "AbortError") fail(e);
  }
}

// ---- quotas ----

async function quotasView() {
  const list = await json("GET", "/quotas");
  const summary = await json("GET", "/quotas/summary");
  const rows = list.map((q) =>
    row(
      mono(q.owner_id),
      String(q.max_sandboxes || "—"),
      q.max_ttl || "—",
      q.max_exec_timeout || "—",
      q.updated_at || "",
      can("admin")
        ? button("Remove", async () => {
            await api("DELETE", `/quotas/${encodeURIComponent(q.owner_id)}`);
            route();
          }, { class: "danger", "aria-label": `Remove the quota of ${q.owner_id}` })
        : "",
    ),
  );
  const facts = el("dl", { class: "facts", id: "quota-summary" });
  for (const [k, v] of Object.entries(summary)) facts.append(el("dt", { text: k.replaceAll("_", " ") }), el("dd", { class: "mono", text: v }));
  const parts = [el("h1", { text: "Quotas" }), facts];
  if (can("admin")) parts.push(quotaForm());
  parts.push(table("Quotas", ["Owner", "Sandboxes", "TTL", "Exec timeout", "Updated", ""], rows, { id: "quotas" }));
  main(...parts);
}

function quotaForm() {
  const owner = el("input", { id: "quota-owner", placeholder: "user id", required: true });
  const max = el("input", { id: "quota-max", type: "number", min: 0, placeholder: "10" });
  const ttl = el("input", { id: "quota-ttl", placeholder: "2h" });
  const exec = el("input", { id: "quota-exec", placeholder: "5m" });
  const form = el(
    "form",
    { class: "row", "aria-label": "Set a quota" },
    el("label", { for: "quota-owner" }, "Owner", owner),
    el("label", { for: "quota-max" }, "Max sandboxes", max),
    el("label", { for: "quota-ttl" }, "Max TTL", ttl),
    el("label", { for: "quota-exec" }, "Max exec timeout", exec),
    el("button", { type: "submit", id: "quota-set", text: "Set quota" }),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const body = {};
      if (max.value) body.max_sandboxes = Number(max.value);
      if (ttl.value) body.max_ttl = ttl.value;
      if (exec.value) body.max_exec_timeout = exec.value;
      await json("PUT", `/quotas/${encodeURIComponent(owner.value)}`, body);
      route();
    } catch (e) {
      fail(e);
    }
  });
  return form;
}

// ---- workers ----

async function workersView() {
  const list = await json("GET", "/workers");
  const rows = list.map((w) =>
    row(mono(w.id), w.hostname || "", el("span", { class: `state-${w.stale ? "stale" : w.status}`, text: w.stale ? `${w.status} (stale)` : w.status }), (w.providers || []).join(" "), (w.capabilities || []).join(" "), w.capacity && w.capacity.max_sandboxes ? String(w.capacity.max_sandboxes) : "unlimited", w.last_heartbeat || ""),
  );
  main(el("h1", { text: "Workers" }), table("Workers", ["Id", "Host", "Status", "Providers", "Capabilities", "Capacity", "Last heartbeat"], rows, { id: "workers" }));
}

// ---- system: host graphs, metrics, diagnostics ----

// A line graph of the last values of one series, drawn as SVG.
function sparkline(label, unit, max) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 300 60");
  svg.setAttribute("class", "graph");
  svg.setAttribute("role", "img");
  const line = document.createElementNS(NS, "polyline");
  svg.append(line);
  const now = el("span", { class: "mono graph-now", text: "…" });
  const values = [];
  const figure = el("figure", { class: "graph-box" }, el("figcaption", {}, label, " ", now), svg);
  return {
    figure,
    push(v) {
      values.push(Number(v) || 0);
      if (values.length > 60) values.shift();
      const top = Math.max(max || 0, ...values, 1e-9);
      // The newest sample at the right edge, two minutes across.
      const x0 = 300 - (values.length - 1) * (300 / 59);
      line.setAttribute("points", values.map((x, i) => `${x0 + (i * 300) / 59},${58 - (x / top) * 56}`).join(" "));
      now.textContent = `${values[values.length - 1].toFixed(1)} ${unit}`;
      svg.setAttribute("aria-label", `${label}: ${now.textContent}`);
    },
  };
}

async function systemView() {
  const graphs = {
    cpu_pct: sparkline("CPU", "%", 100),
    mem_pct: sparkline("Memory", "%", 100),
    load1: sparkline("Load", "", 0),
    net_rx_bps: sparkline("Network in", "B/s", 0),
    net_tx_bps: sparkline("Network out", "B/s", 0),
  };
  const active = sparkline("Active sandboxes", "", 0);
  const metrics = el("dl", { class: "facts", id: "metrics" });
  const ops = el("div", { id: "operations" });
  const diag = el("pre", { class: "out", id: "diagnostics", "aria-label": "Diagnostics" });
  const tick = async () => {
    try {
      const s = await json("GET", "/system/stats");
      for (const [k, g] of Object.entries(graphs)) g.push(s[k]);
      const m = await json("GET", "/metrics");
      const facts = [];
      const mib = (n) => `${(Number(n) / 1048576).toFixed(1)} MiB`;
      for (const [k, v] of Object.entries(m)) if (typeof v !== "object") facts.push(el("dt", { text: k.replaceAll("_", " ") }), el("dd", { class: "mono", text: k.startsWith("memory_") ? mib(v) : v }));
      active.push(m.sandboxes ? m.sandboxes.active : 0);
      for (const [k, v] of [["active sandboxes", m.sandboxes && m.sandboxes.active], ["workers online", m.workers && m.workers.online], ["active leases", m.leases && m.leases.active], ["spawn queue", m.scheduler && m.scheduler.spawn_queue_depth]])
        if (v !== undefined) facts.push(el("dt", { text: k }), el("dd", { class: "mono", text: v }));
      metrics.replaceChildren(...facts);
      const ms = (x) => (x === undefined ? "" : `${Number(x).toFixed(1)} ms`);
      const opRows = (m.operations || []).map((o) => row(o.operation, o.provider || "", String(o.success_total ?? ""), String(o.failure_total ?? ""), ms(o.latency_avg_ms), ms(o.latency_max_ms)));
      ops.replaceChildren(table("Operations", ["Operation", "Provider", "Succeeded", "Failed", "Mean", "Max"], opRows));
    } catch (e) {
      fail(e);
    }
  };
  const parts = [el("h1", { text: "System" }), el("div", { class: "graphs", id: "graphs" }, ...Object.values(graphs).map((g) => g.figure), active.figure), el("h2", { text: "Metrics" }), metrics, el("h2", { text: "Operations" }), ops];
  if (can("admin")) parts.push(el("h2", { text: "Diagnostics" }), diag);
  main(...parts);
  await tick();
  if (can("admin")) json("GET", "/diagnostics").then((d) => (diag.textContent = JSON.stringify(d, null, 2)), fail);
  const timer = setInterval(tick, 2000);
  live.push(() => clearInterval(timer));
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
    policyForm(tid),
    policyTable(tid, p.policies || []),
  );
}

const POLICY_KINDS = ["image", "provider", "network", "egress", "preview", "worker"];

// Policies of the tenant (removable here) and the global ones it is
// subject to, in the order they are evaluated.
function policyTable(tid, list) {
  const rows = list.map((x) =>
    row(
      String(x.priority),
      x.resource_type,
      el("span", { class: `effect-${x.effect}`, text: x.effect }),
      mono(x.pattern),
      x.tenant_id ? "tenant" : "global",
      x.tenant_id === tid
        ? button("Remove", async () => {
            await api("DELETE", `/admin/tenants/${encodeURIComponent(tid)}/policies/${encodeURIComponent(x.id)}`);
            route();
          }, { class: "danger", "aria-label": `Remove policy ${x.resource_type} ${x.effect} ${x.pattern}` })
        : "",
    ),
  );
  return table("Policies", ["Priority", "Resource", "Effect", "Pattern", "Scope", ""], rows, { id: "policies" });
}

function policyForm(tid) {
  const kind = el("select", { id: "policy-kind" }, ...POLICY_KINDS.map((k) => el("option", { value: k, text: k })));
  const effect = el("select", { id: "policy-effect" }, el("option", { value: "deny", text: "deny" }), el("option", { value: "allow", text: "allow" }));
  const pattern = el("input", { id: "policy-pattern", class: "mono", placeholder: "docker.io/library/*", required: true });
  const priority = el("input", { id: "policy-priority", type: "number", value: 100 });
  const form = el(
    "form",
    { class: "row", "aria-label": "Add a policy" },
    el("label", { for: "policy-kind" }, "Resource", kind),
    el("label", { for: "policy-effect" }, "Effect", effect),
    el("label", { for: "policy-pattern" }, "Pattern", pattern),
    el("label", { for: "policy-priority" }, "Priority", priority),
    el("button", { type: "submit", id: "policy-add", text: "Add policy" }),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await json("POST", `/admin/tenants/${encodeURIComponent(tid)}/policies`, { resource_type: kind.value, effect: effect.value, pattern: pattern.value, priority: Number(priority.value) });
      route();
    } catch (e) {
      fail(e);
    }
  });
  return form;
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

// The audit trail: operation rows (spawn, exec, files, previews, …) or
// admin rows (every administrative call), filtered by the server; the
// same filters export CSV.
const AUDIT_FILTERS = {
  op: [["since", "Since", "24h or 2026-01-01T00:00:00Z"], ["actor", "Actor", "api-key"], ["action", "Action", "sandbox.spawn"], ["sandbox_id", "Sandbox", "sb-…"], ["tenant_id", "Tenant", "team-a"]],
  admin: [["since", "Since", "24h"], ["actor", "Actor", "admin-key"], ["method", "Method", "POST"], ["tenant_id", "Tenant", "team-a"]],
};

async function auditView() {
  const kind = el("select", { id: "audit-kind" }, el("option", { value: "op", text: "Operations" }), el("option", { value: "admin", text: "Administration" }));
  const fields = el("span", { class: "row" });
  const inputs = {};
  const results = el("div", { id: "audit-results" });
  const drawFields = () => {
    for (const k of Object.keys(inputs)) delete inputs[k];
    fields.replaceChildren(
      ...AUDIT_FILTERS[kind.value].map(([name, label, hint]) => {
        inputs[name] = el("input", { id: `audit-${name}`, placeholder: hint });
        return el("label", { for: `audit-${name}` }, label, inputs[name]);
      }),
    );
  };
  const query = (extra) => {
    const q = new URLSearchParams({ limit: "200", ...extra });
    for (const [k, i] of Object.entries(inputs)) if (i.value.trim()) q.set(k, i.value.trim());
    return `/admin/${kind.value === "op" ? "op-audit" : "audit"}?${q}`;
  };
  const search = async () => {
    const a = await json("GET", query());
    const list = Array.isArray(a) ? a : a.records || a.items || [];
    const rows =
      kind.value === "op"
        ? list.map((r) => row(r.created_at || "", r.actor || "", r.action || "", mono(r.sandbox_id), r.status || "", mono(r.resource), mono(r.detail)))
        : list.map((r) => row(r.created_at || "", r.actor || "", r.method || "", mono(r.path), String(r.status ?? r.status_code ?? ""), mono(r.tenant_id)));
    const headers = kind.value === "op" ? ["Time", "Actor", "Action", "Sandbox", "Result", "Resource", "Detail"] : ["Time", "Actor", "Method", "Path", "Status", "Tenant"];
    results.replaceChildren(el("p", { id: "audit-count", text: `${list.length} rows` }), table("Audit", headers, rows, { id: "audit" }));
  };
  const form = el(
    "form",
    { class: "row", "aria-label": "Search the audit trail" },
    el("label", { for: "audit-kind" }, "Trail", kind),
    fields,
    el("button", { type: "submit", id: "audit-search", text: "Search" }),
    button("Export CSV", async () => {
      const r = await api("GET", query({ format: "csv", limit: "500" }));
      download(await r.blob(), `stacyvm-${kind.value}-audit.csv`);
    }, { class: "secondary", id: "audit-csv" }),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    search().catch(fail);
  });
  kind.addEventListener("change", () => {
    drawFields();
    search().catch(fail);
  });
  drawFields();
  main(el("h1", { text: "Audit" }), form, results);
  await search();
}

start().catch(fail);
