//! One restart of a committed epoch across its nodes, as a state machine
//! the coordinator task drives (DESIGN.md, "Restart").
//!
//! ```text
//!             all RESTORED              all RESUMED
//!  Restoring ─────────────► Resuming ─────────────► Done (restarted)
//!  RESTORE_TREE sent         RESUME sent
//!  any FAIL, lost agent or deadline ──► Aborting: ABORT sent to every target,
//!      each kills what it restored; waits for every ABORTED (or loss, or
//!      the abort deadline) ──► Done (failed)
//! ```
//!
//! Every tree is restored stopped (frozen) and nothing is resumed before
//! every node reported RESTORED. An agent that loses the coordinator while
//! it holds restored trees kills them itself.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use ckpt_protocol::cluster::pb;

use super::wire::clean;

/// How long each restart phase may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartTimeouts {
    /// From RESTORE_TREE until every RESTORED (verification + CRIU).
    pub restore: Duration,
    /// From RESUME until every RESUMED.
    pub resume: Duration,
    /// From ABORT until every ABORTED.
    pub abort: Duration,
}

impl Default for RestartTimeouts {
    fn default() -> Self {
        RestartTimeouts {
            restore: Duration::from_secs(120),
            resume: Duration::from_secs(30),
            abort: Duration::from_secs(120),
        }
    }
}

/// One restart to run.
#[derive(Debug, Clone)]
pub struct RestartRequest {
    pub job: String,
    /// The committed epoch to restart from.
    pub epoch: u64,
    /// `<root>/<job>/<epoch>/` on the shared filesystem.
    pub epoch_dir: String,
    /// Which agent restores which node image: image node → agent node. An
    /// agent takes at most one image.
    pub placement: BTreeMap<String, String>,
    pub timeouts: RestartTimeouts,
}

/// Where a restart is, or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPhase {
    Restoring,
    Resuming,
    Aborting,
}

impl fmt::Display for RestartPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPhase::Restoring => "restoring",
            RestartPhase::Resuming => "resuming",
            RestartPhase::Aborting => "aborting",
        })
    }
}

/// One node of a finished restart.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartedNode {
    pub image_node: String,
    pub agent: String,
    pub verify_ms: f64,
    pub restore_ms: f64,
    /// From the agent's RESTORED to its RESUME (the trees held frozen).
    pub held_ms: f64,
}

/// A restart in which every node restored and resumed its trees.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartOutcome {
    pub job: String,
    pub epoch: u64,
    pub nodes: Vec<RestartedNode>,
    pub total: Duration,
}

/// Why a restart did not happen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestartError {
    #[error("cannot restart job {job}: {reason}")]
    Refused { job: String, reason: String },
    #[error("cannot restart job {job}: epoch {running} is still running")]
    Busy { job: String, running: u64 },
    #[error("cannot restart job {job}: no agent connected on {}", missing.join(", "))]
    NotConnected { job: String, missing: Vec<String> },
    #[error(
        "restart of job {job} from epoch {epoch} failed while {phase}{}: {reason}{}",
        node.as_ref().map(|n| format!(" on node {n}")).unwrap_or_default(),
        if unconfirmed.is_empty() { String::new() } else {
            format!(" (abort not confirmed by {})", unconfirmed.join(", "))
        }
    )]
    Failed {
        job: String,
        epoch: u64,
        phase: RestartPhase,
        /// The agent node that failed, if one did.
        node: Option<String>,
        reason: String,
        /// Agents that did not confirm they killed what they restored.
        unconfirmed: Vec<String>,
    },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

/// What an agent said about the restart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RestartEvent {
    Restored {
        agent: String,
        image_node: String,
        verify_ms: f64,
        restore_ms: f64,
    },
    Resumed {
        agent: String,
    },
    Failed {
        agent: String,
        reason: String,
    },
    Aborted {
        agent: String,
    },
    Lost {
        agent: String,
    },
    Tick,
    Cancel {
        reason: String,
    },
}

