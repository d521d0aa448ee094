//! Environment specs (`/environments/specs`): what a build makes — a base
//! image, apt and pip packages, a Python version. Builds of them are not
//! in this release; the specs, their validation and tenancy are.

use stacyvm_api::{CreateEnvironmentSpec, EnvironmentSpec, SpecSuggestions};

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::store::EnvironmentSpecRecord;

/// Most packages one list holds.
const MAX_PACKAGES: usize = 200;

pub(super) fn view(r: &EnvironmentSpecRecord) -> EnvironmentSpec {
    EnvironmentSpec {
        id: r.id.clone(),
        owner_id: r.owner_id.clone(),
        name: r.name.clone(),
        base_image: r.base_image.clone(),
        python_packages: r.python_packages.clone(),
        apt_packages: r.apt_packages.clone(),
        python_version: r.python_version.clone(),
        dockerfile: r.dockerfile.clone(),
        context_sha256: r.context_sha256.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// Trims and de-duplicates a package list (first occurrence kept), and
/// checks every name against the spec's pattern
/// (`^[a-zA-Z0-9._+\-<>=!~\[\],:@/]+$`, at most 200 characters).
pub fn clean_packages(field: &str, list: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for p in list {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let ok = p.len() <= 200
            && p.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'.' | b'_'
                            | b'+'
                            | b'-'
                            | b'<'
                            | b'>'
                            | b'='
                            | b'!'
                            | b'~'
                            | b'['
                            | b']'
                            | b','
                            | b':'
                            | b'@'
                            | b'/'
                    )
            })
            // An option is not a package (`--index-url=…`, `-o …`).
            && !p.starts_with('-');
        if !ok {
            return Err(Error::invalid(format!(
                "{field}: {p:?} is not a package name (letters, digits and ._+-<>=!~[],:@/; not starting with '-')"
            )));
        }
        if !out.iter().any(|q| q == p) {
            out.push(p.to_string());
        }
    }
    if out.len() > MAX_PACKAGES {
        return Err(Error::invalid(format!(
            "{field}: at most {MAX_PACKAGES} packages"
        )));
    }
    Ok(out)
}

impl Caller {
    fn sees_spec(&self, r: &EnvironmentSpecRecord) -> bool {
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }
}

