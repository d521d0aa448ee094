//! The image store shared by every rootfs-based provider (native, PRoot,
//! microVM): OCI images from a registry, `docker save` tarballs or the
//! local engine, unpacked into content-addressed rootfs directories, plus
//! the built-in `host` image with its synthesized `/etc`.

pub mod hostetc;
pub mod import;
pub mod layerdiff;
pub mod pull;
pub mod push;
pub mod store;

pub use store::{ImageRecord, ImageStore};
