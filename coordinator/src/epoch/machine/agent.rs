//! How the epoch judges each agent message: which phase it moves the
//! agent to, whether that move is expected now, and what to do otherwise.

use std::time::Instant;

use ckpt_protocol::cluster::with_digests;
use ckpt_protocol::manifest::{CheckpointMode, FileDigest};

use super::super::outcome::{AbortReason, PostCommitProblem};
use super::super::{
    Action, AgentMsg, AgentPhase, Command, Handled, Ignored, MsgKind, NodeDump, NodeId, Phase,
};
use super::Epoch;

/// What a message does to an agent in phase `from`, in this mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Moves it to this phase.
    To(AgentPhase),
    /// It had already sent this.
    Duplicate,
    /// Makes no sense for an agent in `from` (or in this mode).
    Invalid,
}

/// The agent's own order of messages (see [`AgentPhase`]); whether the
/// epoch is far enough for the move is [`expected`]'s question.
fn step(msg: MsgKind, mode: CheckpointMode, from: AgentPhase) -> Step {
    use AgentPhase as A;
    use CheckpointMode::{Continue, Stop};
    match (msg, mode, from) {
        (MsgKind::Ready, _, A::Pending) => Step::To(A::Ready),
        (MsgKind::Ready, _, _) => Step::Duplicate,
        (MsgKind::Dumped, _, A::Ready) => Step::To(A::Dumped),
        (MsgKind::Dumped, _, A::Pending) => Step::Invalid,
        (MsgKind::Dumped, _, _) => Step::Duplicate,
        (MsgKind::Flushed, _, A::Dumped) => Step::To(A::Flushed),
        (MsgKind::Flushed, Continue, A::Released) => Step::To(A::Finished),
        (MsgKind::Flushed, _, A::Flushed | A::Finished) => Step::Duplicate,
        (MsgKind::Resumed, Continue, A::Dumped) => Step::To(A::Released),
        (MsgKind::Resumed, Continue, A::Flushed) => Step::To(A::Finished),
        (MsgKind::Resumed, Continue, A::Released | A::Finished) => Step::Duplicate,
        (MsgKind::Stopped, Stop, A::Flushed) => Step::To(A::Finished),
        (MsgKind::Stopped, Stop, A::Finished) => Step::Duplicate,
        _ => Step::Invalid,
    }
}

/// Whether the epoch, in `phase`, takes a `msg` that moves its sender on.
fn expected(phase: Phase, msg: MsgKind) -> bool {
    match msg {
        MsgKind::Ready => phase == Phase::Preparing,
        MsgKind::Dumped => phase == Phase::Dumping,
        // Any time after the node's DUMPED, also before COMMIT went out;
        // the manifest (Committing) waits for every FLUSHED.
        MsgKind::Flushed => matches!(phase, Phase::Dumping | Phase::Flushing),
        // Once COMMIT went out (continue mode).
        MsgKind::Resumed => matches!(phase, Phase::Flushing | Phase::Committing | Phase::Resuming),
        MsgKind::Stopped => phase == Phase::Stopping,
        MsgKind::Failed => false,
    }
}

/// The agent phase every agent must reach (or pass) to end `phase`.
pub(super) fn goal(phase: Phase) -> Option<AgentPhase> {
    match phase {
        Phase::Preparing => Some(AgentPhase::Ready),
        Phase::Dumping => Some(AgentPhase::Dumped),
        Phase::Flushing => Some(AgentPhase::Flushed),
        Phase::Stopping | Phase::Resuming => Some(AgentPhase::Finished),
        Phase::Committing | Phase::Done | Phase::Aborted => None,
    }
}

impl Epoch {
    pub(super) fn on_agent(
        &mut self,
        now: Instant,
        node: NodeId,
        msg: AgentMsg,
        out: &mut Vec<Action>,
    ) -> Handled {
        let from = self.agents[node.index()];
        if matches!(from, AgentPhase::Failed | AgentPhase::Lost) {
            return Handled::Ignored(Ignored::NodeGone { node });
        }
        let kind = msg.kind();
        if let AgentMsg::Failed { reason } = msg {
            if self.phase.is_committed() {
                let problem = PostCommitProblem::Failed {
                    node: self.node_name(node),
                    reason,
                };
                self.gone_after_commit(now, node, AgentPhase::Failed, problem, out);
            } else {
                let reason = AbortReason::AgentFailed {
                    node: self.node_name(node),
                    phase: self.phase,
                    reason,
                };
                self.abort(now, reason, out);
            }
            return Handled::Applied;
        }
        let to = match step(kind, self.spec.mode, from) {
            Step::Duplicate => return Handled::Ignored(Ignored::Duplicate { node, msg: kind }),
            Step::To(to) if expected(self.phase, kind) => to,
            Step::To(_) | Step::Invalid => {
                self.violation(now, node, kind, from, out);
                return Handled::Applied;
            }
        };
        match msg {
            AgentMsg::Ready => {
                self.set_agent(node, to);
                if self.count(AgentPhase::Ready) == self.n() {
                    self.enter(now, Phase::Dumping);
                    self.broadcast(Command::Dump, out);
                }
            }
            AgentMsg::Dumped(dump) => {
                if let Err(reason) = self.take_dump(node, *dump) {
                    self.abort(now, reason, out);
                    return Handled::Applied;
                }
                self.set_agent(node, to);
                // While dumping, an agent past READY is Dumped or Flushed.
                if self.count(AgentPhase::Dumped) + self.count(AgentPhase::Flushed) == self.n() {
                    self.enter(now, Phase::Flushing);
                    let mode = self.spec.mode;
                    self.broadcast(Command::Commit { mode }, out);
                    self.commit_if_flushed(now, out);
                }
            }
            AgentMsg::Resumed { downtime } | AgentMsg::Stopped { downtime } => {
                self.max_downtime = Some(self.max_downtime.map_or(downtime, |m| m.max(downtime)));
                self.set_agent(node, to);
                self.finish_if_settled(now, out);
            }
            AgentMsg::Flushed { files } => {
                if let Err(reason) = self.take_digests(node, files) {
                    self.abort(now, reason, out);
                    return Handled::Applied;
                }
                self.set_agent(node, to);
                self.commit_if_flushed(now, out);
            }
            // Handled above; kept here so the match is exhaustive.
            AgentMsg::Failed { .. } => {}
        }
        Handled::Applied
    }

