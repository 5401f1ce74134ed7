//! The check between the network and the reader: decompress a chunk's stored form and compare
//! its BLAKE3 with the chunk's name from the (verified) bootstrap.

use bytes::Bytes;
use shoal_format::bootstrap::ChunkView;

/// Decompresses a chunk's stored form and checks it against its name.
pub fn decode_chunk(c: &ChunkView, stored: &[u8]) -> Result<Bytes, String> {
    shoal_format::image::decode_chunk(&c.hash, c.size, c.encoding, stored.to_vec()).map(Bytes::from)
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
