//! Shoal's wire protocol: messages between peers and the scheduler, framing, versions and limits.
