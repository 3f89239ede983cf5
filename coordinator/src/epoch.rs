//! One checkpoint epoch of one job across its nodes, as a pure state machine.
//!
//! [`Epoch`] is driven by [`Event`]s (agent replies, lost connections, clock
//! ticks, the result of the manifest commit) and answers with [`Action`]s for
//! the caller to carry out (broadcast a command, write the manifest, report
//! the outcome). It opens no socket, runs no CRIU and reads no clock: the
//! caller passes `now` with every event, so tests and the benchmark drive it
//! in-process and deterministically.
//!
//! # The protocol (DESIGN.md, "Checkpoint protocol")
//!
//! ```text
//!            all READY            all DUMPED              all DUMPED+FLUSHED
//! Preparing ─────────► Dumping ─────────────► Flushing ───────────────────► Committing
//!  PREPARE sent         DUMP sent              COMMIT(mode) sent             MANIFEST handed
//!                       (FLUSHED may come      (RESUMED may come              to the caller
//!                        after a node's         from here on, before
//!                        DUMPED already)        or after its FLUSHED)
//!     CommitSucceeded: COMMITTED(mode) sent ──► Resuming ──► Done (continue: all RESUMED)
//!                                          └──► Stopping ──► Done (stop: all STOPPED)
//! any FAIL, timeout, lost agent, protocol violation, CommitFailed before the
//! commit ──► Aborted (ABORT sent to every agent)
//! ```
//!
//! An agent answers DUMP with DUMPED as soon as its images are complete in
//! its page cache (no digests), and then, on its own, digests and fsyncs
//! them and sends FLUSHED with the digests: the flush overlaps the other
//! nodes' dumps and the COMMIT round trip instead of following them.
//!
//! - Nobody dumps before every agent is READY: DUMP is broadcast exactly
//!   once, in the step that takes the last READY.
//! - COMMIT is broadcast exactly once, in the step that takes the last
//!   DUMPED: the cut is complete, so COMMIT(continue) lets agents resume
//!   their trees at once, whether their flush is done or not. COMMIT(stop)
//!   keeps the trees frozen: a tree is killed only after the manifest
//!   rename (COMMITTED), so a failed flush or commit leaves the job running
//!   (fail closed).
//! - FLUSHED is taken from a node any time after its DUMPED (also before
//!   COMMIT went out). The manifest is produced exactly once, after every
//!   agent is DUMPED and FLUSHED; its file digests are those of FLUSHED and
//!   nothing in it depends on RESUMED. COMMITTED is broadcast only after the
//!   caller reports [`Event::CommitSucceeded`]. After that nothing aborts
//!   the epoch: agent failures become [`PostCommitProblem`]s in the
//!   [`Outcome`].
//! - The epoch ends ([`Action::Done`]) once every agent has also answered
//!   COMMIT (RESUMED in continue mode, with the downtime of its tree;
//!   STOPPED in stop mode), or the finish deadline passed.

//! # Cost
//!
//! Node names are mapped to dense [`NodeId`]s once per job ([`Roster`]); the
//! epoch keeps one byte of state per agent plus its image until the manifest
//! is built. Every event is O(1) and allocates nothing of size O(N); the only
//! O(N) steps are building the manifest (once) and listing late nodes on a
//! timeout (once).

mod machine;
mod outcome;
mod roster;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use ckpt_protocol::manifest::{CheckpointMode, FileDigest, Manifest, NodeImage, Timings};

pub use machine::Epoch;
pub use outcome::{AbortReason, Outcome, PhaseTimings, PostCommitProblem, Verdict};
pub use roster::{Roster, RosterError};

/// A node's index in its job's [`Roster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where an epoch is. Transitions only along [`Phase::can_go_to`].
///
/// There is no resting "Committed" phase: the step that takes
/// [`Event::CommitSucceeded`] broadcasts COMMITTED and lands in `Done`
/// (continue mode) or `Stopping` (stop mode). [`Phase::is_committed`] says
/// whether the commit point has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// PREPARE sent; waiting for every READY (the global barrier).
    Preparing,
    /// DUMP sent; waiting for every DUMPED.
    Dumping,
    /// Every node DUMPED, COMMIT sent; waiting for every FLUSHED (RESUMED
    /// may come meanwhile in continue mode).
    Flushing,
    /// The manifest is with the caller; waiting for its commit result.
    Committing,
    /// Committed in stop mode; waiting for every STOPPED.
    Stopping,
    /// Committed in continue mode; waiting for every RESUMED still missing.
    Resuming,
    /// Committed, and every agent finished (or was given up on).
    Done,
    /// Given up before the commit point; every agent was told to ABORT.
    Aborted,
}