    /// A message out of order: fatal before the commit, a noted problem
    /// after it.
    fn violation(
        &mut self,
        now: Instant,
        node: NodeId,
        msg: MsgKind,
        agent: AgentPhase,
        out: &mut Vec<Action>,
    ) {
        let node_name = self.node_name(node);
        if self.phase.is_committed() {
            let problem = PostCommitProblem::Unexpected {
                node: node_name,
                msg,
            };
            self.gone_after_commit(now, node, AgentPhase::Failed, problem, out);
        } else {
            let reason = AbortReason::ProtocolViolation {
                node: node_name,
                msg,
                phase: self.phase,
                agent,
            };
            self.abort(now, reason, out);
        }
    }

    /// Every agent DUMPED and FLUSHED: the manifest goes to the caller.
    fn commit_if_flushed(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Before the commit every agent past DUMPED and FLUSHED is either
        // Flushed or (continue mode, resumed too) Finished.
        let flushed = self.count(AgentPhase::Flushed) + self.count(AgentPhase::Finished);
        if self.phase == Phase::Flushing && flushed == self.n() {
            self.enter(now, Phase::Committing);
            match self.build_manifest(now) {
                Ok(m) => out.push(Action::WriteManifest(Box::new(m))),
                Err(reason) => self.abort(now, reason, out),
            }
        }
    }

    /// Completes the node's DUMPED image with the digests of its FLUSHED.
    fn take_digests(&mut self, node: NodeId, files: Vec<FileDigest>) -> Result<(), AbortReason> {
        let name = self.node_name(node);
        let Some(image) = self.images.get_mut(node.index()).and_then(Option::take) else {
            return Err(AbortReason::Internal(
                "FLUSHED from a node without an image",
            ));
        };
        let image = with_digests(image, files).map_err(|e| AbortReason::BadDigests {
            node: name,
            reason: e.to_string(),
        })?;
        self.images[node.index()] = Some(image);
        Ok(())
    }

    fn take_dump(&mut self, node: NodeId, dump: NodeDump) -> Result<(), AbortReason> {
        let name = self.roster.name(node).unwrap_or("?");
        if dump.image.node != name {
            return Err(AbortReason::WrongImage {
                node: name.to_owned(),
                claimed: dump.image.node,
            });
        }
        match &self.criu_version {
            None => self.criu_version = Some(dump.criu_version),
            Some(v) if *v == dump.criu_version => {}
            Some(v) => {
                return Err(AbortReason::MixedCriu {
                    node: name.to_owned(),
                    found: dump.criu_version,
                    expected: v.clone(),
                })
            }
        }
        let (t, d) = (&mut self.node_timings, &dump.timings);
        t.freeze_ms = t.freeze_ms.max(d.freeze_ms);
        t.dump_ms = t.dump_ms.max(d.dump_ms);
        t.capture_ms = t.capture_ms.max(d.capture_ms);
        t.commit_ms = t.commit_ms.max(d.commit_ms);
        t.downtime_ms = t.downtime_ms.max(d.downtime_ms);
        t.total_ms = t.total_ms.max(d.total_ms);
        self.images[node.index()] = Some(dump.image);
        Ok(())
    }

    pub(super) fn on_lost(&mut self, now: Instant, node: NodeId, out: &mut Vec<Action>) -> Handled {
        let Some(&from) = self.agents.get(node.index()) else {
            return Handled::Ignored(Ignored::UnknownNode { node });
        };
        match from {
            AgentPhase::Failed | AgentPhase::Lost => Handled::Ignored(Ignored::NodeGone { node }),
            // Its part is done; the connection closing now is harmless.
            AgentPhase::Finished => Handled::Applied,
            _ if self.phase.is_committed() => {
                let problem = PostCommitProblem::Lost {
                    node: self.node_name(node),
                };
                self.gone_after_commit(now, node, AgentPhase::Lost, problem, out);
                Handled::Applied
            }
            _ => {
                let reason = AbortReason::AgentLost {
                    node: self.node_name(node),
                    phase: self.phase,
                };
                self.abort(now, reason, out);
                Handled::Applied
            }
        }
    }

    fn gone_after_commit(
        &mut self,
        now: Instant,
        node: NodeId,
        to: AgentPhase,
        problem: PostCommitProblem,
        out: &mut Vec<Action>,
    ) {
        self.after_commit.push(problem);
        self.set_agent(node, to);
        self.finish_if_settled(now, out);
    }

    pub(super) fn finish_if_settled(&mut self, now: Instant, out: &mut Vec<Action>) {
        let settled = self.count(AgentPhase::Finished)
            + self.count(AgentPhase::Failed)
            + self.count(AgentPhase::Lost);
        if matches!(self.phase, Phase::Stopping | Phase::Resuming) && settled == self.n() {
            self.finish(now, out);
        }
    }
}
