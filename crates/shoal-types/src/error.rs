//! The one error of this crate: a name from outside that breaks its rule.

/// A digest, host id or piece bitmap that breaks its rule; `what` names the kind of value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {reason}")]
pub struct IdError {
    /// The kind of value ("blob digest", "host id", "piece set").
    pub what: &'static str,
    /// The rule it breaks, with the offending value (cut short).
    pub reason: String,
}

impl IdError {
    pub(crate) fn new(what: &'static str, reason: impl Into<String>) -> Self {
        IdError {
            what,
            reason: reason.into(),
        }
    }
}
