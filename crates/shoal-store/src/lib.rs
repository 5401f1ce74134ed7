//! Shoal's node store: an on-disk, content-addressed cache of pieces, chunks and blobs.