impl Phase {
    /// The only transitions an epoch makes.
    pub fn can_go_to(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Preparing, Dumping)
                | (Dumping, Flushing)
                | (Flushing, Committing)
                | (Committing, Stopping | Resuming | Done)
                | (Stopping | Resuming, Done)
                | (Preparing | Dumping | Flushing | Committing, Aborted)
        )
    }

    /// Whether the manifest rename (the commit point) has happened.
    pub fn is_committed(self) -> bool {
        matches!(self, Phase::Stopping | Phase::Resuming | Phase::Done)
    }

    /// Whether the epoch is over (no more actions will come).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Dumping => "dumping",
            Phase::Flushing => "flushing",
            Phase::Committing => "committing",
            Phase::Stopping => "stopping",
            Phase::Resuming => "resuming",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one agent is within the epoch, as the coordinator has heard it.
///
/// An agent only moves forward. After DUMPED, FLUSHED and (continue mode)
/// RESUMED come in either order:
///
/// ```text
/// Pending ─READY─► Ready ─DUMPED─► Dumped ─FLUSHED─► Flushed ─RESUMED | STOPPED─► Finished
///                                     └─RESUMED─► Released ─FLUSHED────────────────┘
/// ```
///
/// `Released` is used in continue mode only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum AgentPhase {
    /// PREPARE sent, no READY yet.
    Pending,
    Ready,
    /// Images complete on the node (not yet digested or durable).
    Dumped,
    /// Continue mode: RESUMED, the tree runs again; FLUSHED still missing.
    Released,
    /// Images digested and durable (continue mode: RESUMED still missing).
    Flushed,
    /// Done with the epoch: flushed and resumed (continue mode), or
    /// flushed and STOPPED after the commit (stop mode).
    Finished,
    /// Sent FAIL (or broke the protocol) after the commit.
    Failed,
    /// Its connection was lost.
    Lost,
}

impl AgentPhase {
    pub(crate) const COUNT: usize = 8;
}

/// What the caller feeds the epoch.
#[derive(Debug)]
pub enum Event {
    /// A message from the agent of `node` about epoch `epoch`.
    Agent {
        node: NodeId,
        epoch: u64,
        msg: AgentMsg,
    },
    /// The agent's connection closed or its heartbeats stopped.
    Lost { node: NodeId },
    /// Time passed; deadlines are checked (they are also checked on every
    /// other event).
    Tick,
    /// The caller committed the manifest of [`Action::WriteManifest`].
    CommitSucceeded,
    /// Writing or committing the manifest failed.
    CommitFailed { reason: String },
    /// Give up (operator request, coordinator shutting down). Ignored once
    /// committed.
    Cancel { reason: String },
}

/// An agent's reply.
#[derive(Debug)]
pub enum AgentMsg {
    /// Drained, network locked, tree frozen.
    Ready,
    /// Could not do what was asked.
    Failed { reason: String },
    /// Dumped: the image, without digests (they come with `Flushed`).
    Dumped(Box<NodeDump>),
    /// Continue mode: the tree runs again, after being frozen `downtime`.
    Resumed { downtime: Duration },
    /// The node's images are on the shared filesystem and fsynced: the
    /// digest of every file of its image.
    Flushed { files: Vec<FileDigest> },
    /// Stop mode: the tree was killed after the commit.
    Stopped { downtime: Duration },
}

/// The kind of an [`AgentMsg`], for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgKind {
    Ready,
    Failed,
    Dumped,
    Resumed,
    Flushed,
    Stopped,
}

impl AgentMsg {
    pub fn kind(&self) -> MsgKind {
        match self {
            AgentMsg::Ready => MsgKind::Ready,
            AgentMsg::Failed { .. } => MsgKind::Failed,
            AgentMsg::Dumped(_) => MsgKind::Dumped,
            AgentMsg::Resumed { .. } => MsgKind::Resumed,
            AgentMsg::Flushed { .. } => MsgKind::Flushed,
            AgentMsg::Stopped { .. } => MsgKind::Stopped,
        }
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MsgKind::Ready => "READY",
            MsgKind::Failed => "FAIL",
            MsgKind::Dumped => "DUMPED",
            MsgKind::Resumed => "RESUMED",
            MsgKind::Flushed => "FLUSHED",
            MsgKind::Stopped => "STOPPED",
        })
    }
}

