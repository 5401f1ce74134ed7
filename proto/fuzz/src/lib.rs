//! The body of the frame decoder fuzz target as a plain function: `cargo +nightly fuzz run`
//! drives it through libFuzzer, `tests/smoke.rs` on the stable toolchain (corpus + mutations).

use shoal_proto::*;

/// Drives a future over in-memory bytes, which never waits.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn all_messages(codec: Codec, data: &[u8]) {
    let _ = codec.decode::<SchedulerRequest>(data);
    let _ = codec.decode::<SchedulerReply>(data);
    let _ = codec.decode::<SchedulerPush>(data);
    let _ = codec.decode::<PushReply>(data);
    let _ = codec.decode::<PieceRequest>(data);
    let _ = codec.decode::<PieceReply>(data);
    let _ = Codec::handshake().decode::<Hello>(data);
    let _ = Codec::handshake().decode::<HelloReply>(data);
}

/// Arbitrary bytes through every message decoder (bare and behind a valid header), the frame
/// stream reader and the piece reader.
pub fn frame_decoder(data: &[u8]) {
    let codec = Codec::default();
    all_messages(codec, data);
    // Payload decoders behind a valid header, so the fuzzer need not discover the magic.
    if let Ok(len) = u32::try_from(data.len()) {
        let mut framed = FrameHeader {
            version: MAX_VERSION,
            len,
        }
        .to_bytes()
        .to_vec();
        framed.extend_from_slice(data);
        all_messages(codec, &framed);
    }
    let mut r: &[u8] = data;
    // A stream of frames, then a piece read, as a client would see them.
    while let Ok(Some(_)) = block_on(codec.read_or_eof::<_, PieceRequest>(&mut r)) {}
    let mut r: &[u8] = data;
    let _ = block_on(read_piece(
        &codec,
        &mut r,
        &Digest::from_bytes([0; 32]),
        0,
        1 << 20,
    ));
}
