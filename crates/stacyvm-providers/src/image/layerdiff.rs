//! A layer from two trees: what a build changed, when the build ran where
//! no overlay records it (a microVM's guest has an ext4 root of its own).
//!
//! `new` is the build's root as it ended (unpacked from the guest), `base`
//! the base image's flattened root it started from. The layer written to
//! `out` is an overlay upper dir: every entry of `new` that `base` lacks or
//! has otherwise (type, permission bits, owner, size, content, link
//! target), with the directories leading to it, and a whiteout (a `0:0`
//! character device, overlayfs's) for every file, directory or link of
//! `base` that `new` lacks. Mounted over the base's layers it gives `new`
//! back. Links are never followed; nothing outside the three trees is
//! touched.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use stacyvm_core::{Error, Result};

/// What a diff wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    /// Entries written (whiteouts included).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Writes the layer that takes `base` to `new` into `out` (created; must
/// not exist). At most `max_entries` entries.
pub fn diff(new: &Path, base: &Path, out: &Path, max_entries: u64) -> Result<Diff> {
    fs::create_dir(out).map_err(|e| io_err("creating the layer", out, e))?;
    copy_meta(
        &fs::symlink_metadata(new).map_err(|e| io_err("reading", new, e))?,
        out,
    )?;
    let mut d = Diff::default();
    walk(new, base, out, &mut d, max_entries, true)?;
    Ok(d)
}

/// Mount points of a guest's root: other file systems while it ran, so
/// what is under them never came through; the base's stay as they are.
const RUNTIME_MOUNTS: [&str; 5] = ["proc", "sys", "dev", "tmp", "run"];

fn io_err(what: &str, p: &Path, e: io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", p.display()))
}

/// Permission bits compared and kept: set-id bits do not survive the
/// archive a guest's root comes through, so they never count as a change.
fn perm(m: &fs::Metadata) -> u32 {
    m.mode() & 0o1777
}

fn kind(m: &fs::Metadata) -> u8 {
    let t = m.file_type();
    if t.is_dir() {
        1
    } else if t.is_symlink() {
        2
    } else if t.is_file() {
        3
    } else {
        0
    }
}

fn walk(new: &Path, base: &Path, out: &Path, d: &mut Diff, max: u64, top: bool) -> Result<()> {
    let runtime = |n: &std::ffi::OsStr| top && RUNTIME_MOUNTS.iter().any(|m| n == *m);
    let mut names: Vec<_> = fs::read_dir(new)
        .map_err(|e| io_err("reading", new, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| !runtime(n))
        .collect();
    names.sort();
    for name in &names {
        let (n, b, o) = (new.join(name), base.join(name), out.join(name));
        let nm = fs::symlink_metadata(&n).map_err(|e| io_err("reading", &n, e))?;
        let bm = fs::symlink_metadata(&b).ok().filter(|bm| kind(bm) != 0);
        let same_node = bm.as_ref().is_some_and(|bm| {
            kind(bm) == kind(&nm)
                && perm(bm) == perm(&nm)
                && bm.uid() == nm.uid()
                && bm.gid() == nm.gid()
        });
        if nm.is_dir() {
            let base_dir = bm.as_ref().is_some_and(|bm| bm.is_dir());
            if !same_node {
                // New, changed, or replacing a file: this directory is
                // in the layer with its metadata (an overlay merges it with
                // a base directory of the same name).
                make_dir(&o, &nm, d, max)?;
                walk(
                    &n,
                    if base_dir {
                        &b
                    } else {
                        Path::new("/nonexistent/stacyvm")
                    },
                    &o,
                    d,
                    max,
                    false,
                )?;
                continue;
            }
            // Unchanged itself: in the layer only if something under it is.
            let mark = (d.entries, d.bytes);
            make_dir(&o, &nm, d, max)?;
            walk(&n, &b, &o, d, max, false)?;
            if (d.entries, d.bytes) == (mark.0 + 1, mark.1) {
                fs::remove_dir(&o).map_err(|e| io_err("tidying", &o, e))?;
                d.entries -= 1;
            }
            continue;
        }
        let unchanged = same_node
            && bm.as_ref().is_some_and(|bm| {
                if nm.file_type().is_symlink() {
                    fs::read_link(&n).ok() == fs::read_link(&b).ok()
                } else {
                    bm.len() == nm.len() && same_content(&n, &b).unwrap_or(false)
                }
            });
        if unchanged {
            continue;
        }
        count(d, max)?;
        if nm.file_type().is_symlink() {
            let to = fs::read_link(&n).map_err(|e| io_err("reading", &n, e))?;
            std::os::unix::fs::symlink(&to, &o).map_err(|e| io_err("writing", &o, e))?;
            owner(&o, &nm)?;
        } else if nm.is_file() {
            fs::copy(&n, &o).map_err(|e| io_err("writing", &o, e))?;
            copy_meta(&nm, &o)?;
            d.bytes += nm.len();
        }
    }
    // What the base has and the build removed.
    let Ok(entries) = fs::read_dir(base) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if names.contains(&name) || runtime(&name) {
            continue;
        }
        let Ok(bm) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        // Devices, FIFOs and sockets never come through the archive: the
        // base's stay.
        if kind(&bm) == 0 {
            continue;
        }
        if !out.is_dir() {
            continue;
        }
        count(d, max)?;
        whiteout(&out.join(&name))?;
        d.whiteouts += 1;
    }
    Ok(())
}

