//! Read buffers reused across reads: taken as a `Vec<u8>`, filled, lent out as `Bytes`, and back
//! in the pool once the last `Bytes` of one is dropped. Fresh memory costs a page fault and a
//! zeroed page per 4 KiB on its first write; a read path that takes a new 1 MiB buffer for every
//! piece or chunk spends about a tenth of its CPU on that (docs/benchmarks.md, issue 7).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// A pool of read buffers; idle ones are kept up to a number of bytes.
#[derive(Debug)]
pub struct BufferPool {
    /// Idle buffers and the bytes they hold.
    free: Mutex<(Vec<Vec<u8>>, usize)>,
    keep_bytes: usize,
}

impl BufferPool {
    /// A pool that keeps idle buffers of up to `keep_bytes` in all.
    pub fn new(keep_bytes: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new((Vec::new(), 0)),
            keep_bytes,
        })
    }

    /// A buffer of `len` bytes, reused if one is idle (zeroed only where it grows).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let buf = free.0.pop();
            if let Some(b) = &buf {
                free.1 -= b.capacity();
            }
            buf
        };
        let mut buf = reused.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Puts a buffer back for reuse (dropped if the pool already keeps enough).
    pub fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.1 + buf.capacity() <= self.keep_bytes {
            free.1 += buf.capacity();
            free.0.push(buf);
        }
    }

    /// Lends `buf` out as `Bytes`; it comes back when the last clone or slice is dropped.
    pub fn lend(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        self.lend_with(buf, ())
    }

    /// [`BufferPool::lend`], also holding `hold` (e.g. a budget permit) until the buffer is back.
    pub fn lend_with<T: Send + 'static>(self: &Arc<Self>, buf: Vec<u8>, hold: T) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            pool: Arc::clone(self),
            _hold: hold,
        })
    }
}

struct Lent<T> {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
    _hold: T,
}

impl<T> AsRef<[u8]> for Lent<T> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl<T> Drop for Lent<T> {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_buffers_come_back_once_every_slice_is_dropped() {
        let pool = BufferPool::new(8);
        let mut buf = pool.take(8);
        buf.copy_from_slice(b"abcdefgh");
        let ptr = buf.as_ptr();
        let bytes = pool.lend(buf);
        let tail = bytes.slice(4..);
        drop(bytes);
        assert_eq!(&tail[..], b"efgh");
        assert!(
            pool.free.lock().unwrap().0.is_empty(),
            "a slice still holds it"
        );
        drop(tail);
        let again = pool.take(4);
        assert_eq!(again.as_ptr(), ptr, "the same memory is reused");
        pool.give_back(again);
        pool.give_back(vec![0; 4]);
        assert_eq!(
            pool.free.lock().unwrap().0.len(),
            1,
            "idle bytes stay under the bound"
        );
    }
}
