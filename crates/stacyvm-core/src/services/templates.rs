//! Templates: named spawn presets, validated and defaulted here.

use chrono::Utc;
use stacyvm_api::{duration, TemplateInput};

use crate::manager::Manager;
use crate::store::TemplateRecord;
use crate::{Error, ErrorKind, Result};

/// Template rules over the manager's store.
#[derive(Debug, Clone, Copy)]
pub struct Templates<'a> {
    pub(crate) m: &'a Manager,
}

impl Templates<'_> {
    pub async fn list(&self) -> Result<Vec<TemplateRecord>> {
        self.m.store().list_templates().await
    }

    /// A template by name; an unknown one is `NotFound` naming it.
    pub async fn get(&self, name: &str) -> Result<TemplateRecord> {
        self.m.store().get_template(name).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::not_found(format!("template {name:?}"))
            } else {
                e
            }
        })
    }

    /// Creates a template from API input, with the create defaults.
    pub async fn create(&self, input: &TemplateInput) -> Result<TemplateRecord> {
        let rec = from_input(&input.name, input, true)?;
        self.check_provider(&rec)?;
        crate::manager::check_template(&rec)?;
        self.m.store().create_template(&rec).await?;
        Ok(rec)
    }

    /// Full replace of an existing template (its name comes from the
    /// path); unset numeric fields get the create defaults (gaps C-23).
    pub async fn replace(&self, name: &str, input: &TemplateInput) -> Result<TemplateRecord> {
        let rec = from_input(name, input, true)?;
        self.get(name).await?;
        self.check_provider(&rec)?;
        crate::manager::check_template(&rec)?;
        self.m.store().update_template(&rec).await
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.get(name).await?;
        self.m.store().delete_template(name).await
    }

    /// A template naming a provider names one this server has.
    fn check_provider(&self, rec: &TemplateRecord) -> Result<()> {
        if !rec.provider.is_empty() {
            self.m.registry().get(&rec.provider)?;
        }
        Ok(())
    }
}

/// Parses `ttl` given as a Go duration string or integer seconds.
fn ttl_seconds(v: &Option<serde_json::Value>) -> Result<i64> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .filter(|s| *s >= 0)
            .ok_or_else(|| Error::invalid("ttl must be a non-negative number of seconds")),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(serde_json::Value::String(s)) => {
            let n = duration::parse(s.trim())
                .map_err(|e| Error::invalid(format!("invalid ttl: {e}")))?;
            if n < 0 {
                return Err(Error::invalid("ttl must not be negative"));
            }
            Ok((n + 999_999_999) / 1_000_000_000)
        }
        Some(_) => Err(Error::invalid(
            "ttl must be a duration string like 30m or a number of seconds",
        )),
    }
}

/// Builds a record from input; `defaults` applies the create defaults
/// (512 MiB, 1 CPU, 300 s, version 1).
pub fn from_input(name: &str, i: &TemplateInput, defaults: bool) -> Result<TemplateRecord> {
    if name.trim().is_empty() {
        return Err(Error::invalid("template name is required"));
    }
    if name.len() > 128 || name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "template name must be at most 128 characters without '/', '\\' or control characters",
        ));
    }
    if i.image.trim().is_empty() {
        return Err(Error::invalid("template image is required"));
    }
    let mut cpu = if i.cpu_cores != 0 {
        i.cpu_cores
    } else {
        i.vcpus
    };
    let mut ttl = if i.ttl_seconds != 0 {
        i.ttl_seconds
    } else {
        ttl_seconds(&i.ttl)?
    };
    let mut mem = i.memory_mb;
    let mut version = i.version;
    if mem < 0 || cpu < 0 || ttl < 0 || i.pool_size < 0 {
        return Err(Error::invalid(
            "memory_mb, cpu_cores, ttl and pool_size must not be negative",
        ));
    }
    if defaults {
        mem = if mem == 0 { 512 } else { mem };
        cpu = if cpu == 0 { 1 } else { cpu };
        ttl = if ttl == 0 { 300 } else { ttl };
        version = if version == 0 { 1 } else { version };
    }
    let now = Utc::now();
    Ok(TemplateRecord {
        name: name.to_string(),
        version,
        image: i.image.trim().to_string(),
        description: i.description.clone(),
        setup: i.setup.clone(),
        allowed_hosts: i.allowed_hosts.clone(),
        memory_mb: mem,
        cpu_cores: cpu,
        ttl_seconds: ttl,
        env: i.env.clone(),
        secrets: i.secrets.clone(),
        pool_size: i.pool_size,
        files: i.files.clone(),
        provider: i.provider.clone(),
        metadata: i.metadata.clone(),
        created_at: now,
        updated_at: now,
    })
}
