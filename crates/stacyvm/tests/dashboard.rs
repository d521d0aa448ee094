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
        let deadline = Instant::now() + Duration::from_secs(20);
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let url = d.call(reqwest::Method::GET, "/url", Value::Null).await;
        if let Some(id) = url.as_str().and_then(|u| u.split("#/sandboxes/").nth(1)) {
            break id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no sandbox page after spawn: {url}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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

    // Keyboard: Tab reaches the controls in order, Enter runs the command.
    d.script("document.getElementById('command').focus(); document.getElementById('command').value='echo typed'; return 1").await;
    d.type_into("#command", "\u{E007}").await;
    d.wait_text("#output", "typed").await;

    // The terminal: a shell on a pty over the WebSocket, keys typed into it.
    d.click("#terminal-open").await;
    d.wait_text("#terminal", "#").await;
    d.click("#terminal").await;
    d.keys("echo term-$((6*7))\u{E007}").await;
    d.wait_text("#terminal", "term-42").await;
    d.screenshot("terminal.png").await;

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
    // An API role sees no tenants or audit pages.
    assert_eq!(
        d.script("return [...document.querySelectorAll('nav a')].filter(a => !a.hidden).map(a => a.textContent)").await,
        json!(["Sandboxes", "Providers"])
    );

    // Sign out, sign in as the admin: tenants and a member's role change.
    d.click("#signout").await;
    d.find("#key").await;
    d.click("#kind option[value=admin]").await;
    d.type_into("#key", ADMIN_KEY).await;
    d.click("#signin").await;
    d.wait_text("#who", "(admin)").await;
    d.call(
        reqwest::Method::POST,
        "/url",
        json!({"url": format!("{root}/ui/#/tenants")}),
    )
    .await;
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

    let _ = client()
        .delete(format!("{root}/api/v1/sandboxes/{planted}"))
        .header("x-api-key", API_KEY)
        .send()
        .await;
}
