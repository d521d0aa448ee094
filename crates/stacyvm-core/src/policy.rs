//! Spawn policies (S-5): image, provider and network allow/deny rules,
//! tenant and global, in priority order.
//!
//! For each resource type the first policy (lowest priority number, then
//! oldest) whose pattern matches the value decides: `deny` refuses,
//! `allow` permits. When no policy matches and an `allow` policy exists
//! for that type, the value is refused: an allow list restricts. With no
//! policy for a type everything is permitted.

use crate::error::{Error, Result};
use crate::store::PolicyRecord;

pub const RESOURCE_TYPES: [&str; 3] = ["image", "provider", "network"];
pub const EFFECTS: [&str; 2] = ["allow", "deny"];

/// Checks a policy before it is stored: known type and effect, a pattern
/// that compiles as a shell glob.
pub fn validate(resource_type: &str, effect: &str, pattern: &str) -> Result<()> {
    if !RESOURCE_TYPES.contains(&resource_type) {
        return Err(Error::invalid(format!(
            "resource_type must be image, provider or network, got {resource_type:?}"
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
    glob::Pattern::new(pattern)
        .map_err(|e| Error::invalid(format!("pattern {pattern:?} does not compile: {e}")))?;
    Ok(())
}

fn matches(pattern: &str, value: &str) -> bool {
    pattern == "*"
        || pattern == value
        || glob::Pattern::new(pattern).is_ok_and(|p| p.matches(value))
}

/// Decides `value` of `resource_type` under `policies` (already ordered).
pub fn check(policies: &[PolicyRecord], resource_type: &str, value: &str) -> Result<()> {
    let mut has_allow = false;
    for p in policies.iter().filter(|p| p.resource_type == resource_type) {
        if matches(&p.pattern, value) {
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
