//! Finding the `stacyvm-agent` binary and telling whether it can run in a
//! foreign root (a container image, a PRoot rootfs, a microVM): only a
//! statically linked agent can.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Where `scripts/build-agent` and packages install the static agent.
pub const INSTALLED: [&str; 2] = [
    "/usr/local/lib/stacyvm/stacyvm-agent",
    "/var/cache/stacyvm/agent/stacyvm-agent",
];

/// Finds `stacyvm-agent`: the configured path, `STACYVM_AGENT_PATH`, then
/// next to the running binary (or its parent dir, for test binaries under
/// `deps/`).
pub fn find_agent(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    if let Ok(p) = std::env::var("STACYVM_AGENT_PATH") {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("stacyvm-agent"),
        dir.parent()?.join("stacyvm-agent"),
    ]
    .into_iter()
    .find(|c| c.is_file())
}

/// Finds a static agent for foreign roots: [`find_agent`], then where
/// `scripts/build-agent` installs it. Returns the first static candidate,
/// else the first existing one ([`agent_problem`] then says why it cannot
/// be used).
pub fn find_static_agent(configured: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(find_agent(configured));
    candidates.extend(INSTALLED.iter().map(PathBuf::from));
    candidates
        .iter()
        .find(|p| elf_is_static(p) == Some(true))
        .or_else(|| candidates.iter().find(|p| p.is_file()))
        .cloned()
}

/// Whether `p` is a 64-bit little-endian ELF executable without a program
/// interpreter (statically linked). `None` if it is not a readable ELF file.
pub fn elf_is_static(p: &Path) -> Option<bool> {
    let mut f = std::fs::File::open(p).ok()?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().ok()?);
    let phentsize = u64::from(u16::from_le_bytes(head[0x36..0x38].try_into().ok()?));
    let phnum = u64::from(u16::from_le_bytes(head[0x38..0x3a].try_into().ok()?));
    let data = std::fs::read(p).ok()?;
    for i in 0..phnum {
        let off = usize::try_from(phoff + i * phentsize).ok()?;
        let ty = u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?);
        // PT_INTERP: the binary needs a dynamic loader.
        if ty == 3 {
            return Some(false);
        }
    }
    Some(true)
}

/// Why the agent at `path` cannot run in a foreign root, if it cannot.
pub fn agent_problem(path: &Path) -> Option<String> {
    if !path.is_file() {
        return Some(format!(
            "agent binary {} not found; build it with scripts/build-agent or set STACYVM_AGENT_PATH",
            path.display()
        ));
    }
    match elf_is_static(path) {
        Some(true) => None,
        Some(false) => Some(format!(
            "agent binary {} is dynamically linked and cannot run inside an image; build a static one with scripts/build-agent DIR and set STACYVM_AGENT_PATH",
            path.display()
        )),
        None => Some(format!(
            "agent binary {} is not a 64-bit ELF executable",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_dynamic_and_foreign_files_are_told_apart() {
        assert_eq!(
            elf_is_static(Path::new("/bin/sh")),
            Some(false),
            "dash is dynamic"
        );
        let dir = tempfile::tempdir().expect("test setup");
        let text = dir.path().join("text");
        std::fs::write(&text, "#!/bin/sh\n").expect("test setup");
        assert_eq!(elf_is_static(&text), None);
        assert_eq!(elf_is_static(&dir.path().join("missing")), None);
        assert!(agent_problem(&text).is_some_and(|p| p.contains("not a 64-bit ELF")));
        assert!(
            agent_problem(Path::new("/bin/sh")).is_some_and(|p| p.contains("dynamically linked"))
        );
        assert!(agent_problem(&dir.path().join("missing")).is_some_and(|p| p.contains("not found")));
        // A minimal static ELF: header only, no program headers.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let bin = dir.path().join("static");
        std::fs::write(&bin, &elf).expect("test setup");
        assert_eq!(elf_is_static(&bin), Some(true));
        assert!(agent_problem(&bin).is_none());
    }
}
