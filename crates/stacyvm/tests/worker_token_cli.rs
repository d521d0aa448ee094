//! `stacyvm worker token`: sign (both spellings), inspect, verify against
//! the right and the wrong keys, audiences, workers and revocations, and a
//! rotation plan that prints no secret.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const KEY: &str = "k3y-for-the-worker-token-cli-test-0123456789";
const OLD_KEY: &str = "an-older-key-still-kept-for-verification-000";

fn run(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("STACYVM_AUTH_WORKER_SIGNING_KEY")
        .env_remove("STACYVM_CONFIG")
        .output()
        .expect("run stacyvm")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn fails(o: &Output, says: &str) {
    assert!(!o.status.success(), "should fail: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(says), "stderr {err:?} should say {says:?}");
}

#[test]
fn sign_inspect_verify_and_plan_a_rotation() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let keyfile = d.join("k");
    std::fs::write(&keyfile, format!("{KEY}\n")).expect("key");
    let kf = keyfile.to_str().expect("utf8");

    // The spec's spelling and `sign` make the same kind of token.
    let t = ok(&run(
        &[
            "worker",
            "token",
            "w1",
            "--signing-key-file",
            kf,
            "--token-id",
            "t-1",
        ],
        d,
    ));
    assert!(t.starts_with("stacyvm-worker-v1."), "{t}");
    let j: serde_json::Value = serde_json::from_str(&ok(&run(
        &[
            "worker",
            "token",
            "sign",
            "w2",
            "--signing-key",
            KEY,
            "--format",
            "json",
            "--audience",
            "worker:rpc",
            "--scope",
            "worker:exec",
            "--not-before",
            "1s",
        ],
        d,
    )))
    .expect("json");
    assert_eq!(j["worker_id"], "w2");
    assert_eq!(j["audience"], "worker:rpc");
    assert_eq!(j["scopes"], serde_json::json!(["worker:exec"]));
    assert!(j["not_before"].is_string() && j["token"].is_string(), "{j}");

    let i: serde_json::Value =
        serde_json::from_str(&ok(&run(&["worker", "token", "inspect", &t], d))).expect("json");
    assert_eq!(i["signature_verified"], false);
    assert_eq!(i["token_id"], "t-1");

    // Verify: the key, the worker, the audience, revocation.
    let v: serde_json::Value = serde_json::from_str(&ok(&run(
        &[
            "worker",
            "token",
            "verify",
            &t,
            "--signing-key-file",
            kf,
            "--worker-id",
            "w1",
        ],
        d,
    )))
    .expect("json");
    assert_eq!(v["signature_verified"], true);
    assert_eq!(v["worker_id"], "w1");
    fails(
        &run(
            &["worker", "token", "verify", &t, "--signing-key", OLD_KEY],
            d,
        ),
        "invalid signed worker token",
    );
    fails(
        &run(
            &[
                "worker",
                "token",
                "verify",
                &t,
                "--signing-key",
                KEY,
                "--worker-id",
                "w9",
            ],
            d,
        ),
        "is for worker \"w1\"",
    );
    fails(
        &run(
            &[
                "worker",
                "token",
                "verify",
                &t,
                "--signing-key",
                KEY,
                "--audience",
                "worker:rpc",
            ],
            d,
        ),
        "not this audience",
    );
    fails(
        &run(
            &[
                "worker",
                "token",
                "verify",
                &t,
                "--signing-key",
                KEY,
                "--revoked-token-id",
                "t-1",
            ],
            d,
        ),
        "revoked",
    );
    fails(
        &run(
            &[
                "worker",
                "token",
                "verify",
                "stacyvm-worker-v1.x.y",
                "--signing-key",
                KEY,
            ],
            d,
        ),
        "invalid signed worker token",
    );
    fails(
        &run(&["worker", "token", "verify", &t], d),
        "no key to verify with",
    );

    // Keys and revocations from a config: a token of the previous key
    // verifies while it is kept in auth.worker_signing_keys.
    let old = ok(&run(
        &["worker", "token", "w1", "--signing-key", OLD_KEY],
        d,
    ));
    let cfg = d.join("stacyvm.yaml");
    std::fs::write(
        &cfg,
        format!(
            "auth:\n  worker_signing_key: {KEY}\n  worker_signing_keys: [\"{OLD_KEY}\"]\n  worker_revoked_token_ids: [t-1]\n"
        ),
    )
    .expect("config");
    let c = cfg.to_str().expect("utf8");
    ok(&run(&["worker", "token", "verify", &old, "-c", c], d));
    fails(
        &run(&["worker", "token", "verify", &t, "-c", c], d),
        "revoked",
    );

    // Bad flags are refused with the flag named.
    fails(
        &run(
            &[
                "worker",
                "token",
                "w1",
                "--signing-key",
                KEY,
                "--ttl",
                "16m",
            ],
            d,
        ),
        "--ttl",
    );
    fails(
        &run(
            &["worker", "token", "w1", "--signing-key", KEY, "--ttl", "0s"],
            d,
        ),
        "--ttl",
    );
    fails(
        &run(
            &[
                "worker",
                "token",
                "w1",
                "--signing-key",
                KEY,
                "--token-id",
                "a b",
            ],
            d,
        ),
        "--token-id",
    );
    fails(
        &run(&["worker", "token", "w1", "--signing-key", "short"], d),
        "at least 32 bytes",
    );
    fails(
        &run(&["worker", "token", "--signing-key", KEY], d),
        "which worker",
    );

    // The rotation plan: five steps, a config sketch, three checks, and
    // no key anywhere (it reads none).
    let plan = ok(&run(
        &["worker", "token", "rotation-plan", "--ttl", "10m"],
        d,
    ));
    for n in 1..=5 {
        assert!(plan.contains(&format!("\n{n}. ")), "step {n}: {plan}");
    }
    assert!(plan.contains("630s"), "waits the ttl plus skew: {plan}");
    assert!(plan.contains("worker_signing_keys"), "{plan}");
    let json: serde_json::Value = serde_json::from_str(&ok(&run(
        &[
            "worker",
            "token",
            "rotation-plan",
            "--format",
            "json",
            "--new-key-ref",
            "/etc/k2",
        ],
        d,
    )))
    .expect("json");
    assert_eq!(json["steps"].as_array().map(Vec::len), Some(5));
    assert_eq!(
        json["validation_commands"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(json["new_key_ref"], "/etc/k2");
    for text in [&plan, &json.to_string()] {
        assert!(!text.contains(KEY) && !text.contains(OLD_KEY), "{text}");
    }
    fails(
        &run(&["worker", "token", "rotation-plan", "--ttl", "1h"], d),
        "--ttl",
    );
}
