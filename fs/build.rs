//! Generates the containerd snapshots API (fs/proto) with tonic. Needs `protoc` (Debian's
//! protobuf-compiler, installed by deploy/local/deps.sh) and its bundled well-known types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/snapshots.proto", "proto/mount.proto"], &["proto"])?;
    Ok(())
}
