//! The flattened tree: entries of every layer applied in order (whiteouts, opaque directories,
//! hardlinks within and across layers), refusing any path that escapes the root.
//!
//! Rules follow the OCI image spec's "Whiteouts": a whiteout hides only what lower layers put
//! there, never an entry of its own layer.

use std::collections::BTreeMap;

/// Longest path accepted from a layer.
pub(crate) const MAX_PATH: usize = 4096;
/// Longest single name (Linux NAME_MAX).
pub(crate) const MAX_NAME: usize = 255;
/// Most entries an image may hold.
pub(crate) const MAX_ENTRIES: u64 = 10_000_000;

/// Metadata common to every entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attr {
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an entry of a layer (or a directory walk) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    /// Content is chunked separately; see [`Tree::apply`]'s `file` argument.
    File,
    Symlink(Vec<u8>),
    /// A hardlink to a path already in the tree.
    Hardlink(Vec<u8>),
    Char(u64),
    Block(u64),
    Fifo,
}

/// One entry: path (relative to the root), kind and metadata.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub attr: Attr,
}

/// A regular file's content: its size and the chunker's sequence numbers of its chunks.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileChunks {
    pub size: u64,
    pub seqs: Vec<u64>,
}

/// A node of the tree; hardlinks share one node.
#[derive(Debug)]
pub(crate) struct Node {
    pub attr: Attr,
    pub kind: NodeKind,
}

/// What a node holds.
#[derive(Debug)]
pub(crate) enum NodeKind {
    Dir(BTreeMap<Vec<u8>, Link>),
    File(FileChunks),
    Symlink(Vec<u8>),
    Char(u64),
    Block(u64),
    Fifo,
}

/// A directory entry: the node it names and the layer that put it there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    pub node: usize,
    pub layer: u32,
}

/// The tree being flattened; node 0 is the root directory.
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    entries: u64,
}

/// Splits a tar path into validated components; `[]` is the root.
pub(crate) fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.len() > MAX_PATH {
        return Err(format!("path longer than {MAX_PATH} bytes"));
    }
    if path.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if path.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains `..`".into()),
            c if c.len() > MAX_NAME => return Err(format!("name longer than {MAX_NAME} bytes")),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn show(comps: &[&[u8]]) -> String {
    let joined: Vec<_> = comps.iter().map(|c| String::from_utf8_lossy(c)).collect();
    format!("/{}", joined.join("/"))
}

impl Tree {
    /// An empty tree: a root directory owned by root, mode 0755.
    pub fn new() -> Self {
        let root = Node {
            attr: Attr {
                mode: 0o755,
                ..Attr::default()
            },
            kind: NodeKind::Dir(BTreeMap::new()),
        };
        Tree {
            nodes: vec![root],
            entries: 0,
        }
    }