/// What the coordinator task must do.
#[derive(Debug)]
pub(crate) enum RestartAction {
    Send { agent: String, frame: pb::Frame },
    Done(Result<RestartOutcome, RestartError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TState {
    Pending,
    Restored,
    Resumed,
    /// Failed (it cleaned up on its own, but is told to ABORT anyway).
    Failed,
    Aborted,
    Lost,
}

#[derive(Debug)]
struct Target {
    agent: String,
    image_node: String,
    state: TState,
    verify_ms: f64,
    restore_ms: f64,
    restored_at: Option<Instant>,
    held_ms: f64,
}

#[derive(Debug)]
struct Failure {
    phase: RestartPhase,
    node: Option<String>,
    reason: String,
}

/// A running restart.
#[derive(Debug)]
pub(crate) struct RestartRun {
    job: String,
    epoch: u64,
    epoch_dir: String,
    timeouts: RestartTimeouts,
    targets: Vec<Target>,
    phase: RestartPhase,
    deadline: Instant,
    failure: Option<Failure>,
    started: Instant,
}

fn ms32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl RestartRun {
    /// Starts the restart: RESTORE_TREE to every target. The placement must
    /// have been checked (non-empty, one image per agent).
    pub(crate) fn begin(req: RestartRequest, now: Instant, out: &mut Vec<RestartAction>) -> Self {
        let targets: Vec<Target> = req
            .placement
            .iter()
            .map(|(image, agent)| Target {
                agent: agent.clone(),
                image_node: image.clone(),
                state: TState::Pending,
                verify_ms: 0.0,
                restore_ms: 0.0,
                restored_at: None,
                held_ms: 0.0,
            })
            .collect();
        let run = RestartRun {
            job: req.job,
            epoch: req.epoch,
            epoch_dir: req.epoch_dir,
            timeouts: req.timeouts,
            targets,
            phase: RestartPhase::Restoring,
            deadline: now + req.timeouts.restore,
            failure: None,
            started: now,
        };
        for t in &run.targets {
            out.push(RestartAction::Send {
                agent: t.agent.clone(),
                frame: pb::RestoreTree {
                    job: run.job.clone(),
                    epoch: run.epoch,
                    epoch_dir: run.epoch_dir.clone(),
                    image_node: t.image_node.clone(),
                    restore_ms: ms32(run.timeouts.restore),
                }
                .into(),
            });
        }
        run
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(crate) fn has_agent(&self, agent: &str) -> bool {
        self.targets.iter().any(|t| t.agent == agent)
    }

    fn target(&mut self, agent: &str) -> Option<&mut Target> {
        self.targets.iter_mut().find(|t| t.agent == agent)
    }

    /// Handles one event; returns true once the restart is over (a `Done`
    /// action was pushed).
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        event: RestartEvent,
        out: &mut Vec<RestartAction>,
    ) -> bool {
        match (self.phase, event) {
            (_, RestartEvent::Cancel { reason }) => {
                if self.phase != RestartPhase::Aborting {
                    self.fail(now, None, reason, out);
                }
                // Nobody will wait for the ABORTEDs.
                self.finish(out);
                return true;
            }
            (
                RestartPhase::Restoring,
                RestartEvent::Restored {
                    agent,
                    image_node,
                    verify_ms,
                    restore_ms,
                },
            ) => {
                let Some(t) = self.target(&agent) else {
                    return false;
                };
                if t.state != TState::Pending {
                    return false;
                }
                if t.image_node != image_node {
                    let reason = format!(
                        "restored the image of node {}, but was asked for {}",
                        clean(&image_node),
                        t.image_node
                    );
                    self.fail(now, Some(agent), reason, out);
                } else {
                    t.state = TState::Restored;
                    t.verify_ms = verify_ms;
                    t.restore_ms = restore_ms;
                    t.restored_at = Some(now);
                    if self.targets.iter().all(|t| t.state == TState::Restored) {
                        self.phase = RestartPhase::Resuming;
                        self.deadline = now + self.timeouts.resume;
                        for t in &self.targets {
                            out.push(RestartAction::Send {
                                agent: t.agent.clone(),
                                frame: pb::Resume {
                                    job: self.job.clone(),
                                    epoch: self.epoch,
                                }
                                .into(),
                            });
                        }
                    }
                }
            }
            (RestartPhase::Resuming, RestartEvent::Resumed { agent }) => {
                let Some(t) = self.target(&agent) else {
                    return false;
                };
                if t.state == TState::Restored {
                    t.state = TState::Resumed;
                    t.held_ms = t
                        .restored_at
                        .map_or(0.0, |at| now.duration_since(at).as_secs_f64() * 1e3);
                }
                if self.targets.iter().all(|t| t.state == TState::Resumed) {
                    let outcome = RestartOutcome {
                        job: self.job.clone(),
                        epoch: self.epoch,
                        nodes: self
                            .targets
                            .iter()
                            .map(|t| RestartedNode {
                                image_node: t.image_node.clone(),
                                agent: t.agent.clone(),
                                verify_ms: t.verify_ms,
                                restore_ms: t.restore_ms,
                                held_ms: t.held_ms,
                            })
                            .collect(),
                        total: now.duration_since(self.started),
                    };
                    out.push(RestartAction::Done(Ok(outcome)));
                    return true;
                }
            }
            (
                RestartPhase::Restoring | RestartPhase::Resuming,
                RestartEvent::Failed { agent, reason },
            ) => {
                if let Some(t) = self.target(&agent) {
                    t.state = TState::Failed;
                    self.fail(now, Some(agent), reason, out);
                }
            }
            (RestartPhase::Restoring | RestartPhase::Resuming, RestartEvent::Lost { agent }) => {
                if let Some(t) = self.target(&agent) {
                    t.state = TState::Lost;
                    self.fail(now, Some(agent), "its agent was lost".into(), out);
                }
            }
            (RestartPhase::Restoring | RestartPhase::Resuming, RestartEvent::Tick) => {
                if now >= self.deadline {
                    let want = if self.phase == RestartPhase::Restoring {
                        TState::Restored
                    } else {
                        TState::Resumed
                    };
                    let late: Vec<&str> = self
                        .targets
                        .iter()
                        .filter(|t| t.state != want)
                        .map(|t| t.agent.as_str())
                        .collect();
                    let (what, limit) = if want == TState::Restored {
                        ("RESTORED", self.timeouts.restore)
                    } else {
                        ("RESUMED", self.timeouts.resume)
                    };
                    let reason = format!(
                        "no {what} within {} ms from {}",
                        limit.as_millis(),
                        late.join(", ")
                    );
                    let node = (late.len() == 1).then(|| late[0].to_owned());
                    self.fail(now, node, reason, out);
                }
            }
            (
                RestartPhase::Aborting,
                RestartEvent::Aborted { agent } | RestartEvent::Failed { agent, .. },
            ) => {
                if let Some(t) = self.target(&agent) {
                    t.state = TState::Aborted;
                }
            }
            (RestartPhase::Aborting, RestartEvent::Lost { agent }) => {
                if let Some(t) = self.target(&agent) {
                    if t.state != TState::Aborted {
                        t.state = TState::Lost;
                    }
                }
            }
            (RestartPhase::Aborting, RestartEvent::Tick) => {
                if now >= self.deadline {
                    self.finish(out);
                    return true;
                }
            }
            // Late or duplicate replies.
            _ => return false,
        }
        if self.phase == RestartPhase::Aborting
            && self
                .targets
                .iter()
                .all(|t| matches!(t.state, TState::Aborted | TState::Lost))
        {
            self.finish(out);
            return true;
        }
        false
    }

    /// Gives the restart up: ABORT to every reachable target.
    fn fail(
        &mut self,
        now: Instant,
        node: Option<String>,
        reason: String,
        out: &mut Vec<RestartAction>,
    ) {
        tracing::warn!(job = %self.job, epoch = self.epoch, phase = %self.phase, ?node, %reason, "restart failed; aborting it");
        self.failure = Some(Failure {
            phase: self.phase,
            node,
            reason: reason.clone(),
        });
        self.phase = RestartPhase::Aborting;
        self.deadline = now + self.timeouts.abort;
        for t in &self.targets {
            if t.state == TState::Lost {
                continue;
            }
            out.push(RestartAction::Send {
                agent: t.agent.clone(),
                frame: pb::Abort {
                    job: self.job.clone(),
                    epoch: self.epoch,
                    reason: reason.clone(),
                }
                .into(),
            });
        }
    }

    fn finish(&mut self, out: &mut Vec<RestartAction>) {
        let f = self.failure.take().unwrap_or(Failure {
            phase: self.phase,
            node: None,
            reason: "aborted".into(),
        });
        let unconfirmed = self
            .targets
            .iter()
            .filter(|t| t.state != TState::Aborted)
            .map(|t| t.agent.clone())
            .collect();
        out.push(RestartAction::Done(Err(RestartError::Failed {
            job: self.job.clone(),
            epoch: self.epoch,
            phase: f.phase,
            node: f.node,
            reason: f.reason,
            unconfirmed,
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> RestartRequest {
        RestartRequest {
            job: "j".into(),
            epoch: 4,
            epoch_dir: "/s/j/000004".into(),
            placement: pairs
                .iter()
                .map(|(i, a)| ((*i).to_owned(), (*a).to_owned()))
                .collect(),
            timeouts: RestartTimeouts::default(),
        }
    }

    fn sent(out: &[RestartAction]) -> Vec<(String, &'static str)> {
        out.iter()
            .filter_map(|a| match a {
                RestartAction::Send { agent, frame } => Some((agent.clone(), frame.kind())),
                RestartAction::Done(_) => None,
            })
            .collect()
    }

    fn restored(agent: &str, image: &str) -> RestartEvent {
        RestartEvent::Restored {
            agent: agent.into(),
            image_node: image.into(),
            verify_ms: 1.0,
            restore_ms: 2.0,
        }
    }

    #[test]
    fn resumes_only_after_every_node_restored() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut r = RestartRun::begin(req(&[("n1", "n3"), ("n2", "n4")]), now, &mut out);
        assert_eq!(
            sent(&out),
            [("n3".into(), "RestoreTree"), ("n4".into(), "RestoreTree")]
        );
        out.clear();
        assert!(!r.handle(now, restored("n3", "n1"), &mut out));
        assert!(out.is_empty(), "RESUME before every RESTORED");
        assert!(!r.handle(now, restored("n4", "n2"), &mut out));
        assert_eq!(
            sent(&out),
            [("n3".into(), "Resume"), ("n4".into(), "Resume")]
        );
        out.clear();
        let ev = |a: &str| RestartEvent::Resumed { agent: a.into() };
        assert!(!r.handle(now, ev("n3"), &mut out));
        assert!(r.handle(now, ev("n4"), &mut out));
        match out.pop() {
            Some(RestartAction::Done(Ok(o))) => {
                assert_eq!(o.nodes.len(), 2);
                assert_eq!(o.nodes[0].agent, "n3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_aborts_everybody_and_waits_for_them() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut r = RestartRun::begin(req(&[("n1", "n1"), ("n2", "n2")]), now, &mut out);
        out.clear();
        r.handle(now, restored("n1", "n1"), &mut out);
        let fail = RestartEvent::Failed {
            agent: "n2".into(),
            reason: "bad page file".into(),
        };
        assert!(!r.handle(now, fail, &mut out));
        assert_eq!(sent(&out), [("n1".into(), "Abort"), ("n2".into(), "Abort")]);
        out.clear();
        assert!(!r.handle(now, RestartEvent::Aborted { agent: "n1".into() }, &mut out));
        assert!(r.handle(now, RestartEvent::Aborted { agent: "n2".into() }, &mut out));
        match out.pop() {
            Some(RestartAction::Done(Err(RestartError::Failed {
                node,
                reason,
                phase,
                unconfirmed,
                ..
            }))) => {
                assert_eq!(node.as_deref(), Some("n2"));
                assert_eq!(reason, "bad page file");
                assert_eq!(phase, RestartPhase::Restoring);
                assert!(unconfirmed.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeouts_and_losses_abort() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut r = RestartRun::begin(req(&[("n1", "n1"), ("n2", "n2")]), now, &mut out);
        out.clear();
        r.handle(now, restored("n1", "n1"), &mut out);
        let late = now + Duration::from_secs(121);
        assert!(!r.handle(late, RestartEvent::Tick, &mut out));
        assert_eq!(sent(&out), [("n1".into(), "Abort"), ("n2".into(), "Abort")]);
        out.clear();
        assert!(!r.handle(late, RestartEvent::Lost { agent: "n2".into() }, &mut out));
        let end = late + Duration::from_secs(121);
        assert!(r.handle(end, RestartEvent::Tick, &mut out));
        match out.pop() {
            Some(RestartAction::Done(Err(RestartError::Failed {
                node, unconfirmed, ..
            }))) => {
                assert_eq!(node.as_deref(), Some("n2"));
                assert_eq!(unconfirmed, ["n1", "n2"]);
            }
            other => panic!("{other:?}"),
        }

        // A RESTORED of the wrong image fails that node.
        let mut r = RestartRun::begin(req(&[("n1", "n3")]), now, &mut out);
        out.clear();
        r.handle(now, restored("n3", "n2"), &mut out);
        assert_eq!(sent(&out), [("n3".into(), "Abort")]);
    }
}
