//! Spawn policies (S-5): image, provider, network and worker allow/deny
//! rules, tenant and global, in priority order.
//!
//! For each resource type the first policy (lowest priority number, then
//! oldest) whose pattern matches the value decides: `deny` refuses,
//! `allow` permits. When no policy matches and an `allow` policy exists
//! for that type, the value is refused: an allow list restricts. With no
//! policy for a type everything is permitted.

use crate::error::{Error, Result};
use crate::store::PolicyRecord;

/// `worker` rules say which workers (by id) may run a tenant's
/// sandboxes: placement skips the others. `preview` rules say which
/// exposure modes (`public`, `token`) a tenant's sandboxes may use.
/// `egress` rules are not globs: a CIDR or domain each, all of which apply
/// (see [`crate::egress`]).
pub const RESOURCE_TYPES: [&str; 6] = [
    "image", "provider", "network", "worker", "preview", "egress",
];
pub const EFFECTS: [&str; 2] = ["allow", "deny"];

/// Checks a policy before it is stored: known type and effect, a pattern
/// that compiles as a shell glob.
pub fn validate(resource_type: &str, effect: &str, pattern: &str) -> Result<()> {
    if !RESOURCE_TYPES.contains(&resource_type) {
        return Err(Error::invalid(format!(
            "resource_type must be image, provider, network, worker, preview or egress, got {resource_type:?}"
        )));
    }
    if !EFFECTS.contains(&effect) {
        return Err(Error::invalid(format!(
            "effect must be allow or deny, got {effect:?}"
        )));
    }
    if pattern.trim().is_empty() {
        return Err(Error::invalid("pattern is required"));
    }
    if resource_type == "egress" {
        return crate::egress::check_policy_pattern(effect, pattern);
    }
    glob::Pattern::new(pattern)
        .map_err(|e| Error::invalid(format!("pattern {pattern:?} does not compile: {e}")))?;
    Ok(())
}

fn matches(pattern: &str, value: &str) -> bool {
    pattern == "*"
        || pattern == value
        || glob::Pattern::new(pattern).is_ok_and(|p| p.matches(value))
}

/// The spellings of an image reference a policy pattern is matched
/// against (F-15), so `ubuntu`, `ubuntu:latest`, `docker.io/library/
/// ubuntu:22.04` and `ubuntu@sha256:…` cannot dodge a rule written for
/// another spelling: the reference as given; with the default registry
/// (`docker.io`), `library/` namespace and tag (`latest`) filled in; the
/// short form without them; a digest reference also as `<name>:<digest>`;
/// and the bare repository name in both forms.
pub fn image_forms(value: &str) -> Vec<String> {
    let v = value.trim();
    let mut forms = vec![v.to_string()];
    let Some(r) = parse_ref(v) else {
        return forms;
    };
    let mut push = |f: String| {
        if !forms.contains(&f) {
            forms.push(f);
        }
    };
    for n in [&r.full, &r.short] {
        match (r.tag, r.digest) {
            (_, Some(d)) => {
                push(format!("{n}@{d}"));
                push(format!("{n}:{d}"));
                if let Some(t) = r.tag {
                    push(format!("{n}:{t}"));
                }
            }
            (Some(t), None) => push(format!("{n}:{t}")),
            (None, None) => push(format!("{n}:latest")),
        }
        push(n.clone());
    }
    forms
}

/// One spelling per image: registry, namespace and tag filled in
/// (`alpine` → `docker.io/library/alpine:latest`), the digest kept. Two
/// references name the same image when their canonical forms are equal.
pub fn canonical_image(value: &str) -> String {
    let v = value.trim();
    let Some(r) = parse_ref(v) else {
        return v.to_string();
    };
    match (r.tag, r.digest) {
        (_, Some(d)) => format!("{}@{d}", r.full),
        (Some(t), None) => format!("{}:{t}", r.full),
        (None, None) => format!("{}:latest", r.full),
    }
}

/// An image reference's parts.
struct ImageRef<'a> {
    /// `registry/path` with the defaults filled in.
    full: String,
    /// Without `docker.io/library/` for Docker Hub images.
    short: String,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

