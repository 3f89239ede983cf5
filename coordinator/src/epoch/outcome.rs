//! How an epoch ended.

use std::fmt;
use std::time::Duration;

use ckpt_protocol::manifest::CheckpointMode;

use super::{AgentPhase, MsgKind, Phase};

/// Late nodes named in a timeout message; the rest are counted.
const NAMED_LATE: usize = 10;

/// The end of one epoch, handed over by [`super::Action::Done`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub job: String,
    pub epoch: u64,
    pub mode: CheckpointMode,
    pub verdict: Verdict,
    pub timings: PhaseTimings,
    /// Longest time any node's tree was frozen, from RESUMED/STOPPED.
    pub max_downtime: Option<Duration>,
    /// Agents that failed, were lost or stayed silent after the commit
    /// point; the epoch is committed regardless.
    pub after_commit: Vec<PostCommitProblem>,
}

impl Outcome {
    pub fn committed(&self) -> bool {
        matches!(self.verdict, Verdict::Committed)
    }

    pub fn abort_reason(&self) -> Option<&AbortReason> {
        match &self.verdict {
            Verdict::Committed => None,
            Verdict::Aborted { reason, .. } => Some(reason),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The manifest is in place: this epoch is a restart point.
    Committed,
    /// Given up in `phase`; the previous committed epoch stays the restart
    /// point.
    Aborted { phase: Phase, reason: AbortReason },
}

/// How long each phase took (from the `now` values passed in); `None` for a
/// phase never entered. An aborted phase counts until the abort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseTimings {
    /// PREPARE → last READY: the global barrier.
    pub prepare: Option<Duration>,
    /// DUMP → last DUMPED.
    pub dump: Option<Duration>,
    /// Last DUMPED (COMMIT) → last FLUSHED.
    pub flush: Option<Duration>,
    /// Manifest handed over → commit result.
    pub commit: Option<Duration>,
    /// COMMITTED → last STOPPED (stop mode) or RESUMED still missing then
    /// (continue mode). `total - finish` is request → committed.
    pub finish: Option<Duration>,
    /// Begin → end.
    pub total: Duration,
}

/// Why an epoch was aborted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AbortReason {
    #[error("node {node} failed while the epoch was {phase}: {reason}")]
    AgentFailed {
        node: String,
        phase: Phase,
        reason: String,
    },
    #[error("lost the agent of node {node} while the epoch was {phase}")]
    AgentLost { node: String, phase: Phase },
    #[error("{}", timeout_text(*phase, *waited, late, *nodes))]
    Timeout {
        phase: Phase,
        waited: Duration,
        /// Every node the phase was still waiting for (empty while
        /// committing: then the store was late).
        late: Vec<String>,
        nodes: u32,
    },
    #[error(
        "protocol violation: node {node} sent {msg} while the epoch was {phase} \
         and the node was {agent:?}"
    )]
    ProtocolViolation {
        node: String,
        msg: MsgKind,
        phase: Phase,
        agent: AgentPhase,
    },
    #[error("protocol violation: node {node} sent DUMPED for node {claimed:?}")]
    WrongImage { node: String, claimed: String },
    #[error("node {node} sent FLUSHED with digests that do not fit its image: {reason}")]
    BadDigests { node: String, reason: String },
    #[error(
        "node {node} runs CRIU {found:?} but other nodes run {expected:?}: \
         one manifest cannot name the CRIU that wrote the images"
    )]
    MixedCriu {
        node: String,
        found: String,
        expected: String,
    },
    #[error("committing the manifest failed: {reason}")]
    CommitFailed { reason: String },
    #[error("cancelled: {reason}")]
    Cancelled { reason: String },
    #[error("internal error in the epoch state machine: {0}")]
    Internal(&'static str),
}

fn timeout_text(phase: Phase, waited: Duration, late: &[String], nodes: u32) -> String {
    let waiting_for = match phase {
        Phase::Preparing => "READY",
        Phase::Dumping => "DUMPED",
        Phase::Flushing => "FLUSHED",
        Phase::Stopping => "STOPPED",
        Phase::Resuming => "RESUMED",
        Phase::Committing | Phase::Done | Phase::Aborted => {
            return format!(
                "timed out while {phase}: the manifest commit did not finish within {}",
                Secs(waited)
            )
        }
    };
    let mut named = late
        .iter()
        .take(NAMED_LATE)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if late.len() > NAMED_LATE {
        named.push_str(&format!(" and {} more", late.len() - NAMED_LATE));
    }
    format!(
        "timed out while {phase}: no {waiting_for} within {} from {} of {nodes} nodes: {named}",
        Secs(waited),
        late.len()
    )
}

struct Secs(Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3} s", self.0.as_secs_f64())
    }
}

/// Something that went wrong with one agent after the commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostCommitProblem {
    Failed {
        node: String,
        reason: String,
    },
    Lost {
        node: String,
    },
    /// No STOPPED (RESUMED) before the finish deadline.
    Silent {
        node: String,
    },
    /// A message that makes no sense after the commit, e.g. RESUMED in stop
    /// mode (the job may still be running on that node).
    Unexpected {
        node: String,
        msg: MsgKind,
    },
}

impl fmt::Display for PostCommitProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostCommitProblem::Failed { node, reason } => {
                write!(f, "node {node} failed after the commit: {reason}")
            }
            PostCommitProblem::Lost { node } => write!(f, "lost node {node} after the commit"),
            PostCommitProblem::Silent { node } => {
                write!(f, "node {node} did not confirm the end of its tree")
            }
            PostCommitProblem::Unexpected { node, msg } => {
                write!(f, "node {node} sent {msg} after the commit")
            }
        }
    }
}
