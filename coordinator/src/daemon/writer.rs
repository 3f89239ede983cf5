//! Where a finished epoch's manifest goes: the seam between the network
//! core and the image store.

use std::fmt;
use std::sync::Mutex;

use ckpt_protocol::manifest::{Key, Manifest};

/// Commits manifests. Called on tokio's blocking pool (a real commit
/// fsyncs), one call per epoch that reaches the commit point.
///
/// The real one wraps [`crate::commit::PendingEpoch::commit`]; tests use
/// [`MemoryWriter`].
pub trait ManifestWriter: Send + Sync + 'static {
    /// Makes `manifest` the committed record of its epoch (the commit
    /// point), or says why not. An error aborts the epoch.
    fn commit(&self, manifest: &Manifest) -> Result<(), String>;

    /// The epoch was aborted while [`ManifestWriter::commit`] ran (its
    /// commit deadline passed) and the commit then succeeded: the agents
    /// were told to abort, so the epoch must not stay restorable. Remove its
    /// manifest.
    fn revoke(&self, job: &str, epoch: u64) -> Result<(), String>;
}

/// What [`MemoryWriter`] keeps of a committed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEpoch {
    pub job: String,
    pub epoch: u64,
    pub nodes: Vec<String>,
    /// Files over all nodes.
    pub files: usize,
    /// Size of the encoded, MAC'd manifest (0 unless encoding).
    pub encoded_bytes: usize,
}

/// A [`ManifestWriter`] that keeps a summary of each committed manifest in
/// memory. Optionally encodes and MACs the manifest like a real commit
/// (without the disk), and can be told to fail.
pub struct MemoryWriter {
    encode_with: Option<Key>,
    /// Keep the node names of each commit (off for benchmarks).
    keep_nodes: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    committed: Vec<CommittedEpoch>,
    revoked: Vec<(String, u64)>,
    fail: Option<String>,
}

impl fmt::Debug for MemoryWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWriter")
            .field("encoding", &self.encode_with.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryWriter {
    fn default() -> Self {
        MemoryWriter::new()
    }
}

impl MemoryWriter {
    pub fn new() -> Self {
        MemoryWriter {
            encode_with: None,
            keep_nodes: true,
            state: Mutex::new(State::default()),
        }
    }

    /// Encodes and MACs every manifest with `key` (the CPU cost of a real
    /// commit) and keeps only counts.
    pub fn encoding(key: Key) -> Self {
        MemoryWriter {
            encode_with: Some(key),
            keep_nodes: false,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every later commit fails with `reason` (`None`: succeed again).
    pub fn fail_with(&self, reason: Option<&str>) {
        self.state().fail = reason.map(str::to_owned);
    }

    pub fn committed(&self) -> Vec<CommittedEpoch> {
        self.state().committed.clone()
    }

    pub fn revoked(&self) -> Vec<(String, u64)> {
        self.state().revoked.clone()
    }
}

impl ManifestWriter for MemoryWriter {
    fn commit(&self, manifest: &Manifest) -> Result<(), String> {
        if let Some(reason) = self.state().fail.clone() {
            return Err(reason);
        }
        manifest.validate().map_err(|e| e.to_string())?;
        let encoded_bytes = self
            .encode_with
            .as_ref()
            .map_or(0, |key| manifest.encode(key).len());
        let summary = CommittedEpoch {
            job: manifest.job.clone(),
            epoch: manifest.epoch,
            nodes: if self.keep_nodes {
                manifest.nodes.iter().map(|n| n.node.clone()).collect()
            } else {
                Vec::new()
            },
            files: manifest.nodes.iter().map(|n| n.files.len()).sum(),
            encoded_bytes,
        };
        self.state().committed.push(summary);
        Ok(())
    }

    fn revoke(&self, job: &str, epoch: u64) -> Result<(), String> {
        let mut st = self.state();
        st.committed.retain(|c| !(c.job == job && c.epoch == epoch));
        st.revoked.push((job.to_owned(), epoch));
        Ok(())
    }
}
