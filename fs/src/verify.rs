//! The check between the network and the reader: decompress a chunk's stored form (or inflate a
//! span run from its checkpoint) and compare each chunk's BLAKE3 with its name from the
//! (verified) bootstrap.

use std::io::Read;

use bytes::Bytes;
use shoal_format::bootstrap::ChunkView;
use shoal_format::codec::{self, RunChunk, SpanStart};
use shoal_format::model::ChunkEncoding;

use crate::plan::SpanPart;

/// Decompresses a raw or zstd chunk's stored form and checks it against its name.
pub fn decode_chunk(c: &ChunkView, stored: &[u8]) -> Result<Bytes, String> {
    shoal_format::image::decode_chunk(&c.hash, c.size, c.encoding, stored.to_vec()).map(Bytes::from)
}

/// Decodes the chunks of a span run in one pass over `stored` (the blob from the checkpoint's
/// offset on; `window`: a deflate checkpoint's verified window) and hands each chunk's checked
/// bytes, or why it failed, to `each`, in run order.
pub(crate) fn decode_span_run(
    part: &SpanPart,
    window: Option<&[u8]>,
    stored: impl Read,
    mut each: impl FnMut(&ChunkView, Result<Bytes, String>),
) {
    let chunks: Vec<RunChunk> = part
        .run
        .iter()
        .map(|c| RunChunk {
            hash: c.hash,
            size: c.size,
            skip: match c.encoding {
                ChunkEncoding::Span { skip, .. } => skip,
                _ => 0,
            },
        })
        .collect();
    let start = SpanStart {
        checkpoint: part.checkpoint,
        window,
    };
    codec::decode_run_each(start, stored, &chunks, |i, r| {
        if let Some(c) = part.run.get(i) {
            each(c, r.map(Bytes::from));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_format::model::ChunkEncoding;

    fn view(data: &[u8], encoding: ChunkEncoding, stored: &[u8]) -> ChunkView {
        ChunkView {
            index: 0,
            hash: *blake3::hash(data).as_bytes(),
            blob: 0,
            offset: 0,
            stored_size: stored.len() as u32,
            size: data.len() as u32,
            encoding,
        }
    }

    #[test]
    fn good_chunks_pass_and_any_flipped_byte_fails() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let packed = zstd::bulk::compress(&data, 3).unwrap();
        for (enc, stored) in [
            (ChunkEncoding::Raw, data.clone()),
            (ChunkEncoding::Zstd, packed),
        ] {
            let c = view(&data, enc, &stored);
            assert_eq!(decode_chunk(&c, &stored).unwrap().as_ref(), &data[..]);
            for at in [0, stored.len() / 2, stored.len() - 1] {
                let mut bad = stored.clone();
                bad[at] ^= 1;
                assert!(
                    decode_chunk(&c, &bad).is_err(),
                    "{enc:?} flip at {at} passed"
                );
            }
            assert!(decode_chunk(&c, &stored[..stored.len() - 1]).is_err());
        }
    }

    #[test]
    fn a_bomb_is_refused_at_the_declared_size() {
        let data = vec![0u8; 4 << 20];
        let packed = zstd::bulk::compress(&data, 3).unwrap();
        let mut c = view(&data[..1024], ChunkEncoding::Zstd, &packed);
        c.size = 1024;
        assert!(decode_chunk(&c, &packed).is_err());
    }
}
