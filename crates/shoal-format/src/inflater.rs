//! A safe handle on zlib's inflate (zlib-rs through its C API, `libz-rs-sys`) with what gzip
//! checkpoints need and flate2 does not expose: stopping at deflate block boundaries (`Z_BLOCK`)
//! with the bit position, priming leftover bits (`inflatePrime`) and a window
//! (`inflateSetDictionary`) — zlib's zran approach (docs/format.md, "Checkpoints").

use std::ffi::c_int;

use libz_rs_sys as z;

/// Window bits of a gzip stream (15, plus 16 for the gzip wrapper).
const GZIP_BITS: c_int = 31;
/// Window bits of a raw deflate stream (no wrapper).
const RAW_BITS: c_int = -15;

/// One inflater; the stream is boxed because zlib's state points back at it.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
    gzip: bool,
}

/// What one call to [`Inflater::inflate`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes written.
    pub produced: usize,
    /// The stream (a gzip member, or the raw deflate data) ended.
    pub end: bool,
    /// Stopped right after a deflate block header or block end (`Z_BLOCK`), not after the last
    /// block: a checkpoint can be taken here.
    pub at_block: bool,
    /// Bits of the last consumed byte not yet used (valid when `at_block`).
    pub bits: u8,
}

impl Inflater {
    /// A gzip inflater (`gzip`) or a raw deflate one.
    pub fn new(gzip: bool) -> Result<Inflater, String> {
        let mut strm = Box::new(z::z_stream::default());
        let bits = if gzip { GZIP_BITS } else { RAW_BITS };
        // SAFETY: `strm` is a default-initialised stream (allocator set, no input or output) that
        // stays at its boxed address; the version string and size are zlib's own.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if rc != z::Z_OK {
            return Err(format!("starting the inflater failed ({rc})"));
        }
        Ok(Inflater { strm, gzip })
    }

    /// Starts over as a gzip inflater (`gzip`) or a raw one, for the next stream.
    pub fn reset(&mut self, gzip: bool) -> Result<(), String> {
        let bits = if gzip { GZIP_BITS } else { RAW_BITS };
        // SAFETY: the stream was initialised by `new` and not ended.
        let rc = unsafe { z::inflateReset2(&mut *self.strm, bits) };
        if rc != z::Z_OK {
            return Err(format!("resetting the inflater failed ({rc})"));
        }
        self.gzip = gzip;
        Ok(())
    }

    /// True when reading a gzip member (the trailer is consumed with it).
    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Feeds the high `bits` bits of `byte` first (a checkpoint between bytes).
    pub fn prime(&mut self, bits: u8, byte: u8) -> Result<(), String> {
        if bits == 0 {
            return Ok(());
        }
        if bits > 7 {
            return Err(format!("{bits} leftover bits"));
        }
        let value = c_int::from(byte >> (8 - bits));
        // SAFETY: an initialised raw inflater; bits in 1..=7.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), value) };
        if rc != z::Z_OK {
            return Err(format!("priming {bits} bits failed ({rc})"));
        }
        Ok(())
    }

    /// Sets the window: the output that preceded the checkpoint (at most 32 KiB).
    pub fn set_window(&mut self, window: &[u8]) -> Result<(), String> {
        let len = u32::try_from(window.len()).map_err(|_| "window too large".to_string())?;
        // SAFETY: an initialised raw inflater; `window` is valid for `len` bytes during the call
        // (zlib copies it).
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), len) };
        if rc != z::Z_OK {
            return Err(format!("setting the {len}-byte window failed ({rc})"));
        }
        Ok(())
    }

    /// Inflates from `input` into `output`; with `stop_at_blocks`, returns at each block
    /// boundary (`Z_BLOCK`). A call that can make no progress consumes and produces nothing.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<Step, String> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        let flush = if stop_at_blocks {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: next_in/avail_in and next_out/avail_out describe the two live slices for the
        // duration of the call; the stream is initialised.
        let rc = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let dt = self.strm.data_type;
        let step = Step {
            consumed,
            produced,
            end: rc == z::Z_STREAM_END,
            at_block: rc == z::Z_OK && dt & 128 != 0 && dt & 64 == 0,
            bits: (dt & 7) as u8,
        };
        match rc {
            z::Z_OK | z::Z_STREAM_END => Ok(step),
            // No progress possible (needs input or output space): not an error.
            z::Z_BUF_ERROR => Ok(step),
            z::Z_NEED_DICT => Err("the stream needs a preset dictionary".into()),
            z::Z_DATA_ERROR => Err("corrupt deflate data".into()),
            other => Err(format!("inflate failed ({other})")),
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn resumes_from_a_block_boundary_with_window_and_bits() {
        let data: Vec<u8> = (0..400_000u32)
            .flat_map(|i| format!("line {} {}\n", i % 977, i / 13).into_bytes())
            .collect();
        let gz = gzip(&data);
        let mut inf = Inflater::new(true).unwrap();
        let (mut inp, mut outp) = (0usize, 0usize);
        let mut out = vec![0u8; data.len()];
        let mut point = None;
        loop {
            let step = inf.inflate(&gz[inp..], &mut out[outp..], true).unwrap();
            inp += step.consumed;
            outp += step.produced;
            if step.at_block && outp > 100_000 && point.is_none() {
                point = Some((inp, outp, step.bits));
            }
            if step.end {
                break;
            }
        }
        assert_eq!(out, data);
        let (pin, pout, bits) = point.expect("a block boundary after 100 kB");
        let mut raw = Inflater::new(false).unwrap();
        let start = if bits > 0 {
            raw.prime(bits, gz[pin - 1]).unwrap();
            pin
        } else {
            pin
        };
        raw.set_window(&data[pout - 32768..pout]).unwrap();
        let mut again = vec![0u8; 50_000];
        let step = raw.inflate(&gz[start..], &mut again, false).unwrap();
        assert_eq!(step.produced, again.len());
        assert_eq!(again, data[pout..pout + 50_000]);
    }
}
