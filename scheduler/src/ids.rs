//! The dense keys used inside the scheduler. Names from outside (host ids, blob digests) are
//! `shoal_types::{HostId, Digest}`, validated once where they come in.

slotmap::new_key_type! {
    /// Dense generational key of a host inside the scheduler; a stale key finds nothing.
    pub(crate) struct HostKey;
    /// Dense generational key of a task inside the scheduler.
    pub(crate) struct TaskKey;
}
