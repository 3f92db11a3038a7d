//! The handle of a process or an allocation: a typed envelope around a backend's own data.
//!
//! A [`ProcHandle`] says which backend made it (`backend`), which shape of that backend's
//! data it holds (`version`) and the data itself (`payload`). Only the backend named opens
//! the payload ([`ProcHandle::open`]); everyone else reads the name and asks the backend
//! (e.g. [`Backend::describe`](crate::Backend::describe)). The journal keeps it as JSON:
//!
//! ```json
//! { "backend": "local", "version": 1, "payload": { "pid": 4242, "start": 1234567, "log": "..." } }
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::BackendError;

/// What a backend returns for a process (or keeps in an [`Allocation`](crate::Allocation)):
/// its name, the version of its payload's shape, and the payload only it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcHandle {
    /// The name of the backend that made it (a site plugin's name for a plugin).
    pub backend: String,
    /// The version of the payload's shape; [`ProcHandle::open`] reads [`ProcHandle::VERSION`].
    pub version: u32,
    /// The backend's own data.
    pub payload: serde_json::Value,
}

impl ProcHandle {
    /// The payload version the backends write and read.
    pub const VERSION: u32 = 1;

    /// Wraps a backend's own data.
    pub fn new(
        backend: impl Into<String>,
        version: u32,
        payload: &impl Serialize,
    ) -> Result<Self, BackendError> {
        let backend = backend.into();
        let payload = serde_json::to_value(payload).map_err(|e| {
            BackendError::new(format!("cannot write a handle of backend `{backend}`: {e}"))
        })?;
        Ok(Self {
            backend,
            version,
            payload,
        })
    }

    /// The payload, for `backend` only: a handle another backend made, a payload version it
    /// does not know, or a payload of another shape is an error that says so.
    pub fn open<T: DeserializeOwned>(&self, backend: &str) -> Result<T, BackendError> {
        if self.backend != backend {
            return Err(BackendError::new(format!(
                "backend `{backend}` cannot use a handle of backend `{}`",
                self.backend
            )));
        }
        if self.version != Self::VERSION {
            return Err(BackendError::new(format!(
                "a handle of backend `{backend}` has version {}; this prl-flow reads version {}",
                self.version,
                Self::VERSION
            )));
        }
        // From the borrowed value: no copy of the payload per read.
        T::deserialize(&self.payload).map_err(|e| {
            BackendError::new(format!(
                "unreadable handle of backend `{backend}` ({e}): {}",
                self.payload
            ))
        })
    }

    /// Is this a handle of `backend`?
    pub fn is(&self, backend: &str) -> bool {
        self.backend == backend
    }
}

/// The handle as the journal keeps it.
impl From<ProcHandle> for serde_json::Value {
    fn from(h: ProcHandle) -> Self {
        // Built in place (no serializer, no copy of the strings): one per spawn.
        let mut m = serde_json::Map::new();
        m.insert("backend".into(), h.backend.into());
        m.insert("version".into(), h.version.into());
        m.insert("payload".into(), h.payload);
        m.into()
    }
}

/// A handle from the journal.
impl TryFrom<&serde_json::Value> for ProcHandle {
    type Error = BackendError;

    fn try_from(v: &serde_json::Value) -> Result<Self, BackendError> {
        Self::deserialize(v)
            .map_err(|e| BackendError::new(format!("not a process handle ({e}): {v}")))
    }
}

impl std::fmt::Display for ProcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "a handle of backend `{}`", self.backend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Pid {
        pid: i32,
    }

    #[test]
    fn a_handle_round_trips_through_json() {
        let h = ProcHandle::new("local", ProcHandle::VERSION, &Pid { pid: 7 }).expect("new");
        let json = serde_json::to_value(&h).expect("json");
        assert_eq!(
            json,
            serde_json::json!({ "backend": "local", "version": 1, "payload": { "pid": 7 } })
        );
        assert_eq!(serde_json::Value::from(h.clone()), json);
        let back = ProcHandle::try_from(&json).expect("back");
        assert_eq!(back, h);
        assert_eq!(back.open::<Pid>("local").expect("open"), Pid { pid: 7 });
    }

    #[test]
    fn only_its_backend_opens_a_handle() {
        let h = ProcHandle::new("ssh", ProcHandle::VERSION, &Pid { pid: 7 }).expect("new");
        let e = h.open::<Pid>("local").expect_err("another backend's");
        assert_eq!(
            e.message,
            "backend `local` cannot use a handle of backend `ssh`"
        );
        let newer = ProcHandle { version: 9, ..h };
        let e = newer.open::<Pid>("ssh").expect_err("unknown version");
        assert!(e.message.contains("version 9"), "{e}");
        let odd = ProcHandle::new("ssh", 1, &"text").expect("new");
        assert!(odd.open::<Pid>("ssh").is_err());
    }
}
