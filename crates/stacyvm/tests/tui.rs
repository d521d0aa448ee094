//! `stacyvm tui` driven in a real pseudo-terminal (tmux, on a socket of
//! the test's own) and read off the screen: the list with a live sandbox,
//! the help, a command run from the exec console, the log tail, a destroy
//! that asks first, quit restoring the terminal.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (scripts/test installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "tui"]).stdout).into_owned()
    }

    /// Waits (bounded) until the screen shows `text`.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if s.contains(text) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {text:?} on the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        assert!(self.cmd(&args).status.success());
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "tui"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tui_lists_runs_tails_and_destroys() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let api = common::Api::new(&server);
    let sb = api.spawn(json!({"metadata": {"app": "tui-test"}})).await;
    let id = sb["id"].as_str().expect("id").to_string();
    let url = server.url.trim_end_matches("/api/v1").to_string();

    let t = Tmux {
        socket: format!("stacyvm-tui-{}", std::process::id()),
    };
    let launch = format!(
        "{} tui --url {url} --refresh-ms 300; echo TUI-EXIT=$?; sleep 30",
        env!("CARGO_BIN_EXE_stacyvm")
    );
    let out = t.cmd(&[
        "new-session",
        "-d",
        "-s",
        "tui",
        "-x",
        "140",
        "-y",
        "40",
        "sh",
        "-c",
        &launch,
    ]);
    assert!(
        out.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let s = t.wait_for(&id);
    assert!(s.contains("running") && s.contains("1 sandboxes"), "{s}");

    t.keys(&["?"]);
    let s = t.wait_for("exec console");
    assert!(s.contains("destroy it (asks first)"), "{s}");
    t.keys(&["Escape"]);

    // The exec console: a command typed, run, its output and exit code.
    t.keys(&["x"]);
    t.wait_for("Enter runs");
    t.keys(&["-l", "echo tui-$((6*7)); exit 3"]);
    t.keys(&["Enter"]);
    let s = t.wait_for("tui-42");
    assert!(s.contains("[exit 3"), "{s}");
    t.keys(&["Escape"]);

    // Extend: the TTL grows.
    let before = common::expiry(&api.get(&format!("/sandboxes/{id}")).await.1);
    t.keys(&["e"]);
    t.wait_for("extended");
    let after = common::expiry(&api.get(&format!("/sandboxes/{id}")).await.1);
    assert!(after > before, "{before} -> {after}");

    // The log tail opens (whatever the sandbox logged).
    t.keys(&["l"]);
    t.wait_for(&format!("{id}: log"));
    t.keys(&["Escape"]);

    // Destroy asks; "n" keeps it, "y" destroys it.
    t.keys(&["d"]);
    t.wait_for("(y/n)");
    t.keys(&["n"]);
    t.wait_for("destroy cancelled");
    assert_eq!(api.state(&id).await, "running");
    t.keys(&["d"]);
    t.wait_for("(y/n)");
    t.keys(&["y"]);
    t.wait_for(&format!("{id} destroyed"));
    t.wait_for("no sandboxes");
    assert_ne!(api.state(&id).await, "running");

    // Quit: the shell behind gets the exit status, the terminal is back.
    t.keys(&["q"]);
    let s = t.wait_for("TUI-EXIT=0");
    assert!(
        !s.contains("StacyVM "),
        "the alternate screen is gone:\n{s}"
    );
    assert!(t.alive());
}

/// Without a terminal it says so instead of drawing garbage.
#[test]
fn the_tui_needs_a_terminal() {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["tui", "--url", "http://127.0.0.1:1"])
        .output()
        .expect("tui");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a terminal"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