impl Manager {
    /// `POST /environments/specs`.
    pub async fn create_environment_spec(
        &self,
        req: CreateEnvironmentSpec,
        caller: &Caller,
    ) -> Result<EnvironmentSpec> {
        let name = req.name.trim();
        let parsed = if req.dockerfile.trim().is_empty() {
            None
        } else {
            Some(crate::dockerfile::parse(&req.dockerfile)?)
        };
        let base = match (&parsed, req.base_image.trim()) {
            (Some(p), "") => p.from.as_str(),
            (Some(p), b) if b != p.from => {
                return Err(Error::invalid(format!(
                    "base_image {b:?} and the dockerfile's FROM {:?} differ; give one",
                    p.from
                )))
            }
            (_, b) => b,
        };
        if name.is_empty() || base.is_empty() {
            return Err(Error::invalid(
                "name and base_image (or a dockerfile with FROM) are required",
            ));
        }
        if name.len() > 100 || name.chars().any(|c| c.is_control() || c == '/') {
            return Err(Error::invalid(
                "name: at most 100 characters, no '/' or control characters",
            ));
        }
        if base.len() > 256 || base.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(format!(
                "base_image {base:?}: an image reference (no spaces, at most 256 characters)"
            )));
        }
        let version = req.python_version.trim();
        let version_ok = |v: &str| {
            let parts: Vec<&str> = v.split('.').collect();
            parts.len() <= 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        };
        if !version.is_empty() && !version_ok(version) {
            return Err(Error::invalid(format!(
                "python_version {version:?}: like 3, 3.12 or 3.12.4"
            )));
        }
        let python = clean_packages("python_packages", &req.python_packages)?;
        let apt = clean_packages("apt_packages", &req.apt_packages)?;
        let owner = caller.owner_for(&req.owner_id)?;
        let now = crate::store::record_now();
        let r = EnvironmentSpecRecord {
            id: format!("es-{}", hex::encode(rand::random::<[u8; 8]>())),
            owner_id: owner.clone(),
            tenant_id: caller.tenant_id.clone(),
            name: name.to_string(),
            base_image: base.to_string(),
            python_packages: python,
            apt_packages: apt,
            python_version: version.to_string(),
            dockerfile: if parsed.is_some() {
                req.dockerfile.clone()
            } else {
                String::new()
            },
            context_sha256: String::new(),
            created_at: now,
            updated_at: now,
        };
        let res = self.store.insert_environment_spec(&r).await;
        self.audit(
            caller,
            &owner,
            "environment.spec",
            "",
            &r.id,
            "",
            res.is_ok(),
            match &res {
                Ok(()) => format!("name={} base_image={}", r.name, r.base_image),
                Err(e) => e.to_string(),
            },
        );
        res?;
        Ok(view(&r))
    }

    pub(super) async fn find_spec(
        &self,
        id: &str,
        caller: &Caller,
    ) -> Result<EnvironmentSpecRecord> {
        match self.store.get_environment_spec(id).await {
            Ok(r) if caller.sees_spec(&r) => Ok(r),
            Ok(_) => Err(Error::not_found(format!("environment spec {id:?}"))),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(Error::not_found(format!("environment spec {id:?}")))
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /environments/specs[?owner_id=]`, newest first.
    pub async fn list_environment_specs(
        &self,
        owner: Option<&str>,
        caller: &Caller,
    ) -> Result<Vec<EnvironmentSpec>> {
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        Ok(self
            .store
            .list_environment_specs(tenant)
            .await?
            .iter()
            .filter(|r| caller.sees_spec(r))
            .filter(|r| owner.is_none_or(|o| o.is_empty() || r.owner_id == o))
            .map(view)
            .collect())
    }

    /// `GET /environments/specs/{id}`.
    pub async fn get_environment_spec(&self, id: &str, caller: &Caller) -> Result<EnvironmentSpec> {
        Ok(view(&self.find_spec(id, caller).await?))
    }

    /// `DELETE /environments/specs/{id}`.
    pub async fn delete_environment_spec(&self, id: &str, caller: &Caller) -> Result<()> {
        let r = self.find_spec(id, caller).await?;
        self.store.delete_environment_spec(&r.id).await?;
        self.audit(
            caller,
            &r.owner_id,
            "environment.spec_delete",
            "",
            &r.id,
            "",
            true,
            String::new(),
        );
        Ok(())
    }

    /// `GET /environments/specs/{id}/suggestions`: packages people add to
    /// environments like this one (the original's list).
    pub async fn spec_suggestions(&self, id: &str, caller: &Caller) -> Result<SpecSuggestions> {
        let r = self.find_spec(id, caller).await?;
        let mut suggestions: Vec<String> = ["pytest", "requests", "python-dotenv"]
            .into_iter()
            .map(String::from)
            .collect();
        if r.base_image.contains("python") {
            suggestions.extend(["pandas".to_string(), "numpy".to_string()]);
        }
        suggestions.retain(|s| !r.python_packages.iter().any(|p| p == s));
        Ok(SpecSuggestions {
            spec_id: r.id,
            suggestions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_trimmed_deduplicated_and_checked() {
        let got = clean_packages(
            "apt_packages",
            &[
                " curl ".into(),
                "curl".into(),
                "".into(),
                "python3-numpy".into(),
            ],
        )
        .expect("clean");
        assert_eq!(got, ["curl", "python3-numpy"]);
        for ok in [
            "requests==2.32.3",
            "numpy>=1.26,<2",
            "pkg[extra]",
            "git+https://x/y@v1",
            "torch~=2.3",
        ] {
            clean_packages("python_packages", &[ok.into()]).expect(ok);
        }
        for bad in [
            "--index-url=http://evil",
            "-o",
            "a b",
            "x;rm -rf /",
            "$(id)",
            "a`b`",
            "pkg\nother",
        ] {
            assert!(
                clean_packages("python_packages", &[bad.into()]).is_err(),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..201).map(|i| format!("p{i}")).collect();
        assert!(clean_packages("apt_packages", &many).is_err());
    }
}
