//! Pool slots, both sides: the host agent's table of the slots it started
//! (through the slot factory of `stacyvm_sandbox::pool`) and the agent a
//! slot runs, which serves the connections the host agent hands it.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use stacyvm_agent_proto::{AgentError, ErrorKind};
use stacyvm_sandbox::pool;

use crate::exec::Reaper;

/// The slot's workspace, in a slot's agent (its default directory and
/// `HOME`); `None` in a sandbox's own agent.
static HOME: OnceLock<String> = OnceLock::new();

/// Control sockets of the slots this host agent started, by slot id.
static SLOTS: Mutex<Option<HashMap<String, UnixStream>>> = Mutex::new(None);

pub fn home() -> Option<&'static str> {
    HOME.get().map(String::as_str)
}

/// What a slot's init runs once confined (see `stacyvm_sandbox::pool`).
pub fn main(control: UnixStream, home: String) -> ! {
    let _ = HOME.set(home);
    stacyvm_sandbox::tune_allocator(2 << 20, 4 << 20);
    let reaper = Arc::new(Reaper::default());
    {
        let r = reaper.clone();
        if crate::spawn_thread(move || r.run()).is_err() {
            std::process::exit(1);
        }
    }
    loop {
        match pool::recv_with_fd(&control) {
            Ok((Some(_), Some(fd))) => {
                let stream = UnixStream::from(fd);
                let reaper = reaper.clone();
                let _ = crate::spawn_thread(move || crate::server::serve_handed(stream, reaper));
            }
            Ok((Some(_), None)) => {}
            // The host agent closed the slot (or is gone): pid 1 of the
            // slot's namespace exits and takes every process with it.
            Ok((None, _)) | Err(_) => std::process::exit(0),
        }
    }
}

fn not_pool_host() -> AgentError {
    AgentError::new(
        ErrorKind::Unsupported,
        "this sandbox is not a pool host: it cannot start slots",
    )
}

/// Starts slot `id` (idempotent).
pub fn open(id: &str, uid: u32, gid: u32, private_network: bool) -> Result<(), AgentError> {
    let factory = pool::factory().ok_or_else(not_pool_host)?;
    if !pool::valid_slot_id(id) {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!("{id:?} is not a slot id"),
        ));
    }
    if uid < pool::MIN_SLOT_ID || gid < pool::MIN_SLOT_ID {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!(
                "slot ids start at {}: uid {uid} gid {gid} could be the image's own",
                pool::MIN_SLOT_ID
            ),
        ));
    }
    let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    let table = slots.get_or_insert_with(HashMap::new);
    if let Some(c) = table.get(id) {
        if alive(c) {
            return Ok(());
        }
        table.remove(id);
        // The slot died on its own: the factory clears what it left.
        let _ = factory.close(id);
    }
    let control = factory
        .open(id, uid, gid, private_network)
        .map_err(|e| AgentError::new(ErrorKind::Internal, e))?;
    table.insert(id.to_string(), control);
    Ok(())
}

/// Ends slot `id`: every process in it, and its workspace.
pub fn close(id: &str) -> Result<(), AgentError> {
    let factory = pool::factory().ok_or_else(not_pool_host)?;
    if !pool::valid_slot_id(id) {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!("{id:?} is not a slot id"),
        ));
    }
    let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = slots.as_mut() {
        t.remove(id);
    }
    factory
        .close(id)
        .map_err(|e| AgentError::new(ErrorKind::Internal, e))
}

/// The slots alive.
pub fn list() -> Result<Vec<String>, AgentError> {
    pool::factory().ok_or_else(not_pool_host)?;
    let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = slots.as_mut() else {
        return Ok(Vec::new());
    };
    t.retain(|_, c| alive(c));
    let mut ids: Vec<String> = t.keys().cloned().collect();
    ids.sort();
    Ok(ids)
}

/// Whether a slot's agent still reads its control socket.
fn alive(control: &UnixStream) -> bool {
    pool::send_with_fd(control, b"p", None).is_ok()
}

/// Hands a host connection to slot `id`; false when there is no such
/// slot alive.
pub fn hand_off(id: &str, stream: &UnixStream) -> bool {
    let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = slots.as_mut() else {
        return false;
    };
    let Some(c) = t.get(id) else { return false };
    if pool::send_with_fd(c, b"c", Some(stream.as_raw_fd())).is_ok() {
        true
    } else {
        t.remove(id);
        false
    }
}
