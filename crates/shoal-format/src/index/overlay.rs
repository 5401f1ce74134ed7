//! One layer's tree in overlay form: what overlayfs needs from a lower layer so that a stack of
//! layer mounts shows exactly the image (docs/format.md, "Layer index").
//!
//! - `.wh.NAME` becomes `NAME`, a character device 0/0 (overlayfs' whiteout), mode 0, owned as
//!   the whiteout entry was; a real `NAME` of the same layer wins over it.
//! - `.wh..wh..opq` in a directory becomes the xattr `trusted.overlay.opaque=y` on it.
//! - A directory the layer does not list itself (a parent of something it holds) takes its
//!   attributes from the layers below, as overlayfs' copy-up would (root-owned 0755 if none).
//! - `trusted.overlay.*` xattrs from the tar are dropped: overlayfs would act on them.

use std::collections::HashSet;

use crate::build::flatten::{Attr, Link, Node, NodeKind, Tree};

/// The opaque-directory xattr overlayfs reads from a lower layer.
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// Prefix of the whiteout names of the OCI image spec.
const WHITEOUT: &[u8] = b".wh.";
/// The opaque marker of the OCI image spec.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// xattrs overlayfs reserves.
const OVERLAY_XATTRS: &[u8] = b"trusted.overlay.";

/// What a layer's tar said about its directories.
#[derive(Default)]
pub(crate) struct Listed {
    /// Directory paths the layer has an entry for (components joined with `/`; root is empty).
    pub dirs: HashSet<Vec<u8>>,
}

impl Listed {
    /// Notes an entry for a directory at `comps`.
    pub fn dir(&mut self, comps: &[&[u8]]) {
        self.dirs.insert(comps.join(&b'/'));
    }
}

/// Rewrites `layer` (the layer's entries applied without whiteout handling) into overlay form;
/// `merged` is the image flattened through this layer, for directories the layer only implies.
/// Returns the number of whiteouts and opaque directories.
pub(crate) fn to_overlay_form(
    layer: &mut Tree,
    merged: &mut Tree,
    listed: &Listed,
) -> Result<(u64, u64), String> {
    for n in &mut layer.nodes {
        n.attr
            .xattrs
            .retain(|(k, _)| !k.starts_with(OVERLAY_XATTRS));
    }
    let (mut whiteouts, mut opaques) = (0, 0);
    let mut stack: Vec<(usize, Vec<u8>)> = vec![(0, Vec::new())];
    let mut seen = HashSet::new();
    while let Some((node, path)) = stack.pop() {
        if !seen.insert(node) {
            continue;
        }
        if !listed.dirs.contains(&path) {
            let below = merged.lookup(&path)?.map(|n| &merged.nodes[n]);
            layer.nodes[node].attr = match below {
                Some(Node {
                    attr,
                    kind: NodeKind::Dir(_),
                }) => Attr {
                    xattrs: attr
                        .xattrs
                        .iter()
                        .filter(|(k, _)| !k.starts_with(OVERLAY_XATTRS))
                        .cloned()
                        .collect(),
                    ..attr.clone()
                },
                _ => Attr {
                    mode: 0o755,
                    ..Attr::default()
                },
            };
        }
        let mut opaque = false;
        let mut hidden: Vec<(Vec<u8>, Link)> = Vec::new();
        if let NodeKind::Dir(entries) = &mut layer.nodes[node].kind {
            let names: Vec<Vec<u8>> = entries
                .keys()
                .filter(|n| n.starts_with(WHITEOUT))
                .cloned()
                .collect();
            for name in names {
                let Some(link) = entries.remove(&name) else {
                    continue;
                };
                if name == OPAQUE_MARKER {
                    opaque = true;
                } else if let Some(target) = name.strip_prefix(WHITEOUT) {
                    if !target.is_empty() {
                        hidden.push((target.to_vec(), link));
                    }
                }
            }
        } else {
            continue;
        }
        let mut children: Vec<(usize, Vec<u8>)> = Vec::new();
        if let NodeKind::Dir(entries) = &layer.nodes[node].kind {
            for (name, link) in entries {
                if matches!(layer.nodes[link.node].kind, NodeKind::Dir(_)) {
                    let mut p = path.clone();
                    if !p.is_empty() {
                        p.push(b'/');
                    }
                    p.extend_from_slice(name);
                    children.push((link.node, p));
                }
            }
        }
        let mut whiteout_nodes = Vec::new();
        for (target, link) in hidden {
            if let NodeKind::Dir(entries) = &mut layer.nodes[node].kind {
                if entries.contains_key(&target) {
                    continue;
                }
                entries.insert(target, link);
            }
            whiteout_nodes.push(link.node);
        }
        for w in whiteout_nodes {
            let n = &mut layer.nodes[w];
            n.kind = NodeKind::Char(0);
            n.attr.mode = 0;
            n.attr.xattrs.clear();
            whiteouts += 1;
        }
        if opaque {
            opaques += 1;
            let attr = &mut layer.nodes[node].attr;
            attr.xattrs.retain(|(k, _)| k != OPAQUE_XATTR);
            attr.xattrs.push((OPAQUE_XATTR.to_vec(), b"y".to_vec()));
            attr.xattrs.sort();
        }
        stack.extend(children);
    }
    Ok((whiteouts, opaques))
}
