//! Locking shared state: a thread that panicked while holding a lock leaves plain data behind,
//! so the next holder takes it as it is rather than panicking too.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data even if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
