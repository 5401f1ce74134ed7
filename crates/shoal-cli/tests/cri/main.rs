//! Containers started through containerd's CRI as kubelet starts them (real containerd 1.6, its
//! CRI plugin, runc, docker-registry): RunPodSandbox with host networking, PullImage,
//! CreateContainer, StartContainer, the container's log. The harness is `node.rs`; each file
//! beside it is one snapshotter's scenarios.
//!
//! ```sh
//! cargo test -p shoal-cli --test cri            # as root; otherwise every test prints SKIP
//! ```

mod indexed;
mod node;
mod overlayfs;
mod shoal;
