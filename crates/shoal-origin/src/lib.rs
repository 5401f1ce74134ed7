//! Where bytes come from when no peer has them: OCI registries, S3-compatible stores and local directories.