    fn dir_mut(&mut self, node: usize) -> &mut BTreeMap<Vec<u8>, Link> {
        match &mut self.nodes[node].kind {
            NodeKind::Dir(d) => d,
            _ => unreachable!("dir_mut is only called on nodes checked to be directories"),
        }
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Walks `comps` from the root through directories only; `create` makes missing ones.
    fn walk(&mut self, comps: &[&[u8]], layer: u32, create: bool) -> Result<Option<usize>, String> {
        let mut cur = 0;
        for (i, c) in comps.iter().enumerate() {
            let next = match &self.nodes[cur].kind {
                NodeKind::Dir(d) => d.get(*c).map(|l| l.node),
                _ => unreachable!("walk only descends into directories"),
            };
            let next = match next {
                Some(n) => n,
                None if create => {
                    // Parents missing from the layer get the usual default: root-owned, 0755.
                    let n = self.push(Node {
                        attr: Attr {
                            mode: 0o755,
                            ..Attr::default()
                        },
                        kind: NodeKind::Dir(BTreeMap::new()),
                    });
                    self.dir_mut(cur)
                        .insert(c.to_vec(), Link { node: n, layer });
                    n
                }
                None => return Ok(None),
            };
            match &self.nodes[next].kind {
                NodeKind::Dir(_) => cur = next,
                NodeKind::Symlink(_) => {
                    return Err(format!(
                        "path goes through the symlink {}",
                        show(&comps[..=i])
                    ))
                }
                _ => return Err(format!("{} is not a directory", show(&comps[..=i]))),
            }
        }
        Ok(Some(cur))
    }

    /// Looks up a path without following symlinks.
    pub fn lookup(&mut self, path: &[u8]) -> Result<Option<usize>, String> {
        let comps = split_path(path)?;
        let Some((name, parents)) = comps.split_last() else {
            return Ok(Some(0));
        };
        let Some(dir) = self.walk(parents, 0, false)? else {
            return Ok(None);
        };
        Ok(match &self.nodes[dir].kind {
            NodeKind::Dir(d) => d.get(*name).map(|l| l.node),
            _ => None,
        })
    }

    /// Applies one entry of layer `layer`; `file` is the content of a regular file. With
    /// `whiteouts`, `.wh.` names delete from lower layers instead of being added.
    pub fn apply(
        &mut self,
        e: Entry,
        file: Option<FileChunks>,
        layer: u32,
        whiteouts: bool,
    ) -> Result<(), String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let comps = split_path(&e.path)?;
        let Some((name, parents)) = comps.split_last() else {
            return match e.kind {
                EntryKind::Dir => {
                    self.nodes[0].attr = e.attr;
                    Ok(())
                }
                _ => Err("the root must be a directory".into()),
            };
        };
        let parent = self.walk(parents, layer, true)?.ok_or("parent missing")?;
        if whiteouts {
            if *name == b".wh..wh..opq" {
                self.dir_mut(parent).retain(|_, l| l.layer == layer);
                return Ok(());
            }
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                let d = self.dir_mut(parent);
                if d.get(hidden).is_some_and(|l| l.layer < layer) {
                    d.remove(hidden);
                }
                return Ok(());
            }
        }
        let existing = match &self.nodes[parent].kind {
            NodeKind::Dir(d) => d.get(*name).map(|l| l.node),
            _ => None,
        };
        let node = match e.kind {
            EntryKind::Hardlink(target) => {
                let t = self
                    .lookup(&target)
                    .map_err(|r| {
                        format!("hardlink target {}: {r}", String::from_utf8_lossy(&target))
                    })?
                    .ok_or_else(|| {
                        format!(
                            "hardlink target {} does not exist",
                            String::from_utf8_lossy(&target)
                        )
                    })?;
                if matches!(self.nodes[t].kind, NodeKind::Dir(_)) {
                    return Err("hardlink to a directory".into());
                }
                t
            }
            EntryKind::Dir => {
                if let Some(n) =
                    existing.filter(|n| matches!(self.nodes[*n].kind, NodeKind::Dir(_)))
                {
                    // A directory again: new metadata, children kept (unless an opaque marker).
                    self.nodes[n].attr = e.attr;
                    self.dir_mut(parent)
                        .insert(name.to_vec(), Link { node: n, layer });
                    return Ok(());
                }
                self.push(Node {
                    attr: e.attr,
                    kind: NodeKind::Dir(BTreeMap::new()),
                })
            }
            kind => {
                let nk = match kind {
                    EntryKind::File => NodeKind::File(file.unwrap_or_default()),
                    EntryKind::Symlink(t) => {
                        if t.is_empty() || t.len() > MAX_PATH || t.contains(&0) {
                            return Err("symlink target empty, too long or containing NUL".into());
                        }
                        NodeKind::Symlink(t)
                    }
                    EntryKind::Char(d) => NodeKind::Char(d),
                    EntryKind::Block(d) => NodeKind::Block(d),
                    EntryKind::Fifo => NodeKind::Fifo,
                    EntryKind::Dir | EntryKind::Hardlink(_) => unreachable!("handled above"),
                };
                self.push(Node {
                    attr: e.attr,
                    kind: nk,
                })
            }
        };
        self.dir_mut(parent)
            .insert(name.to_vec(), Link { node, layer });
        Ok(())
    }
}