/// One node's DUMPED report.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeDump {
    /// Its part of the manifest, without file digests (FLUSHED brings
    /// them); `image.node` must be the sender's name.
    pub image: NodeImage,
    /// `criu --version` on the node; every node of an epoch must agree.
    pub criu_version: String,
    /// The node's own timings; the manifest gets the maximum of each field.
    pub timings: Timings,
}

/// A command for every agent of the epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Drain, lock the network, freeze; answer READY.
    Prepare,
    /// Every node is READY: dump now; answer DUMPED.
    Dump,
    /// Every node is DUMPED. Continue mode: resume the tree now (RESUMED).
    /// Stop mode: keep the tree frozen. The flush (FLUSHED) goes on either
    /// way.
    Commit { mode: CheckpointMode },
    /// The manifest is in place. Stop mode: kill the frozen tree (STOPPED).
    /// Both modes: drop staging.
    Committed { mode: CheckpointMode },
    /// Resume the tree untouched (if frozen) and drop staging.
    Abort { reason: String },
}

/// What the caller must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Send `command` for epoch `epoch` to every agent of the job.
    Broadcast { epoch: u64, command: Command },
    /// Commit this manifest (`PendingEpoch::commit`) and report
    /// [`Event::CommitSucceeded`] or [`Event::CommitFailed`].
    ///
    /// If the epoch aborts while the write is in flight (only possible if
    /// the caller commits asynchronously), the caller must make sure the
    /// epoch does not stay committed: a late `CommitSucceeded` is answered
    /// with [`Ignored::CommitAfterAbort`].
    WriteManifest(Box<Manifest>),
    /// The epoch is over; comes exactly once, last.
    Done(Box<Outcome>),
}

/// Whether an event changed the epoch. Either way, carry out the actions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Handled {
    Applied,
    Ignored(Ignored),
}

/// Why an event was dropped (log it; none of these is an error of the job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// No such node in the roster.
    UnknownNode { node: NodeId },
    /// A message about another epoch (a straggler of an earlier one).
    WrongEpoch { node: NodeId, epoch: u64 },
    /// The agent had already sent this.
    Duplicate { node: NodeId, msg: MsgKind },
    /// From an agent already counted as failed or lost after the commit.
    NodeGone { node: NodeId },
    /// The epoch is over.
    EpochOver,
    /// A commit result while no manifest was outstanding (a caller bug).
    UnexpectedCommitResult,
    /// The manifest was committed after the epoch aborted: the caller must
    /// remove it (the agents have been told to abort).
    CommitAfterAbort,
    /// `Cancel` after the commit point: a committed epoch is not undone.
    CancelAfterCommit,
}

/// How long each phase may take, from the broadcast that starts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// PREPARE → every READY.
    pub prepare: Duration,
    /// DUMP → every DUMPED.
    pub dump: Duration,
    /// Last DUMPED (COMMIT) → every FLUSHED.
    pub flush: Duration,
    /// Manifest handed over → commit result.
    pub commit: Duration,
    /// COMMITTED → every STOPPED (stop mode) or RESUMED (continue mode);
    /// past it, the epoch is done with the silent nodes listed.
    pub finish: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            prepare: Duration::from_secs(30),
            dump: Duration::from_secs(600),
            flush: Duration::from_secs(600),
            commit: Duration::from_secs(60),
            finish: Duration::from_secs(30),
        }
    }
}

/// Everything an epoch needs to know besides its roster.
#[derive(Debug, Clone)]
pub struct EpochSpec {
    pub job: String,
    pub epoch: u64,
    pub mode: CheckpointMode,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub command: Vec<String>,
    pub cwd: String,
    /// Wall-clock start, seconds since the Unix epoch (for the manifest:
    /// the state machine reads no clock).
    pub created_unix: u64,
    pub deadlines: Deadlines,
}

/// Why an epoch could not begin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("cannot begin an epoch of job {job:?}: invalid job name")]
    InvalidJob { job: String },
    #[error("cannot begin epoch 0 of job {job}: epoch numbers start at 1")]
    ZeroEpoch { job: String },
    #[error("cannot begin epoch {epoch} of job {job}: the {which} deadline is zero")]
    ZeroDeadline {
        job: String,
        epoch: u64,
        which: &'static str,
    },
}

/// How far an epoch is, for `ckpt-job status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub nodes: u32,
    /// Agents in each [`AgentPhase`], indexed by `AgentPhase as usize`.
    pub agents: [u32; AgentPhase::COUNT],
}

impl Progress {
    pub fn in_phase(&self, p: AgentPhase) -> u32 {
        self.agents[p as usize]
    }
}