fn parse_ref(v: &str) -> Option<ImageRef<'_>> {
    let (name_tag, digest) = match v.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (v, None),
    };
    let (name, tag) = match name_tag.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (name_tag, None),
    };
    if name.is_empty() {
        return None;
    }
    let (domain, path) = match name.split_once('/') {
        Some((d, rest)) if d.contains(['.', ':']) || d == "localhost" => (d, rest.to_string()),
        _ => ("docker.io", name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    let full = format!("{domain}/{path}");
    let short = if domain == "docker.io" {
        path.strip_prefix("library/").unwrap_or(&path).to_string()
    } else {
        full.clone()
    };
    Some(ImageRef {
        full,
        short,
        tag,
        digest,
    })
}

/// Decides `value` of `resource_type` under `policies` (already ordered).
/// Image references are matched in every spelling of [`image_forms`].
pub fn check(policies: &[PolicyRecord], resource_type: &str, value: &str) -> Result<()> {
    let forms = if resource_type == "image" {
        image_forms(value)
    } else {
        vec![value.to_string()]
    };
    let mut has_allow = false;
    for p in policies.iter().filter(|p| p.resource_type == resource_type) {
        if forms.iter().any(|f| matches(&p.pattern, f)) {
            if p.effect == "deny" {
                return Err(Error::forbidden(format!(
                    "{resource_type} {value:?} is not permitted by policy {}",
                    p.id
                )));
            }
            return Ok(());
        }
        has_allow |= p.effect == "allow";
    }
    if has_allow {
        return Err(Error::forbidden(format!(
            "{resource_type} {value:?} is not in the allowed {resource_type} list"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_policies_match_every_spelling_of_a_reference() {
        let deny = [pol("p1", "image", "deny", "ubuntu:*", 1)];
        for v in [
            "ubuntu",
            "ubuntu:22.04",
            "docker.io/library/ubuntu:22.04",
            "index.docker.io/library/ubuntu",
            "library/ubuntu:latest",
            "ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "docker.io/library/ubuntu:22.04@sha256:0123",
        ] {
            assert!(
                check(&deny, "image", v).is_err(),
                "{v} slipped past ubuntu:*"
            );
        }
        for v in ["alpine", "ghcr.io/x/ubuntu:1", "myubuntu:1", "host"] {
            assert!(check(&deny, "image", v).is_ok(), "{v}");
        }
        // Full-form patterns catch short spellings too.
        let deny = [pol("p1", "image", "deny", "docker.io/library/alpine*", 1)];
        assert!(check(&deny, "image", "alpine:3").is_err());
        // Registries are kept apart.
        let allow = [pol("p1", "image", "allow", "registry.example:5000/*", 1)];
        assert!(check(&allow, "image", "registry.example:5000/app:1").is_ok());
        assert!(check(&allow, "image", "evil.example:5000/app:1").is_err());
        assert!(check(&allow, "image", "app").is_err());
        let forms = image_forms("localhost/x");
        assert!(
            forms.contains(&"localhost/x:latest".to_string()),
            "{forms:?}"
        );
    }

    fn pol(id: &str, t: &str, effect: &str, pattern: &str, priority: i64) -> PolicyRecord {
        PolicyRecord {
            id: id.into(),
            tenant_id: String::new(),
            resource_type: t.into(),
            effect: effect.into(),
            pattern: pattern.into(),
            priority,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn canonical_images_name_one_image_one_way() {
        for (a, b) in [
            ("alpine", "docker.io/library/alpine:latest"),
            ("alpine:3", "index.docker.io/library/alpine:3"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
        ] {
            assert_eq!(canonical_image(a), canonical_image(b), "{a} {b}");
        }
        assert_ne!(canonical_image("alpine:3"), canonical_image("alpine:4"));
        assert_ne!(canonical_image("a/alpine"), canonical_image("alpine"));
        assert_eq!(canonical_image("host"), "docker.io/library/host:latest");
    }

    #[test]
    fn first_match_decides_and_allow_lists_restrict() {
        let ps = vec![
            pol("p1", "image", "deny", "python:*-bad", 1),
            pol("p2", "image", "allow", "python:*", 5),
            pol("p3", "provider", "deny", "docker", 10),
        ];
        assert!(check(&ps, "image", "python:3.12").is_ok());
        let e = check(&ps, "image", "python:3-bad").expect_err("deny first");
        assert!(e.to_string().contains("policy p1"), "{e}");
        let e = check(&ps, "image", "ubuntu:24.04").expect_err("allow list");
        assert!(
            e.to_string().contains("not in the allowed image list"),
            "{e}"
        );
        assert!(check(&ps, "provider", "native").is_ok());
        assert!(check(&ps, "provider", "docker").is_err());
        assert!(check(&ps, "network", "bridge").is_ok());
        assert!(check(&[], "image", "anything").is_ok());
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(validate("image", "allow", "python:*").is_ok());
        assert!(validate("disk", "allow", "x").is_err());
        assert!(validate("image", "maybe", "x").is_err());
        assert!(validate("image", "deny", " ").is_err());
        let e = validate("image", "deny", "[unclosed").expect_err("bad glob");
        assert!(e.to_string().contains("does not compile"), "{e}");
    }
}
