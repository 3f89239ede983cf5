//! How the epoch judges each agent message: which phase it moves the
//! agent to, whether that move is expected now, and what to do otherwise.

use std::time::Instant;

use ckpt_protocol::manifest::CheckpointMode;

use super::super::outcome::{AbortReason, PostCommitProblem};
use super::super::{
    Action, AgentMsg, AgentPhase, Command, Handled, Ignored, MsgKind, NodeDump, NodeId, Phase,
};
use super::Epoch;

/// The agent phase a message moves its sender to, in this mode; `None` if
/// the message has no place in this mode.
fn target(msg: MsgKind, mode: CheckpointMode) -> Option<AgentPhase> {
    use CheckpointMode::{Continue, Stop};
    match (msg, mode) {
        (MsgKind::Ready, _) => Some(AgentPhase::Ready),
        (MsgKind::Dumped, _) => Some(AgentPhase::Dumped),
        (MsgKind::Resumed, Continue) => Some(AgentPhase::Released),
        (MsgKind::Flushed, _) => Some(AgentPhase::Flushed),
        (MsgKind::Stopped, Stop) => Some(AgentPhase::Finished),
        (MsgKind::Resumed, Stop) | (MsgKind::Stopped, Continue) | (MsgKind::Failed, _) => None,
    }
}

/// Whether an agent may move `from` → `to` while the epoch is in `phase`.
fn expected(phase: Phase, mode: CheckpointMode, from: AgentPhase, to: AgentPhase) -> bool {
    use AgentPhase as A;
    let cont = mode == CheckpointMode::Continue;
    match (phase, from, to) {
        (Phase::Preparing, A::Pending, A::Ready)
        | (Phase::Dumping, A::Ready, A::Dumped)
        | (Phase::Stopping, A::Flushed, A::Finished) => true,
        // Continue mode: the tree runs again before its images are flushed.
        (Phase::Flushing, A::Dumped, A::Released) | (Phase::Flushing, A::Released, A::Flushed) => {
            cont
        }
        // Stop mode: flushed while still frozen.
        (Phase::Flushing, A::Dumped, A::Flushed) => !cont,
        _ => false,
    }
}

/// The agent phase every agent must reach to end `phase`.
pub(super) fn goal(phase: Phase) -> Option<AgentPhase> {
    match phase {
        Phase::Preparing => Some(AgentPhase::Ready),
        Phase::Dumping => Some(AgentPhase::Dumped),
        Phase::Flushing => Some(AgentPhase::Flushed),
        Phase::Stopping => Some(AgentPhase::Finished),
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
        let to = target(kind, self.spec.mode);
        if let Some(to) = to {
            if from >= to {
                return Handled::Ignored(Ignored::Duplicate { node, msg: kind });
            }
        }
        let to = match to {
            Some(to) if expected(self.phase, self.spec.mode, from, to) => to,
            _ => {
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
                if self.count(AgentPhase::Dumped) == self.n() {
                    self.enter(now, Phase::Flushing);
                    let mode = self.spec.mode;
                    self.broadcast(Command::Commit { mode }, out);
                }
            }
            AgentMsg::Resumed { downtime } | AgentMsg::Stopped { downtime } => {
                self.max_downtime = Some(self.max_downtime.map_or(downtime, |m| m.max(downtime)));
                self.set_agent(node, to);
                self.finish_if_settled(now, out);
            }
            AgentMsg::Flushed => {
                self.set_agent(node, to);
                if self.count(AgentPhase::Flushed) == self.n() {
                    self.enter(now, Phase::Committing);
                    match self.build_manifest(now) {
                        Ok(m) => out.push(Action::WriteManifest(Box::new(m))),
                        Err(reason) => self.abort(now, reason, out),
                    }
                }
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
        if self.phase == Phase::Stopping && settled == self.n() {
            self.finish(now, out);
        }
    }
}
