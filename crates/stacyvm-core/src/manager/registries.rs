//! Registry connections (`/environments/registry-connections`): where
//! builds push, with credentials that are references to the server's
//! secrets — never stored in the database nor returned (gaps S-14: the
//! original stored `secret_ref` as the password itself).

use stacyvm_api::{CreateRegistryConnection, RegistryConnection};

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::store::RegistryConnectionRecord;

fn view(r: &RegistryConnectionRecord) -> RegistryConnection {
    RegistryConnection {
        id: r.id.clone(),
        owner_id: r.owner_id.clone(),
        provider: r.provider.clone(),
        host: r.host.clone(),
        username: r.username.clone(),
        is_default: r.is_default,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// `host[:port]` of a registry: a DNS name or an IPv4 address.
fn check_host(host: &str) -> Result<()> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if port_ok && name_ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "host {host:?}: expected a registry host[:port], e.g. registry.example.com or localhost:5000"
        )))
    }
}

impl Caller {
    fn sees_connection(&self, r: &RegistryConnectionRecord) -> bool {
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }
}

impl Manager {
    /// `POST /environments/registry-connections`.
    pub async fn create_registry_connection(
        &self,
        req: CreateRegistryConnection,
        caller: &Caller,
    ) -> Result<RegistryConnection> {
        let provider = req.provider.trim().to_ascii_lowercase();
        let host = match provider.as_str() {
            "ghcr" => "ghcr.io".to_string(),
            "dockerhub" => "docker.io".to_string(),
            "registry" => {
                check_host(req.host.trim())?;
                req.host.trim().to_string()
            }
            other => {
                return Err(Error::invalid(format!(
                    "provider {other:?}: allowed are ghcr, dockerhub and registry (with host)"
                )))
            }
        };
        if provider != "registry" && !req.host.is_empty() {
            return Err(Error::invalid(format!(
                "host is for the registry provider; {provider} is {host}"
            )));
        }
        let username = req.username.trim();
        if username.is_empty() || username.len() > 256 || username.chars().any(char::is_control) {
            return Err(Error::invalid(
                "username: 1-256 characters without control characters",
            ));
        }
        // A reference to a secret the server has, never the secret: a
        // value that names no secret is refused (and stored nowhere).
        // The value is not echoed: it may be a password pasted in.
        self.secrets().resolve(&req.secret_ref).map_err(|_| {
            Error::invalid(
                "secret_ref must name a secret the server has (the file <data_dir>/secrets/NAME or the server's environment variable STACYVM_SECRET_NAME), never be the secret itself; the value given names none",
            )
        })?;
        let owner = caller.owner_for(&req.owner_id)?;
        let now = crate::store::record_now();
        let mut created_at = now;
        let id = if req.id.is_empty() {
            format!("rc-{}", hex::encode(rand::random::<[u8; 8]>()))
        } else {
            // Replacing one of the caller's.
            let old = self.find_connection(&req.id, caller).await?;
            created_at = old.created_at;
            self.store.delete_registry_connection(&old.id).await?;
            old.id
        };
        let r = RegistryConnectionRecord {
            id,
            owner_id: owner.clone(),
            tenant_id: caller.tenant_id.clone(),
            provider,
            host,
            username: username.to_string(),
            secret_ref: req.secret_ref.clone(),
            is_default: req.is_default,
            created_at,
            updated_at: now,
        };
        let res = self.store.insert_registry_connection(&r).await;
        self.audit(
            caller,
            &owner,
            "registry.connection",
            "",
            &r.id,
            "",
            res.is_ok(),
            match &res {
                Ok(()) => format!(
                    "provider={} host={} user={}",
                    r.provider, r.host, r.username
                ),
                Err(e) => e.to_string(),
            },
        );
        res?;
        Ok(view(&r))
    }

    async fn find_connection(&self, id: &str, caller: &Caller) -> Result<RegistryConnectionRecord> {
        self.store
            .list_registry_connections(Some(&caller.tenant_id))
            .await?
            .into_iter()
            .chain(if caller.sees_all_tenants() {
                self.store.list_registry_connections(None).await?
            } else {
                Vec::new()
            })
            .find(|r| r.id == id && caller.sees_connection(r))
            .ok_or_else(|| Error::not_found(format!("registry connection {id:?}")))
    }

    /// `GET /environments/registry-connections[?owner_id=]`, newest first.
    pub async fn list_registry_connections(
        &self,
        owner: Option<&str>,
        caller: &Caller,
    ) -> Result<Vec<RegistryConnection>> {
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        Ok(self
            .store
            .list_registry_connections(tenant)
            .await?
            .iter()
            .filter(|r| caller.sees_connection(r))
            .filter(|r| owner.is_none_or(|o| o.is_empty() || r.owner_id == o))
            .map(view)
            .collect())
    }

    /// `DELETE /environments/registry-connections/{id}`.
    pub async fn delete_registry_connection(&self, id: &str, caller: &Caller) -> Result<()> {
        let r = self.find_connection(id, caller).await?;
        match self.store.delete_registry_connection(&r.id).await {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.audit(
            caller,
            &r.owner_id,
            "registry.connection_delete",
            "",
            &r.id,
            "",
            true,
            String::new(),
        );
        Ok(())
    }
}
