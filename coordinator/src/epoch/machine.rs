//! The epoch state machine itself.

use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::manifest::{CheckpointMode, Manifest, NodeImage, Timings, FORMAT_VERSION};

use super::outcome::{AbortReason, Outcome, PhaseTimings, PostCommitProblem, Verdict};
use super::{
    Action, AgentPhase, Command, EpochError, EpochSpec, Event, Handled, Ignored, NodeId, Phase,
    Progress, Roster,
};
use crate::store::valid_job_name;

mod agent;

use agent::goal;

/// One epoch of one job. See the module documentation for the protocol.
#[derive(Debug)]
pub struct Epoch {
    spec: EpochSpec,
    roster: Arc<Roster>,
    phase: Phase,
    /// One byte per agent, indexed by [`NodeId`].
    agents: Vec<AgentPhase>,
    /// How many agents are in each [`AgentPhase`]: "every agent is X" is
    /// one comparison.
    counts: [u32; AgentPhase::COUNT],
    /// DUMPED images, indexed by [`NodeId`], completed with the digests of
    /// FLUSHED, until the manifest takes them.
    images: Vec<Option<NodeImage>>,
    criu_version: Option<String>,
    /// Per-field maximum over the nodes' reports.
    node_timings: Timings,
    max_downtime: Option<Duration>,
    started: Instant,
    phase_started: Instant,
    timings: PhaseTimings,
    after_commit: Vec<PostCommitProblem>,
    aborted_in: Option<Phase>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Epoch {
    /// Starts the epoch: every agent is `Pending` and PREPARE goes out.
    pub fn begin(
        spec: EpochSpec,
        roster: Arc<Roster>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<Epoch, EpochError> {
        if !valid_job_name(&spec.job) {
            return Err(EpochError::InvalidJob { job: spec.job });
        }
        if spec.epoch == 0 {
            return Err(EpochError::ZeroEpoch { job: spec.job });
        }
        let d = &spec.deadlines;
        for (which, value) in [
            ("prepare", d.prepare),
            ("dump", d.dump),
            ("flush", d.flush),
            ("commit", d.commit),
            ("finish", d.finish),
        ] {
            if value.is_zero() {
                return Err(EpochError::ZeroDeadline {
                    job: spec.job,
                    epoch: spec.epoch,
                    which,
                });
            }
        }
        let n = roster.len();
        let mut counts = [0; AgentPhase::COUNT];
        // A roster holds at most u32::MAX nodes.
        counts[AgentPhase::Pending as usize] = n as u32;
        let mut images = Vec::new();
        images.resize_with(n, || None);
        out.push(Action::Broadcast {
            epoch: spec.epoch,
            command: Command::Prepare,
        });
        Ok(Epoch {
            spec,
            roster,
            phase: Phase::Preparing,
            agents: vec![AgentPhase::Pending; n],
            counts,
            images,
            criu_version: None,
            node_timings: Timings::default(),
            max_downtime: None,
            started: now,
            phase_started: now,
            timings: PhaseTimings::default(),
            after_commit: Vec::new(),
            aborted_in: None,
        })
    }

    pub fn number(&self) -> u64 {
        self.spec.epoch
    }

    pub fn job(&self) -> &str {
        &self.spec.job
    }

    pub fn mode(&self) -> CheckpointMode {
        self.spec.mode
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn roster(&self) -> &Arc<Roster> {
        &self.roster
    }

    pub fn agent(&self, node: NodeId) -> Option<AgentPhase> {
        self.agents.get(node.index()).copied()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            phase: self.phase,
            nodes: self.n(),
            agents: self.counts,
        }
    }

    /// When the current phase times out (`None` once the epoch is over).
    /// Deliver [`Event::Tick`] then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadline()
            .and_then(|d| self.phase_started.checked_add(d))
    }

    /// Feeds one event; actions to carry out, in order, are appended to
    /// `out`. Never panics on anything a peer or the caller sends.
    pub fn handle(&mut self, now: Instant, event: Event, out: &mut Vec<Action>) -> Handled {
        if self.phase.is_final() {
            return Handled::Ignored(match event {
                Event::CommitSucceeded if self.aborted_in == Some(Phase::Committing) => {
                    Ignored::CommitAfterAbort
                }
                _ => Ignored::EpochOver,
            });
        }
        // A commit result is a fact about the store and is taken even past
        // the deadline; anything else is judged against the deadline first,
        // so a READY that comes too late does not complete the barrier.
        let is_commit_result = matches!(event, Event::CommitSucceeded | Event::CommitFailed { .. });
        if !is_commit_result && self.check_deadline(now, out) && self.phase.is_final() {
            return match event {
                Event::Tick => Handled::Applied,
                _ => Handled::Ignored(Ignored::EpochOver),
            };
        }
        match event {
            Event::Tick => Handled::Applied,
            Event::CommitSucceeded => self.on_commit_result(now, Ok(()), out),
            Event::CommitFailed { reason } => self.on_commit_result(now, Err(reason), out),
            Event::Cancel { reason } => {
                if self.phase.is_committed() {
                    return Handled::Ignored(Ignored::CancelAfterCommit);
                }
                self.abort(now, AbortReason::Cancelled { reason }, out);
                Handled::Applied
            }
            Event::Lost { node } => self.on_lost(now, node, out),
            Event::Agent { node, epoch, msg } => {
                if node.index() >= self.agents.len() {
                    Handled::Ignored(Ignored::UnknownNode { node })
                } else if epoch != self.spec.epoch {
                    Handled::Ignored(Ignored::WrongEpoch { node, epoch })
                } else {
                    self.on_agent(now, node, msg, out)
                }
            }
        }
    }

    fn n(&self) -> u32 {
        self.agents.len() as u32
    }

    fn count(&self, p: AgentPhase) -> u32 {
        self.counts[p as usize]
    }

    fn node_name(&self, node: NodeId) -> String {
        self.roster.name(node).unwrap_or("?").to_owned()
    }

    fn set_agent(&mut self, node: NodeId, to: AgentPhase) {
        let from = mem::replace(&mut self.agents[node.index()], to);
        self.counts[from as usize] -= 1;
        self.counts[to as usize] += 1;
    }

    fn deadline(&self) -> Option<Duration> {
        let d = &self.spec.deadlines;
        match self.phase {
            Phase::Preparing => Some(d.prepare),
            Phase::Dumping => Some(d.dump),
            Phase::Flushing => Some(d.flush),
            Phase::Committing => Some(d.commit),
            Phase::Stopping | Phase::Resuming => Some(d.finish),
            Phase::Done | Phase::Aborted => None,
        }
    }

    /// The only place the phase changes: records how long the old one
    /// took.
    fn enter(&mut self, now: Instant, next: Phase) {
        debug_assert!(
            self.phase.can_go_to(next),
            "epoch {} cannot go from {} to {next}",
            self.spec.epoch,
            self.phase
        );
        let spent = Some(now.saturating_duration_since(self.phase_started));
        let t = &mut self.timings;
        match self.phase {
            Phase::Preparing => t.prepare = spent,
            Phase::Dumping => t.dump = spent,
            Phase::Flushing => t.flush = spent,
            Phase::Committing => t.commit = spent,
            Phase::Stopping | Phase::Resuming => t.finish = spent,
            Phase::Done | Phase::Aborted => {}
        }
        self.phase = next;
        self.phase_started = now;
    }

    fn broadcast(&self, command: Command, out: &mut Vec<Action>) {
        out.push(Action::Broadcast {
            epoch: self.spec.epoch,
            command,
        });
    }

    /// True if the deadline of the current phase has passed (and was acted
    /// on).
    fn check_deadline(&mut self, now: Instant, out: &mut Vec<Action>) -> bool {
        let Some(limit) = self.deadline() else {
            return false;
        };
        let waited = now.saturating_duration_since(self.phase_started);
        if waited < limit {
            return false;
        }
        let late_nodes = || {
            let goal = goal(self.phase);
            self.agents
                .iter()
                .enumerate()
                .filter(|(_, a)| goal.is_some_and(|g| **a < g))
                .map(|(i, _)| NodeId(i as u32))
                .collect::<Vec<_>>()
        };
        if matches!(self.phase, Phase::Stopping | Phase::Resuming) {
            for node in late_nodes() {
                let node_name = self.node_name(node);
                self.after_commit
                    .push(PostCommitProblem::Silent { node: node_name });
            }
            self.finish(now, out);
        } else {
            let late = late_nodes()
                .into_iter()
                .map(|id| self.node_name(id))
                .collect();
            let reason = AbortReason::Timeout {
                phase: self.phase,
                waited,
                late,
                nodes: self.n(),
            };
            self.abort(now, reason, out);
        }
        true
    }

    fn on_commit_result(
        &mut self,
        now: Instant,
        result: Result<(), String>,
        out: &mut Vec<Action>,
    ) -> Handled {
        if self.phase != Phase::Committing {
            return Handled::Ignored(Ignored::UnexpectedCommitResult);
        }
        match result {
            Ok(()) => {
                let mode = self.spec.mode;
                self.enter(
                    now,
                    match mode {
                        CheckpointMode::Stop => Phase::Stopping,
                        CheckpointMode::Continue => Phase::Resuming,
                    },
                );
                self.broadcast(Command::Committed { mode }, out);
                // Continue mode: every RESUMED may be in already.
                self.finish_if_settled(now, out);
            }
            Err(reason) => self.abort(now, AbortReason::CommitFailed { reason }, out),
        }
        Handled::Applied
    }

    fn build_manifest(&mut self, now: Instant) -> Result<Manifest, AbortReason> {
        let nodes: Vec<NodeImage> = mem::take(&mut self.images).into_iter().flatten().collect();
        if nodes.len() != self.agents.len() {
            return Err(AbortReason::Internal("a node's image is missing"));
        }
        let mut timings = self.node_timings.clone();
        if let Some(flush) = self.timings.flush {
            timings.commit_ms = ms(flush);
        }
        // The downtime is not known yet (RESUMED may still be on its way) and
        // the manifest does not wait for it: `downtime_ms` stays what the
        // nodes reported with DUMPED (informational).
        timings.total_ms = ms(now.saturating_duration_since(self.started));
        Ok(Manifest {
            format: FORMAT_VERSION,
            job: self.spec.job.clone(),
            epoch: self.spec.epoch,
            created_unix: self.spec.created_unix,
            owner_uid: self.spec.owner_uid,
            owner_gid: self.spec.owner_gid,
            criu_version: self.criu_version.take().unwrap_or_default(),
            command: mem::take(&mut self.spec.command),
            cwd: mem::take(&mut self.spec.cwd),
            mode: self.spec.mode,
            nodes,
            timings,
        })
    }

    fn finish(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.enter(now, Phase::Done);
        let outcome = self.outcome(now, Verdict::Committed);
        out.push(Action::Done(Box::new(outcome)));
    }

    fn abort(&mut self, now: Instant, reason: AbortReason, out: &mut Vec<Action>) {
        let phase = self.phase;
        self.enter(now, Phase::Aborted);
        self.aborted_in = Some(phase);
        self.images = Vec::new();
        self.broadcast(
            Command::Abort {
                reason: reason.to_string(),
            },
            out,
        );
        let outcome = self.outcome(now, Verdict::Aborted { phase, reason });
        out.push(Action::Done(Box::new(outcome)));
    }

    fn outcome(&mut self, now: Instant, verdict: Verdict) -> Outcome {
        let mut timings = self.timings;
        timings.total = now.saturating_duration_since(self.started);
        Outcome {
            job: self.spec.job.clone(),
            epoch: self.spec.epoch,
            mode: self.spec.mode,
            verdict,
            timings,
            max_downtime: self.max_downtime,
            after_commit: mem::take(&mut self.after_commit),
        }
    }
}
