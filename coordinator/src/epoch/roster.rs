//! The nodes of a job, named once and numbered densely.

use std::collections::HashMap;

use ckpt_protocol::manifest::{check_name, ValidationError};

use super::NodeId;

/// A job's nodes: name ↔ [`NodeId`]. Built once per job (not per epoch) and
/// shared; the transport maps a connection to its `NodeId` once, at its
/// handshake, and every event after that is an index.
#[derive(Debug, Clone)]
pub struct Roster {
    names: Vec<String>,
    ids: HashMap<String, NodeId>,
}

/// Why a node list cannot be a roster.
#[derive(Debug, thiserror::Error)]
pub enum RosterError {
    #[error("a job needs at least one node")]
    Empty,
    #[error("node {name:?} is listed twice")]
    Duplicate { name: String },
    #[error("node name {name:?} is refused: {source}")]
    BadName {
        name: String,
        source: ValidationError,
    },
    #[error("{count} nodes is more than a roster holds ({})", u32::MAX)]
    TooMany { count: usize },
}

impl Roster {
    pub fn new<I, S>(names: I) -> Result<Roster, RosterError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.is_empty() {
            return Err(RosterError::Empty);
        }
        if u32::try_from(names.len()).is_err() {
            return Err(RosterError::TooMany { count: names.len() });
        }
        let mut ids = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            // Node names become manifest entries and file-name prefixes.
            check_name("node name", name).map_err(|source| RosterError::BadName {
                name: name.clone(),
                source,
            })?;
            // Fits: the length was checked above.
            let id = NodeId(i as u32);
            if ids.insert(name.clone(), id).is_some() {
                return Err(RosterError::Duplicate { name: name.clone() });
            }
        }
        Ok(Roster { names, ids })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Never true: a roster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn id(&self, name: &str) -> Option<NodeId> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: NodeId) -> Option<&str> {
        self.names.get(id.index()).map(String::as_str)
    }

    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
}