fn count(d: &mut Diff, max: u64) -> Result<()> {
    d.entries += 1;
    if d.entries > max {
        return Err(Error::limit(format!(
            "the build changed more than {max} files"
        )));
    }
    Ok(())
}

fn make_dir(o: &Path, m: &fs::Metadata, d: &mut Diff, max: u64) -> Result<()> {
    count(d, max)?;
    fs::create_dir(o).map_err(|e| io_err("writing", o, e))?;
    copy_meta(m, o)
}

fn copy_meta(m: &fs::Metadata, p: &Path) -> Result<()> {
    owner(p, m)?;
    fs::set_permissions(p, fs::Permissions::from_mode(perm(m)))
        .map_err(|e| io_err("setting the mode of", p, e))
}

fn owner(p: &Path, m: &fs::Metadata) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(m.uid()), Some(m.gid()))
        .map_err(|e| io_err("setting the owner of", p, e))
}

fn whiteout(p: &Path) -> Result<()> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    mknod(p, SFlag::S_IFCHR, Mode::empty(), 0)
        .map_err(|e| Error::internal(format!("writing the whiteout {}: {e}", p.display())))
}

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match f.read(&mut buf[at..])? {
            0 => break,
            n => at += n,
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
        fs::write(p, s).expect("write");
    }

    #[test]
    fn the_layer_holds_exactly_what_changed() {
        let t = tempfile::tempdir().expect("tmp");
        let (base, new, out) = (
            t.path().join("base"),
            t.path().join("new"),
            t.path().join("out"),
        );
        for root in [&base, &new] {
            write(&root.join("etc/same"), "same");
            write(&root.join("etc/edited"), "before");
            write(&root.join("etc/gone"), "bye");
            write(&root.join("usr/share/doc/a"), "a");
            write(&root.join("old/dir/file"), "x");
            std::os::unix::fs::symlink("/etc/same", root.join("link")).expect("link");
            write(&root.join("mode"), "m");
            fs::create_dir_all(root.join("empty-untouched")).expect("dir");
            fs::create_dir_all(root.join("dev/pts")).expect("dir");
        }
        // The guest's runtime mount points come through empty.
        fs::remove_dir(new.join("dev/pts")).expect("rm");
        write(&new.join("etc/edited"), "after!");
        fs::remove_file(new.join("etc/gone")).expect("rm");
        fs::remove_dir_all(new.join("old")).expect("rm");
        fs::remove_file(new.join("link")).expect("rm");
        std::os::unix::fs::symlink("/elsewhere", new.join("link")).expect("link");
        fs::set_permissions(new.join("mode"), fs::Permissions::from_mode(0o700)).expect("chmod");
        write(&new.join("opt/tool/bin"), "new tool");
        // A device in the base (never archived) is not whited out.
        nix::sys::stat::mknod(
            &base.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .expect("mknod (root)");

        let d = diff(&new, &base, &out, 1000).expect("diff");
        let mut got: Vec<String> = Vec::new();
        for e in walkdir(&out) {
            let rel = e.strip_prefix(&out).expect("rel").display().to_string();
            let m = fs::symlink_metadata(&e).expect("meta");
            let what = if m.file_type().is_char_device() {
                "whiteout".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&e).expect("link").display())
            } else if m.is_dir() {
                "dir".to_string()
            } else {
                fs::read_to_string(&e).expect("read")
            };
            got.push(format!("{rel}: {what}"));
        }
        got.sort();
        let mut want = vec![
            "etc: dir",
            "etc/edited: after!",
            "etc/gone: whiteout",
            "link: -> /elsewhere",
            "mode: m",
            "old: whiteout",
            "opt: dir",
            "opt/tool: dir",
            "opt/tool/bin: new tool",
        ];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            fs::metadata(out.join("mode")).expect("mode").mode() & 0o777,
            0o700
        );
        assert_eq!(d.whiteouts, 2);
        assert_eq!(d.bytes, 6 + 1 + 8);

        // Over its limit, a diff fails.
        let out2 = t.path().join("out2");
        assert!(diff(&new, &base, &out2, 3).is_err());
    }

    fn walkdir(p: &Path) -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(p).expect("read").flatten() {
            let path = e.path();
            v.push(path.clone());
            if fs::symlink_metadata(&path).expect("meta").is_dir() {
                v.extend(walkdir(&path));
            }
        }
        v
    }
}
