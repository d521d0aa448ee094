//! The web dashboard against the real binary: its files and their
//! security headers, sign-in sessions (cookie flags, CSRF, cross-origin
//! WebSockets, sign-out, wrong keys), then the page itself in headless
//! Chromium over WebDriver: sign in, spawn, run a command, upload a file,
//! hostile metadata and output rendered as text, a terminal on a pty,
//! tenants and a member's role change as the admin, every control named;
//! screenshots kept under the cache dir.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The busybox image the docker tests import, built on by the dashboard.
const BUILD_BASE: &str = "stacyvm-test/docker-busybox:1";
const API_KEY: &str = "dash-api-key-0123456789abcdef";
const ADMIN_KEY: &str = "dash-admin-key-0123456789abcdef";

fn serve(dir: &std::path::Path) -> common::Server {
    common::Server::start(
        dir,
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_AUTH_ENABLED", "true"),
            ("STACYVM_AUTH_API_KEY", API_KEY),
            ("STACYVM_AUTH_ADMIN_API_KEY", ADMIN_KEY),
        ],
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The session cookie (`name=value`) a sign-in answered.
fn session_cookie(r: &reqwest::Response) -> (String, String) {
    let set = r
        .headers()
        .get("set-cookie")
        .expect("set-cookie")
        .to_str()
        .expect("ascii")
        .to_string();
    let pair = set.split(';').next().expect("pair").trim().to_string();
    (pair, set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_cookies_the_page_cannot_read_and_other_sites_cannot_use() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let root = server.url.trim_end_matches("/api/v1").to_string();
    let c = client();

    // The page and its files, with a policy that forbids inline script.
    let r = c.get(format!("{root}/")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 302);
    assert_eq!(r.headers()["location"], "/ui/");
    let r = c.get(format!("{root}/ui/")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(r.text().await.expect("html").contains("/ui/app.js"));
    for (path, ty) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = c.get(format!("{root}{path}")).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with(ty));
    }

    // Not signed in; a wrong key; a form post (what another site can send).
    let r = c
        .get(format!("{root}/ui/session"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(format!("{root}/ui/session"))
        .json(&json!({"key": "wrong", "kind": "api"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = c
        .post(format!("{root}/ui/session"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={API_KEY}&kind=api"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 415);

    // Signed in: an HttpOnly, SameSite=Strict cookie; the key never comes back.
    let r = c
        .post(format!("{root}/ui/session"))
        .json(&json!({"key": API_KEY, "kind": "api"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    let (cookie, set) = session_cookie(&r);
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"),
        "{set}"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["role"], "api", "{body}");
    assert!(!body.to_string().contains(API_KEY));
    assert!(!cookie.contains(API_KEY));
    let csrf = body["csrf"].as_str().expect("csrf").to_string();
    assert_eq!(csrf.len(), 64);

    // The cookie alone is not enough: the CSRF token must come with it.
    let api = |path: &str| format!("{root}/api/v1{path}");
    let r = c
        .get(api("/sandboxes"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.expect("text").contains("X-StacyVM-CSRF"));
    let r = c
        .get(api("/sandboxes"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", "0".repeat(64))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403);
    let r = c
        .get(api("/sandboxes"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", &csrf)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    // An API role: no admin routes through the session either.
    let r = c
        .get(api("/admin/op-audit"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", &csrf)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403);

    // A WebSocket with the cookie: only from this origin.
    let host = root.trim_start_matches("http://").to_string();
    for (origin, want) in [
        ("http://evil.example", 403u16),
        ("null", 403),
        (root.as_str(), 200),
    ] {
        let r = c
            .get(api("/sandboxes"))
            .header("cookie", &cookie)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("host", &host)
            .header("origin", origin)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), want, "origin {origin}");
    }

    // Signing out needs the token too, then the session is gone.
    let r = c
        .delete(format!("{root}/ui/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 403);
    let r = c
        .delete(format!("{root}/ui/session"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", &csrf)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 204);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .expect("c")
        .contains("Max-Age=0"));
    let r = c
        .get(api("/sandboxes"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", &csrf)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .get(format!("{root}/ui/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    profile: PathBuf,
    url: String,
    http: reqwest::Client,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The browser chromedriver started outlives it: every process of
        // this test's profile goes too.
        let needle = format!("--user-data-dir={}", self.profile.display());
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

impl Driver {
    async fn start(profile: &std::path::Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/test installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{url}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut d = Driver {
            child,
            profile: profile.to_path_buf(),
            url,
            http,
            session: String::new(),
        };
        let v = d
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--window-size=1280,900",
                                 format!("--user-data-dir={}", profile.display())],
                        "prefs": {
                            "download.default_directory": profile.join("downloads"),
                            "download.prompt_for_download": false,
                        },
                    }
                }}}),
            )
            .await;
        d.session = v["sessionId"].as_str().expect("session").to_string();
        d
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let path = if self.session.is_empty() {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if !body.is_null() {
            r = r.json(&body);
        }
        let v: Value = r
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("json");
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {v}");
        }
        v["value"].clone()
    }

    async fn try_find(&self, css: &str) -> Option<String> {
        let r = self
            .http
            .post(format!("{}/session/{}/element", self.url, self.session))
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .expect("webdriver");
        let v: Value = r.json().await.expect("json");
        // W3C's element reference key; an error ("no such element") has none.
        v["value"]["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits for `css` to exist (10 s).
    async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {css} on the page: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The rendered text of `css` ("" when absent; read in one script
    /// call, so a re-render between finding and reading cannot race).
    async fn text(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/execute/sync",
                json!({"script": "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", "args": [css]}),
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Types `text` as key presses into whatever has the focus.
    async fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.call(
            reqwest::Method::POST,
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        self.on_element(css, "click", json!({})).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "value", json!({ "text": text })).await;
    }

    /// `POST …/element/{e}/{what}` on `css`; the page may re-render
    /// between finding and acting (a route change): find again then.
    async fn on_element(&self, css: &str, what: &str, body: Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = self.find(css).await;
            let r = self
                .http
                .post(format!(
                    "{}/session/{}/element/{e}/{what}",
                    self.url, self.session
                ))
                .json(&body)
                .send()
                .await
                .expect("webdriver");
            let v: Value = r.json().await.expect("json");
            match v["value"]["error"].as_str() {
                None => return,
                Some(
                    "stale element reference"
                    | "element click intercepted"
                    | "element not interactable",
                ) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(_) => panic!("{what} {css}: {v}"),
            }
        }
    }

    async fn script(&self, js: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": js, "args": []}),
        )
        .await
    }

    /// Waits until `css`'s text contains `want` (20 s).
    async fn wait_text(&self, css: &str, want: &str) -> String {
        self.wait_text_for(css, want, Duration::from_secs(20)).await
    }

    async fn wait_text_for(&self, css: &str, want: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.text(css).await;
            if t.contains(want) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {want:?}: {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("png"))
            .expect("base64");
        let dir = PathBuf::from(
            std::env::var("STACYVM_ARTIFACTS")
                .unwrap_or_else(|_| "/var/cache/stacyvm/artifacts".into()),
        )
        .join("dashboard");
        std::fs::create_dir_all(&dir).expect("artifacts dir");
        std::fs::write(dir.join(name), png).expect("screenshot");
    }
}

/// Opens the dashboard's page `page` (`#/page`).
async fn goto(d: &Driver, root: &str, page: &str) {
    d.call(
        reqwest::Method::POST,
        "/url",
        json!({"url": format!("{root}/ui/#/{page}")}),
    )
    .await;
}

/// The id of the sandbox page the browser lands on (after a spawn).
async fn sandbox_page(d: &Driver) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = d.call(reqwest::Method::GET, "/url", Value::Null).await;
        if let Some(id) = url.as_str().and_then(|u| u.split("#/sandboxes/").nth(1)) {
            return id.to_string();
        }
        assert!(Instant::now() < deadline, "no sandbox page: {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn admin_get(root: &str, path: &str) -> Value {
    client()
        .get(format!("{root}/api/v1{path}"))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// Text nodes that say `null` or `undefined` (a value the page failed
/// to render).
const STRAY: &str = r#"
return [...document.querySelectorAll('main, main *')]
  .flatMap(e => [...e.childNodes])
  .filter(n => n.nodeType === 3 && ['null', 'undefined'].includes(n.textContent.trim()))
  .map(n => n.parentElement.outerHTML.slice(0, 200));
"#;

/// Controls without an accessible name (label, aria-label, text).
const UNNAMED: &str = r#"
return [...document.querySelectorAll('input, select, button, a[href]')]
  .filter(e => !e.hidden && e.offsetParent !== null)
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map(e => e.outerHTML);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("dir");
    // A base image for the environment build (the host image is not one).
    common::ensure_docker_image(BUILD_BASE);
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["image", "import", "--docker", BUILD_BASE])
        .env("STACYVM_SERVER_DATA_DIR", dir.path())
        .output()
        .expect("stacyvm image import");
    assert!(
        out.status.success(),
        "image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = serve(dir.path());
    let root = server.url.trim_end_matches("/api/v1").to_string();
    let profile = tempfile::tempdir().expect("profile");
    let d = Driver::start(profile.path()).await;

    // A sandbox whose metadata is a script, made through the API.
    let (s, planted) = {
        let r = client()
            .post(format!("{root}/api/v1/sandboxes"))
            .header("x-api-key", API_KEY)
            .json(&json!({"metadata": {"note": "<img src=x onerror=\"window.pwned=1\">"}}))
            .send()
            .await
            .expect("spawn");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(s, 201, "{planted}");
    let planted = planted["id"].as_str().expect("id").to_string();

    // Sign in: a wrong key is refused on the page, the right one gets in.
    d.call(
        reqwest::Method::POST,
        "/url",
        json!({"url": format!("{root}/ui/")}),
    )
    .await;
    d.type_into("#key", "not-the-key").await;
    d.click("#signin").await;
    d.wait_text("#signin-error", "not valid").await;
    d.screenshot("signin-refused.png").await;
    d.type_into("#key", API_KEY).await;
    d.click("#signin").await;
    d.wait_text("#who", "(api)").await;
    // The key is nowhere the page's scripts can read it.
    let stored = d
        .script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
        .await;
    assert!(
        !stored.as_str().unwrap_or_default().contains(API_KEY),
        "{stored}"
    );
    assert!(
        !stored
            .as_str()
            .unwrap_or_default()
            .contains("stacyvm_session"),
        "HttpOnly: {stored}"
    );

    // The list shows the planted metadata as text.
    d.wait_text("main table", &planted).await;
    let table = d.text("main table").await;
    assert!(table.contains("<img src=x"), "{table}");
    assert_eq!(
        d.script("return window.pwned === undefined").await,
        json!(true)
    );
    assert_eq!(
        d.script(UNNAMED).await,
        json!([]),
        "every control has a name"
    );
    d.screenshot("sandboxes.png").await;

    // Spawn, run a command whose output is markup, upload a file.
    d.click("#spawn").await;
    let id = sandbox_page(&d).await;
    assert!(id.starts_with("sb-") && id != planted, "{id}");
    d.type_into(
        "#command",
        "echo '<b>bold</b><script>window.pwned=2</script>'; uname -s",
    )
    .await;
    d.click("#run").await;
    let out = d.wait_text("#output", "[exit 0]").await;
    assert!(
        out.contains("<b>bold</b><script>"),
        "markup shown as text: {out}"
    );
    assert!(out.contains("Linux"), "{out}");
    assert_eq!(
        d.script("return document.querySelectorAll('#output b, #output script').length")
            .await,
        json!(0)
    );
    assert_eq!(
        d.script("return window.pwned === undefined").await,
        json!(true)
    );
    let upload = dir.path().join("from-the-browser.txt");
    std::fs::write(&upload, "uploaded through the dashboard\n").expect("file");
    d.type_into("#upload", &upload.display().to_string()).await;
    d.wait_text("#files table", "from-the-browser.txt").await;
    assert_eq!(
        d.script(UNNAMED).await,
        json!([]),
        "every control has a name"
    );
    assert_eq!(d.script(STRAY).await, json!([]));
    d.screenshot("sandbox.png").await;
    let got = client()
        .get(format!(
            "{root}/api/v1/sandboxes/{id}/files?path=/workspace/from-the-browser.txt"
        ))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("read");
    assert_eq!(
        got.text().await.expect("text"),
        "uploaded through the dashboard\n"
    );
    // Downloaded back through the page's button.
    d.click("button[aria-label='Download from-the-browser.txt']")
        .await;
    let downloaded = profile.path().join("downloads/from-the-browser.txt");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&downloaded).ok().as_deref()
        != Some("uploaded through the dashboard\n")
    {
        assert!(Instant::now() < deadline, "the download never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A file whose name is markup, then browsing up and back: names are
    // text, directories open.
    let r = client()
        .put(format!(
            "{root}/api/v1/sandboxes/{id}/files?path=/workspace/%3Cimg%20src%3Dx%20onerror%3Dwindow.pwned%3D3%3E"
        ))
        .header("x-api-key", API_KEY)
        .body("x")
        .send()
        .await
        .expect("put");
    assert!(r.status().is_success(), "{}", r.status());
    d.click("#files-up").await;
    d.wait_text("#files table", "workspace/").await;
    d.click("button[aria-label='Open directory workspace']")
        .await;
    d.wait_text("#files table", "<img src=x onerror=window.pwned=3>")
        .await;
    assert_eq!(
        d.script("return window.pwned === undefined && !document.querySelector('#files img')")
            .await,
        json!(true)
    );

    // Keyboard: Tab goes from the command field to its button and on to
    // the terminal's; Enter in the field runs the command.
    d.script("document.getElementById('command').focus(); return 1")
        .await;
    let focused = || d.script("return document.activeElement.id");
    d.keys("\u{E004}").await;
    assert_eq!(focused().await, json!("run"));
    d.keys("\u{E004}").await;
    assert_eq!(focused().await, json!("terminal-open"));
    d.script("document.getElementById('command').focus(); document.getElementById('command').value='echo typed'; return 1").await;
    d.type_into("#command", "\u{E007}").await;
    d.wait_text("#output", "typed").await;

    // The terminal: a shell on a pty over the WebSocket, keys typed into it.
    d.click("#terminal-open").await;
    d.wait_text("#terminal", "#").await;
    d.click("#terminal").await;
    d.keys("echo term-$((6*7))\u{E007}").await;
    d.wait_text("#terminal", "term-42").await;
    // A full-screen program's cursor addressing lands where it put it,
    // and the pty has the panel's size, also after the window shrinks.
    let size = || async {
        d.script("return document.getElementById('terminal').dataset.size")
            .await
            .as_str()
            .expect("size")
            .to_string()
    };
    let screen_row = |n: usize| {
        let d = &d;
        async move {
            d.script(&format!(
                "const r = document.querySelectorAll('#terminal .term-screen .term-row'); return r.length > {n} ? r[{n}].textContent.trimEnd() : `only ${{r.length}} rows: ${{document.getElementById('terminal').innerText}}`"
            ))
            .await
        }
    };
    d.keys("clear; printf '\\033[5;10Hplaced\\033[12;1H'; stty size\u{E007}")
        .await;
    let before = size().await;
    d.wait_text("#terminal", &before).await;
    assert_eq!(screen_row(4).await, json!("         placed"));
    d.call(
        reqwest::Method::POST,
        "/window/rect",
        json!({"width": 900, "height": 900}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while size().await == before {
        assert!(Instant::now() < deadline, "the terminal did not refit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = size().await;
    d.keys("clear; stty size\u{E007}").await;
    d.wait_text("#terminal", &after).await;
    // Colours are cells with classes, never markup.
    d.keys("printf '\\033[31mred\\033[0m <b>x</b>\\n'\u{E007}")
        .await;
    d.wait_text("#terminal", "red <b>x</b>").await;
    assert_eq!(
        d.script("return document.querySelectorAll('#terminal b').length + ':' + [...document.querySelectorAll('#terminal .term-fg-1')].map(e => e.textContent).join('')").await,
        json!("0:red")
    );
    d.screenshot("terminal.png").await;
    d.call(
        reqwest::Method::POST,
        "/window/rect",
        json!({"width": 1280, "height": 900}),
    )
    .await;

    // Previews: expose a port with links that expire, mint one.
    d.type_into("#expose-port", "8080").await;
    d.click("#expose").await;
    d.wait_text("#ports", "8080").await;
    d.click("button[aria-label='New link for port 8080']").await;
    let link = d.wait_text("#preview-token", "stacyvm_token=svp_").await;
    let ports: Value = client()
        .get(format!("{root}/api/v1/sandboxes/{id}/ports"))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("ports")
        .json()
        .await
        .expect("json");
    assert_eq!(ports[0]["mode"], "token", "{ports}");
    assert!(link.contains(&format!("8080-{id}")), "{link}");

    // Live stats and logs are on the page.
    assert!(!d.text("#stats").await.is_empty());

    // Destroy through the page (its confirm accepted).
    d.click("#destroy").await;
    d.call(reqwest::Method::POST, "/alert/accept", json!({}))
        .await;
    d.wait_text("main h1", "Sandboxes").await;
    let r = client()
        .get(format!("{root}/api/v1/sandboxes/{id}"))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("get");
    assert!(
        r.status().as_u16() == 404 || r.text().await.unwrap_or_default().contains("destroyed"),
        "destroyed through the page"
    );
    // An API role sees no system, tenants or audit pages.
    assert_eq!(
        d.script("return [...document.querySelectorAll('nav a')].filter(a => !a.hidden).map(a => a.textContent)").await,
        json!(["Sandboxes", "Templates", "Environments", "Quotas", "Workers", "Providers"])
    );

    // Sign out, sign in as the admin: tenants and a member's role change.
    d.click("#signout").await;
    d.find("#key").await;
    d.click("#kind option[value=admin]").await;
    d.type_into("#key", ADMIN_KEY).await;
    d.click("#signin").await;
    d.wait_text("#who", "(admin)").await;
    goto(&d, &root, "tenants").await;
    d.type_into("#tenant-id", "team-a").await;
    d.type_into("#tenant-name", "Team <A>").await;
    d.click("#tenant-create").await;
    d.wait_text("main table", "team-a").await;
    d.click("a[href='#/tenants/team-a']").await;
    d.type_into("#member-user", "alice").await;
    d.click("#member-role option[value=viewer]").await;
    d.click("#member-add").await;
    d.wait_text("#members", "alice").await;
    d.click("select.member-role option[value=operator]").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client()
            .get(format!("{root}/api/v1/admin/tenants/team-a/members"))
            .header("x-admin-api-key", ADMIN_KEY)
            .send()
            .await
            .expect("members");
        let v: Value = r.json().await.expect("json");
        if v["members"][0]["role"] == "operator" {
            assert_eq!(v["members"][0]["user_id"], "alice", "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the role change did not land: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        d.script(UNNAMED).await,
        json!([]),
        "every control has a name"
    );
    d.screenshot("tenant.png").await;

    // A policy for the tenant, added on its page.
    d.click("#policy-kind option[value=image]").await;
    d.click("#policy-effect option[value=deny]").await;
    d.type_into("#policy-pattern", "evil/*").await;
    d.click("#policy-add").await;
    d.wait_text("#policies", "evil/*").await;
    let v = admin_get(&root, "/admin/tenants/team-a/policies").await;
    assert!(
        v["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["pattern"] == "evil/*"
                && p["effect"] == "deny"
                && p["resource_type"] == "image")),
        "{v}"
    );

    // A quota set on the quotas page.
    goto(&d, &root, "quotas").await;
    d.type_into("#quota-owner", "bob").await;
    d.type_into("#quota-max", "3").await;
    d.type_into("#quota-ttl", "2h").await;
    d.click("#quota-set").await;
    d.wait_text("#quotas", "bob").await;
    let v = admin_get(&root, "/quotas/bob").await;
    assert_eq!(v["max_sandboxes"], 3, "{v}");

    // A template whose setup runs at spawn, spawned from its page.
    goto(&d, &root, "templates").await;
    d.type_into("#template-name", "greeter").await;
    d.type_into("#template-image", "host").await;
    d.type_into("#template-setup", "echo set-up > /workspace/setup.txt")
        .await;
    d.click("#template-create").await;
    d.wait_text("#templates", "greeter").await;
    d.click("button[aria-label='Spawn from greeter']").await;
    let from_template = sandbox_page(&d).await;
    let got = client()
        .get(format!(
            "{root}/api/v1/sandboxes/{from_template}/files?path=/workspace/setup.txt"
        ))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("read");
    assert_eq!(got.text().await.expect("text"), "set-up\n");

    // An environment built from its page, the log followed to the end.
    goto(&d, &root, "environments").await;
    d.type_into("#spec-name", "built").await;
    d.type_into(
        "#spec-dockerfile",
        &format!("FROM {BUILD_BASE}\nRUN echo built-in-a-sandbox > /built.txt"),
    )
    .await;
    d.click("#spec-create").await;
    d.wait_text("#specs", "built").await;
    d.click("button[aria-label='Build built']").await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = d.text("#build-status").await;
        if status == "ready" {
            break;
        }
        assert!(
            status != "failed" && Instant::now() < deadline,
            "the build is {status}: {} {}",
            d.text("#build-facts").await,
            d.text("#build-log").await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(d.text("#build-log").await.contains("built-in-a-sandbox"));
    assert_eq!(
        d.script("return !document.getElementById('build-cancel')")
            .await,
        json!(true),
        "a finished build offers no cancel"
    );
    d.screenshot("build.png").await;
    // Its image runs: a sandbox spawned from the build page has the file.
    d.click("#build-spawn").await;
    let from_build = sandbox_page(&d).await;
    let got = client()
        .get(format!(
            "{root}/api/v1/sandboxes/{from_build}/files?path=/built.txt"
        ))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("read");
    assert_eq!(got.text().await.expect("text"), "built-in-a-sandbox\n");
    let _ = client()
        .delete(format!("{root}/api/v1/sandboxes/{from_build}"))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await;

    // The system page draws its graphs from live samples.
    goto(&d, &root, "system").await;
    d.wait_text("#metrics", "active sandboxes").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while d
        .script("return [...document.querySelectorAll('#graphs polyline')].filter(p => (p.getAttribute('points') || '').split(' ').length >= 2).length")
        .await
        != json!(6)
    {
        assert!(Instant::now() < deadline, "the graphs never drew two samples");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(d.script(STRAY).await, json!([]));
    d.screenshot("system.png").await;

    // The audit: filtered by action on the server, exported as CSV.
    goto(&d, &root, "audit").await;
    d.type_into("#audit-action", "sandbox.spawn").await;
    d.click("#audit-search").await;
    d.wait_text("#audit", from_template.as_str()).await;
    let actions = d
        .script("return [...document.querySelectorAll('#audit tbody tr td:nth-child(3)')].map(td => td.textContent)")
        .await;
    assert!(
        actions
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x == "sandbox.spawn")),
        "{actions}"
    );
    d.click("#audit-csv").await;
    let csv = profile.path().join("downloads/stacyvm-op-audit.csv");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !csv.exists() {
        assert!(Instant::now() < deadline, "no CSV downloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(&csv).expect("csv");
    assert!(text.starts_with("id,created_at,actor,action"), "{text}");
    assert!(text.contains(&from_template), "{text}");
    assert_eq!(
        d.script(UNNAMED).await,
        json!([]),
        "every control has a name"
    );
    d.screenshot("audit.png").await;

    let _ = client()
        .delete(format!("{root}/api/v1/sandboxes/{from_template}"))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await;

    let _ = client()
        .delete(format!("{root}/api/v1/sandboxes/{planted}"))
        .header("x-api-key", API_KEY)
        .send()
        .await;
}

/// A real OpenID Provider (the `oidc-provider` package under Node, which
/// scripts/test installs) on a loopback port, killed when dropped.
struct Idp {
    _child: Reaped,
    issuer: String,
}

/// A child process killed (and waited for) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CLIENT_ID: &str = "stacyvm-dashboard";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

impl Idp {
    fn start(port: u16, redirect: &str) -> Idp {
        use std::io::BufRead as _;
        let package = std::env::var("STACYVM_OIDC_PROVIDER")
            .unwrap_or_else(|_| "/var/cache/stacyvm/npm/node_modules/oidc-provider".into());
        assert!(
            std::path::Path::new(&package).join("package.json").exists(),
            "the oidc-provider package is not at {package} (scripts/test installs it)"
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/js/oidc-idp.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .args([&port.to_string(), CLIENT_ID, redirect])
            .env("OIDC_PROVIDER", &package)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (Debian package nodejs)");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("idp output");
        // The rest of its output is drained (a closed pipe would kill it).
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        assert!(
            line.starts_with("ready "),
            "the IdP did not start: {line:?}"
        );
        Idp {
            _child: Reaped(child),
            issuer: line.trim_start_matches("ready ").trim().to_string(),
        }
    }
}

/// A server whose dashboard signs in through `idp_port`'s issuer, with
/// its groups mapped to roles, and the IdP itself.
fn serve_with_idp(dir: &std::path::Path, extra: &[(&str, &str)]) -> (common::Server, Idp) {
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let jwks = format!("{issuer}/jwks");
    let mut env = vec![
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_AUTH_ENABLED", "true"),
        ("STACYVM_AUTH_API_KEY", API_KEY),
        ("STACYVM_AUTH_ADMIN_API_KEY", ADMIN_KEY),
        ("STACYVM_AUTH_OIDC_ISSUER", issuer.as_str()),
        ("STACYVM_AUTH_OIDC_JWKS_URL", jwks.as_str()),
        ("STACYVM_AUTH_OIDC_CLIENT_ID", CLIENT_ID),
        ("STACYVM_AUTH_OIDC_SCOPES", "openid,email,groups"),
        ("STACYVM_AUTH_OIDC_ADMIN_GROUPS", "stacyvm-admins"),
        ("STACYVM_AUTH_OIDC_VIEWER_GROUPS", "stacyvm-viewers"),
    ];
    env.extend_from_slice(extra);
    let server = common::Server::start(dir, &env);
    let root = server.url.trim_end_matches("/api/v1").to_string();
    let idp = Idp::start(port, &format!("{root}/ui/oidc/callback"));
    assert_eq!(idp.issuer, issuer);
    (server, idp)
}

/// The `name=value` of cookie `name` among a response's `Set-Cookie`s,
/// and the whole header.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap_or("").to_string(), v.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_binds_its_state_to_the_browser_and_refuses_forgeries() {
    let dir = tempfile::tempdir().expect("dir");
    let (server, idp) = serve_with_idp(
        dir.path(),
        &[("STACYVM_RATE_LIMIT_FAILED_AUTH_PER_MINUTE", "6")],
    );
    let root = server.url.trim_end_matches("/api/v1").to_string();
    let c = client();

    // Signed out, the page is told single sign-on is offered.
    let r = c
        .get(format!("{root}/ui/session"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().await.expect("json")["oidc"], true);

    // Start: to the issuer's authorization endpoint with PKCE (S256), a
    // state and a nonce; the state also in an HttpOnly cookie for the
    // callback only.
    let start = || async {
        let r = c
            .get(format!("{root}/ui/oidc/start"))
            .send()
            .await
            .expect("start");
        assert_eq!(r.status().as_u16(), 303);
        let loc = r.headers()["location"].to_str().expect("loc").to_string();
        let (pair, whole) = set_cookie(&r, "stacyvm_oidc").expect("state cookie");
        (loc, pair, whole)
    };
    let (loc, pair, whole) = start().await;
    assert!(loc.starts_with(&format!("{}/auth?", idp.issuer)), "{loc}");
    let q: std::collections::HashMap<String, String> = reqwest::Url::parse(&loc)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43, "{q:?}");
    assert_eq!(q["redirect_uri"], format!("{root}/ui/oidc/callback"));
    assert!(q["scope"].split(' ').any(|s| s == "openid"), "{q:?}");
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32, "{q:?}");
    assert_ne!(q["state"], q["nonce"]);
    assert_eq!(pair, format!("stacyvm_oidc={}", q["state"]));
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/ui/oidc"] {
        assert!(whole.contains(attr), "{whole}");
    }
    // The issuer really serves that authorization request (PKCE client).
    let r = c.get(&loc).send().await.expect("authorize");
    assert!(
        r.status().is_redirection() || r.status().is_success(),
        "the issuer refused the request: {}",
        r.status()
    );

    // Callbacks the browser did not start: another state, no cookie, a
    // cookie for another sign-in; an issuer error; a forged code.
    let callback = |query: String, cookie: Option<String>| {
        let c = c.clone();
        let url = format!("{root}/ui/oidc/callback?{query}");
        async move {
            let mut req = c.get(url);
            if let Some(ck) = cookie {
                req = req.header("cookie", ck);
            }
            let r = req.send().await.expect("callback");
            assert_eq!(r.status().as_u16(), 303);
            assert!(
                set_cookie(&r, "stacyvm_session").is_none(),
                "no session from a refused callback"
            );
            r.headers()["location"].to_str().expect("loc").to_string()
        }
    };
    let state = q["state"].clone();
    assert_eq!(
        callback(format!("code=x&state={state}"), None).await,
        "/ui/#signin-error=state"
    );
    assert_eq!(
        callback(
            format!("code=x&state={state}"),
            Some("stacyvm_oidc=another".into())
        )
        .await,
        "/ui/#signin-error=state"
    );
    assert_eq!(
        callback(
            "code=x&state=attacker".into(),
            Some("stacyvm_oidc=attacker".into())
        )
        .await,
        "/ui/#signin-error=state",
        "a state this server never issued"
    );
    assert_eq!(
        callback(
            format!("error=access_denied&state={state}"),
            Some(pair.clone())
        )
        .await,
        "/ui/#signin-error=denied"
    );
    // The right state with a code the issuer never issued: the issuer
    // refuses the exchange, and the state is spent.
    assert_eq!(
        callback(format!("code=forged&state={state}"), Some(pair.clone())).await,
        "/ui/#signin-error=exchange"
    );
    assert_eq!(
        callback(format!("code=forged&state={state}"), Some(pair.clone())).await,
        "/ui/#signin-error=state",
        "a state is good once"
    );
    // Failed sign-ins spend the address's failed-authentication budget
    // (6 a minute here): the callback says so, and key sign-ins get 429.
    let mut limited = false;
    for _ in 0..4 {
        let loc = callback("code=x&state=nope".into(), Some("stacyvm_oidc=nope".into())).await;
        limited |= loc == "/ui/#signin-error=rate_limited";
    }
    assert!(limited, "failed callbacks are rate limited");
    let r = c
        .post(format!("{root}/ui/session"))
        .json(&json!({"key": "wrong"}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status().as_u16(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_in_a_real_browser_and_what_a_viewer_sees() {
    let dir = tempfile::tempdir().expect("dir");
    let (server, idp) = serve_with_idp(dir.path(), &[]);
    let root = server.url.trim_end_matches("/api/v1").to_string();
    let profile = tempfile::tempdir().expect("profile");
    let d = Driver::start(profile.path()).await;
    // A sandbox of the viewer's (viewers only see their own), made by
    // the admin key acting for it.
    let r = client()
        .post(format!("{root}/api/v1/sandboxes"))
        .header("x-admin-api-key", ADMIN_KEY)
        .header("x-user-id", "viewer-vera")
        .json(&json!({}))
        .send()
        .await
        .expect("spawn");
    let sb: Value = r.json().await.expect("json");
    let sb = sb["id"].as_str().expect("id").to_string();

    let sign_in_as = |login: &'static str| {
        let d = &d;
        let root = root.clone();
        let issuer = idp.issuer.clone();
        async move {
            d.call(
                reqwest::Method::POST,
                "/url",
                json!({"url": format!("{root}/ui/")}),
            )
            .await;
            d.click("#signin-oidc").await;
            // The issuer's own sign-in page.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let url = d.call(reqwest::Method::GET, "/url", Value::Null).await;
                if url.as_str().is_some_and(|u| u.starts_with(&issuer)) {
                    break;
                }
                assert!(Instant::now() < deadline, "not at the issuer: {url}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            d.type_into("input[name=login]", login).await;
            d.type_into("input[name=password]", "any").await;
            d.click("button[type=submit]").await;
            d.wait_text("#who", &format!("{login}@example.test")).await
        }
    };

    // A viewer: signed in by the issuer, sees only what it may use.
    let who = sign_in_as("viewer-vera").await;
    assert!(who.contains("(viewer)"), "{who}");
    let stored = d
        .script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
        .await;
    assert_eq!(stored, json!("{}{}"), "nothing readable by scripts");
    assert_eq!(
        d.script("return [...document.querySelectorAll('nav a')].filter(a => !a.hidden).map(a => a.textContent)").await,
        json!(["Sandboxes", "Templates", "Environments", "Quotas", "Workers", "Providers"])
    );
    d.wait_text("main table", &sb).await;
    d.screenshot("viewer-sandboxes.png").await;
    // No control the API would refuse: no spawn, command, terminal,
    // upload, expose or destroy.
    let controls = "return ['#spawn', '#command', '#terminal-open', '#upload', '#expose', '#destroy', '.template-spawn', '#spec-create', '#quota-set'].filter(c => document.querySelector(c))";
    assert_eq!(d.script(controls).await, json!([]));
    goto(&d, &root, &format!("sandboxes/{sb}")).await;
    d.wait_text("#files", "Files in").await;
    d.wait_text("#previews", "Previews").await;
    assert_eq!(d.script(controls).await, json!([]));
    assert_eq!(d.script(STRAY).await, json!([]));
    d.screenshot("viewer-sandbox.png").await;
    for (page, title) in [
        ("templates", "Templates"),
        ("environments", "Environments"),
        ("quotas", "Quotas"),
        ("workers", "Workers"),
    ] {
        goto(&d, &root, page).await;
        d.wait_text("main h1", title).await;
        assert_eq!(d.script(controls).await, json!([]), "{page}");
        assert_eq!(d.script(UNNAMED).await, json!([]), "{page}");
        assert_eq!(d.script(STRAY).await, json!([]), "{page}");
    }
    d.wait_text("#workers", "local").await;
    // The viewer's session really is a viewer's at the API.
    let refused = d
        .script(
            "return (async () => {
               const s = await (await fetch('/ui/session')).json();
               const r = await fetch('/api/v1/sandboxes', {method: 'POST', headers: {'X-StacyVM-CSRF': s.csrf, 'Content-Type': 'application/json'}, body: '{}'});
               return r.status;
             })()",
        )
        .await;
    assert_eq!(refused, json!(403));

    // Sign out; an admin of the issuer's groups gets the admin's pages.
    d.click("#signout").await;
    d.wait_text("#signin-error", "Signed out").await;
    // Signing out of the dashboard leaves the issuer's own session (single
    // sign-on would sign the viewer straight back in): end it too.
    d.call(reqwest::Method::DELETE, "/cookie", Value::Null)
        .await;
    let who = sign_in_as("admin-ada").await;
    assert!(who.contains("(admin)"), "{who}");
    for (page, title) in [
        ("system", "System"),
        ("audit", "Audit"),
        ("tenants", "Tenants"),
    ] {
        goto(&d, &root, page).await;
        d.wait_text("main h1", title).await;
    }
    let _ = client()
        .delete(format!("{root}/api/v1/sandboxes/{sb}"))
        .header("x-admin-api-key", ADMIN_KEY)
        .send()
        .await;
}

/// `stacyvm web-ui` on a free port, relaying to `server`; killed on drop.
struct WebUi {
    _child: Reaped,
    url: String,
}

impl WebUi {
    fn start(server: &str) -> WebUi {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
            .args(["web-ui", "--server", server, "--port", "0", "--no-open"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("stacyvm web-ui");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("web-ui output");
        // "The dashboard of SERVER is at LOCAL (…)".
        let url = line
            .split(" is at ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|w| w.starts_with("http://127.0.0.1:"))
            .unwrap_or_else(|| panic!("no local URL in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        WebUi {
            _child: Reaped(child),
            url,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_relays_a_remote_servers_dashboard_with_its_protections() {
    use futures::{SinkExt as _, StreamExt as _};
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    // `--server` may name the API's base; the relay uses the root.
    let ui = WebUi::start(&server.url);
    let local = ui.url.clone();
    let c = client();

    // The page is served by the relay, with the page's policy.
    let r = c.get(format!("{local}/ui/")).send().await.expect("page");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .contains("frame-ancestors 'none'"));
    // A name other than the relay's own (a site rebinding its name to
    // 127.0.0.1) is refused before anything reaches the server.
    let r = c
        .get(format!("{local}/api/v1/sandboxes"))
        .header("host", "rebound.example")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 421);
    // The server decides sign-ins: a wrong key is its 401, the right one
    // its session cookie.
    let r = c
        .post(format!("{local}/ui/session"))
        .json(&json!({"key": "wrong"}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(format!("{local}/ui/session"))
        .json(&json!({"key": API_KEY}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status().as_u16(), 200);
    let (cookie, _) = session_cookie(&r);
    let csrf = r.json::<Value>().await.expect("json")["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    // API calls through the relay, CSRF still required.
    let r = c
        .get(format!("{local}/api/v1/sandboxes"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status().as_u16(), 403, "no CSRF token");
    let r = c
        .post(format!("{local}/api/v1/sandboxes"))
        .header("cookie", &cookie)
        .header("x-stacyvm-csrf", &csrf)
        .json(&json!({}))
        .send()
        .await
        .expect("spawn");
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();

    // A WebSocket from the relay's own page reaches the server as same
    // origin; one from another site is refused by the server.
    let ws_url = format!(
        "{}/api/v1/sandboxes/{id}/exec/ws",
        local.replace("http://", "ws://")
    );
    let request = |origin: &str| {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                ws_url.as_str(),
            )
            .expect("request");
        req.headers_mut()
            .insert("cookie", cookie.parse().expect("cookie"));
        req.headers_mut()
            .insert("origin", origin.parse().expect("origin"));
        req
    };
    let refused = tokio_tungstenite::connect_async(request("http://evil.example")).await;
    assert!(refused.is_err(), "a foreign origin is refused");
    let (mut ws, _) = tokio_tungstenite::connect_async(request(&local))
        .await
        .expect("same-origin WebSocket through the relay");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"command": "echo", "args": ["through-the-relay"]})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains("through-the-relay") {
        assert!(Instant::now() < deadline, "no output: {seen}");
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(m))) => seen.push_str(&m.to_string()),
            other => panic!("the stream ended: {other:?} after {seen}"),
        }
    }

    // An unreachable server is one clear answer, not a hang.
    drop(ws);
    let _ = client()
        .delete(format!("{}/sandboxes/{id}", server.url))
        .header("x-api-key", API_KEY)
        .send()
        .await;
    drop(server);
    let r = c
        .get(format!("{local}/api/v1/sandboxes"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 502);
    let body = r.text().await.expect("body");
    assert!(body.contains("cannot reach the server"), "{body}");
}
