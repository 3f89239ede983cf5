//! Scenario tests of the epoch state machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::manifest::{
    CheckpointMode, FileDigest, Manifest, NetMode, NodeImage, Timings, TreeImage,
};

use super::*;

use CheckpointMode::{Continue, Stop};

pub(super) const DEADLINES: Deadlines = Deadlines {
    prepare: Duration::from_millis(1000),
    dump: Duration::from_millis(2000),
    flush: Duration::from_millis(3000),
    commit: Duration::from_millis(500),
    finish: Duration::from_millis(400),
};
pub(super) const EPOCH: u64 = 7;

pub(super) fn node_name(i: usize) -> String {
    format!("n{i}")
}

pub(super) fn spec(mode: CheckpointMode) -> EpochSpec {
    EpochSpec {
        job: "job-1".into(),
        epoch: EPOCH,
        mode,
        owner_uid: 1000,
        owner_gid: 1000,
        command: vec!["mpirun".into(), "./ring".into()],
        cwd: "/home/u".into(),
        created_unix: 1_700_000_000,
        deadlines: DEADLINES,
    }
}

/// The digests of [`dump`]'s files, as node `name`'s FLUSHED brings them.
pub(super) fn digests(name: &str) -> Vec<FileDigest> {
    let digest = |n: String| FileDigest {
        blake3: blake3::hash(n.as_bytes()).to_hex().to_string(),
        name: n,
        size: 4096,
    };
    vec![
        digest(format!("{name}.t0.meta.pack")),
        digest(format!("{name}.t0.pages-1.img")),
    ]
}

/// FLUSHED of node `i`.
pub(super) fn flushed(i: usize) -> AgentMsg {
    AgentMsg::Flushed {
        files: digests(&node_name(i)),
    }
}

/// A plausible DUMPED payload for node `name` (no digests: FLUSHED brings
/// them).
pub(super) fn dump(name: &str, criu: &str, dump_ms: f64) -> Box<NodeDump> {
    let meta = format!("{name}.t0.meta.pack");
    let pages = format!("{name}.t0.pages-1.img");
    Box::new(NodeDump {
        image: NodeImage {
            node: name.to_owned(),
            ranks: vec![0, 1],
            drained: Vec::new(),
            trees: vec![TreeImage {
                id: 0,
                root_pid: 100,
                net: NetMode::Private { key: "net0".into() },
                stdio: Vec::new(),
                writable_files: Vec::new(),
                captured: Vec::new(),
                meta_pack: meta.clone(),
                pages: vec![pages.clone()],
                local_pack: None,
                init_dir: None,
                init_binary: None,
            }],
            files: Vec::new(),
        },
        criu_version: criu.to_owned(),
        timings: Timings {
            freeze_ms: 2.0,
            dump_ms,
            ..Timings::default()
        },
    })
}

struct H {
    e: Epoch,
    t0: Instant,
    now: Instant,
    n: usize,
}

impl H {
    fn new(n: usize, mode: CheckpointMode) -> (H, Vec<Action>) {
        let roster = Arc::new(Roster::new((0..n).map(node_name)).unwrap());
        let t0 = Instant::now();
        let mut out = Vec::new();
        let e = Epoch::begin(spec(mode), roster, t0, &mut out).unwrap();
        (H { e, t0, now: t0, n }, out)
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        self.now = self.t0 + Duration::from_millis(ms);
        self
    }

    fn ev(&mut self, ev: Event) -> (Handled, Vec<Action>) {
        let mut out = Vec::new();
        let h = self.e.handle(self.now, ev, &mut out);
        (h, out)
    }

    fn msg(&mut self, node: usize, msg: AgentMsg) -> (Handled, Vec<Action>) {
        self.ev(Event::Agent {
            node: NodeId(node as u32),
            epoch: EPOCH,
            msg,
        })
    }

    /// Sends `make(i)` from every node; returns the actions of the last.
    fn all(&mut self, make: impl Fn(usize) -> AgentMsg) -> Vec<Action> {
        let mut last = Vec::new();
        for i in 0..self.n {
            let (h, out) = self.msg(i, make(i));
            assert_eq!(h, Handled::Applied, "node {i}");
            if i + 1 < self.n {
                assert!(out.is_empty(), "node {i}: {out:?}");
            }
            last = out;
        }
        last
    }

    fn reach_flushing(&mut self, mode: CheckpointMode) {
        self.at(10);
        assert_eq!(commands(&self.all(|_| AgentMsg::Ready)), [Command::Dump]);
        self.at(50);
        let out = self.all(|i| AgentMsg::Dumped(dump(&node_name(i), "4.1.1", 30.0)));
        assert_eq!(commands(&out), [Command::Commit { mode }]);
        assert_eq!(self.e.phase(), Phase::Flushing);
    }
}

fn commands(actions: &[Action]) -> Vec<Command> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Broadcast { epoch, command } => {
                assert_eq!(*epoch, EPOCH);
                Some(command.clone())
            }
            _ => None,
        })
        .collect()
}

fn manifest(actions: &[Action]) -> &Manifest {
    let ms: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteManifest(m) => Some(&**m),
            _ => None,
        })
        .collect();
    assert_eq!(ms.len(), 1, "{actions:?}");
    ms[0]
}

fn outcome(actions: &[Action]) -> &Outcome {
    match actions.last() {
        Some(Action::Done(o)) => o,
        other => panic!("expected Done last, got {other:?} in {actions:?}"),
    }
}

fn aborted(actions: &[Action]) -> (Phase, &AbortReason) {
    let cmds = commands(actions);
    assert_eq!(cmds.len(), 1, "{actions:?}");
    let Command::Abort { reason } = &cmds[0] else {
        panic!("expected ABORT, got {cmds:?}")
    };
    match &outcome(actions).verdict {
        Verdict::Aborted { phase, reason: r } => {
            assert_eq!(*reason, r.to_string());
            (*phase, r)
        }
        v => panic!("expected an abort, got {v:?}"),
    }
}

#[test]
fn happy_path_continue() {
    let (mut h, out) = H::new(3, Continue);
    assert_eq!(commands(&out), [Command::Prepare]);
    h.reach_flushing(Continue);
    h.at(60);
    h.all(|i| AgentMsg::Resumed {
        downtime: Duration::from_millis(55 + i as u64),
    });
    h.at(300);
    let out = h.all(flushed);
    assert_eq!(h.e.phase(), Phase::Committing);
    assert!(commands(&out).is_empty());
    let m = manifest(&out);
    m.validate().unwrap();
    assert_eq!(
        (m.job.as_str(), m.epoch, m.mode),
        ("job-1", EPOCH, Continue)
    );
    assert_eq!(m.criu_version, "4.1.1");
    let names: Vec<_> = m.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["n0", "n1", "n2"]);
    assert_eq!(m.timings.dump_ms, 30.0);
    // The manifest does not depend on RESUMED.
    assert_eq!(m.timings.downtime_ms, 0.0);
    assert_eq!(m.timings.commit_ms, 250.0);
    assert_eq!(m.timings.total_ms, 300.0);

    h.at(320);
    let (hd, out) = h.ev(Event::CommitSucceeded);
    assert_eq!(hd, Handled::Applied);
    assert_eq!(commands(&out), [Command::Committed { mode: Continue }]);
    let o = outcome(&out);
    assert!(o.committed());
    assert!(o.after_commit.is_empty());
    let ms = |x| Some(Duration::from_millis(x));
    assert_eq!(o.timings.prepare, ms(10));
    assert_eq!(o.timings.dump, ms(40));
    assert_eq!(o.timings.flush, ms(250));
    assert_eq!(o.timings.commit, ms(20));
    // Every RESUMED was in before the commit: nothing left to wait for.
    assert_eq!(o.timings.finish, ms(0));
    assert_eq!(o.timings.total, Duration::from_millis(320));
    assert_eq!(o.max_downtime, ms(57));
    assert_eq!(h.e.phase(), Phase::Done);

    for ev in [
        Event::Tick,
        Event::CommitSucceeded,
        Event::Lost { node: NodeId(0) },
    ] {
        let (hd, out) = h.ev(ev);
        assert_eq!(hd, Handled::Ignored(Ignored::EpochOver));
        assert!(out.is_empty());
    }
}

#[test]
fn happy_path_stop() {
    let (mut h, _) = H::new(2, Stop);
    h.reach_flushing(Stop);
    h.at(200);
    let out = h.all(flushed);
    assert_eq!(manifest(&out).mode, Stop);
    let (_, out) = h.ev(Event::CommitSucceeded);
    assert_eq!(commands(&out), [Command::Committed { mode: Stop }]);
    assert_eq!(h.e.phase(), Phase::Stopping);
    assert!(!out.iter().any(|a| matches!(a, Action::Done(_))));
    h.at(250);
    let out = h.all(|_| AgentMsg::Stopped {
        downtime: Duration::from_millis(240),
    });
    let o = outcome(&out);
    assert!(o.committed());
    assert_eq!(o.timings.finish, Some(Duration::from_millis(50)));
    assert_eq!(h.e.phase(), Phase::Done);
}

#[test]
fn fail_during_prepare_aborts_before_any_dump() {
    let (mut h, _) = H::new(3, Continue);
    let _ = h.msg(0, AgentMsg::Ready);
    let (_, out) = h.msg(
        2,
        AgentMsg::Failed {
            reason: "cannot freeze".into(),
        },
    );
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Preparing);
    assert!(matches!(reason, AbortReason::AgentFailed { node, .. } if node == "n2"));
    assert!(reason.to_string().contains("cannot freeze"), "{reason}");
    // Stragglers after the abort change nothing.
    let (hd, out) = h.msg(1, AgentMsg::Ready);
    assert_eq!(hd, Handled::Ignored(Ignored::EpochOver));
    assert!(out.is_empty());
}

#[test]
fn fail_during_dump_aborts() {
    let (mut h, _) = H::new(3, Stop);
    h.all(|_| AgentMsg::Ready);
    let _ = h.msg(0, AgentMsg::Dumped(dump("n0", "4.1.1", 1.0)));
    let (_, out) = h.msg(
        1,
        AgentMsg::Failed {
            reason: "criu dump failed".into(),
        },
    );
    let (phase, _) = aborted(&out);
    assert_eq!(phase, Phase::Dumping);
    let o = outcome(&out);
    assert!(o.timings.prepare.is_some() && o.timings.dump.is_some());
    assert!(o.timings.flush.is_none());
}

#[test]
fn lost_agent_aborts() {
    let (mut h, _) = H::new(3, Continue);
    h.reach_flushing(Continue);
    let (_, out) = h.ev(Event::Lost { node: NodeId(1) });
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Flushing);
    assert_eq!(
        *reason,
        AbortReason::AgentLost {
            node: "n1".into(),
            phase: Phase::Flushing
        }
    );
}

#[test]
fn prepare_timeout_names_the_late_nodes() {
    let (mut h, _) = H::new(5, Continue);
    for i in [0, 2, 4] {
        let _ = h.msg(i, AgentMsg::Ready);
    }
    assert_eq!(h.e.next_deadline(), Some(h.t0 + DEADLINES.prepare));
    h.at(999);
    let (_, out) = h.ev(Event::Tick);
    assert!(out.is_empty());
    h.at(1000);
    let (hd, out) = h.ev(Event::Tick);
    assert_eq!(hd, Handled::Applied);
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Preparing);
    match reason {
        AbortReason::Timeout { late, nodes, .. } => {
            assert_eq!(late, &["n1", "n3"]);
            assert_eq!(*nodes, 5);
        }
        r => panic!("{r:?}"),
    }
    let text = reason.to_string();
    assert!(
        text.contains("no READY") && text.contains("2 of 5 nodes: n1, n3"),
        "{text}"
    );
    assert_eq!(h.e.next_deadline(), None);
}

#[test]
fn a_ready_past_the_deadline_does_not_complete_the_barrier() {
    let (mut h, _) = H::new(2, Continue);
    let _ = h.msg(0, AgentMsg::Ready);
    h.at(1500);
    let (hd, out) = h.msg(1, AgentMsg::Ready);
    assert_eq!(hd, Handled::Ignored(Ignored::EpochOver));
    assert!(!commands(&out).contains(&Command::Dump));
    let (_, reason) = aborted(&out);
    assert!(matches!(reason, AbortReason::Timeout { late, .. } if late == &["n1"]));
}

#[test]
fn timeout_lists_at_most_ten_names() {
    let (mut h, _) = H::new(30, Continue);
    h.at(1000);
    let (_, out) = h.ev(Event::Tick);
    let (_, reason) = aborted(&out);
    let text = reason.to_string();
    assert!(
        text.contains("30 of 30 nodes: n0, n1,") && text.ends_with("n9 and 20 more"),
        "{text}"
    );
}

#[test]
fn commit_failed_aborts() {
    let (mut h, _) = H::new(2, Stop);
    h.reach_flushing(Stop);
    let out = h.all(flushed);
    let _ = manifest(&out);
    let (_, out) = h.ev(Event::CommitFailed {
        reason: "ENOSPC".into(),
    });
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Committing);
    assert_eq!(reason.to_string(), "committing the manifest failed: ENOSPC");
}

#[test]
fn commit_timeout_aborts_and_a_late_commit_is_flagged() {
    let (mut h, _) = H::new(2, Continue);
    h.reach_flushing(Continue);
    h.all(|_| AgentMsg::Resumed {
        downtime: Duration::ZERO,
    });
    h.at(100);
    let _ = h.all(flushed);
    h.at(600);
    let (_, out) = h.ev(Event::Tick);
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Committing);
    assert!(reason
        .to_string()
        .contains("manifest commit did not finish"));
    let (hd, out) = h.ev(Event::CommitSucceeded);
    assert_eq!(hd, Handled::Ignored(Ignored::CommitAfterAbort));
    assert!(out.is_empty());
}

#[test]
fn commit_result_past_the_deadline_is_still_taken() {
    let (mut h, _) = H::new(1, Continue);
    h.reach_flushing(Continue);
    let _ = h.msg(
        0,
        AgentMsg::Resumed {
            downtime: Duration::ZERO,
        },
    );
    h.at(100);
    let _ = h.msg(0, flushed(0));
    h.at(10_000);
    let (_, out) = h.ev(Event::CommitSucceeded);
    assert!(outcome(&out).committed());
}

#[test]
fn commit_result_without_a_manifest_is_ignored() {
    let (mut h, _) = H::new(2, Continue);
    for ev in [
        Event::CommitSucceeded,
        Event::CommitFailed { reason: "x".into() },
    ] {
        let (hd, out) = h.ev(ev);
        assert_eq!(hd, Handled::Ignored(Ignored::UnexpectedCommitResult));
        assert!(out.is_empty());
    }
    assert_eq!(h.e.phase(), Phase::Preparing);
}

#[test]
fn duplicates_are_ignored() {
    let (mut h, _) = H::new(3, Continue);
    let _ = h.msg(0, AgentMsg::Ready);
    let (hd, out) = h.msg(0, AgentMsg::Ready);
    assert_eq!(
        hd,
        Handled::Ignored(Ignored::Duplicate {
            node: NodeId(0),
            msg: MsgKind::Ready
        })
    );
    assert!(out.is_empty());
    assert_eq!(h.e.progress().in_phase(AgentPhase::Ready), 1);
    let _ = h.msg(1, AgentMsg::Ready);
    let (_, out) = h.msg(2, AgentMsg::Ready);
    assert_eq!(commands(&out), [Command::Dump]);
    // A late duplicate READY while dumping, a second DUMPED.
    let (hd, _) = h.msg(2, AgentMsg::Ready);
    assert!(matches!(hd, Handled::Ignored(Ignored::Duplicate { .. })));
    let _ = h.msg(1, AgentMsg::Dumped(dump("n1", "4.1.1", 1.0)));
    let (hd, _) = h.msg(1, AgentMsg::Dumped(dump("n1", "other", 1.0)));
    assert!(matches!(
        hd,
        Handled::Ignored(Ignored::Duplicate {
            msg: MsgKind::Dumped,
            ..
        })
    ));
    assert_eq!(h.e.phase(), Phase::Dumping);
}

#[test]
fn other_epochs_and_unknown_nodes_are_ignored() {
    let (mut h, _) = H::new(2, Continue);
    let (hd, out) = h.ev(Event::Agent {
        node: NodeId(0),
        epoch: EPOCH - 1,
        msg: AgentMsg::Failed {
            reason: "stale".into(),
        },
    });
    assert_eq!(
        hd,
        Handled::Ignored(Ignored::WrongEpoch {
            node: NodeId(0),
            epoch: EPOCH - 1
        })
    );
    assert!(out.is_empty());
    for ev in [
        Event::Agent {
            node: NodeId(2),
            epoch: EPOCH,
            msg: AgentMsg::Ready,
        },
        Event::Lost {
            node: NodeId(u32::MAX),
        },
    ] {
        let (hd, out) = h.ev(ev);
        assert!(matches!(hd, Handled::Ignored(Ignored::UnknownNode { .. })));
        assert!(out.is_empty());
    }
    assert_eq!(h.e.phase(), Phase::Preparing);
}

#[test]
fn dumped_while_preparing_is_a_protocol_violation() {
    let (mut h, _) = H::new(2, Continue);
    let _ = h.msg(0, AgentMsg::Ready);
    let (_, out) = h.msg(0, AgentMsg::Dumped(dump("n0", "4.1.1", 1.0)));
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Preparing);
    assert!(matches!(
        reason,
        AbortReason::ProtocolViolation {
            msg: MsgKind::Dumped,
            ..
        }
    ));
    let text = reason.to_string();
    assert!(
        text.contains("node n0 sent DUMPED while the epoch was preparing"),
        "{text}"
    );
}

#[test]
fn order_within_the_commit_phase_is_enforced() {
    // Stop mode: a tree must stay frozen until the commit.
    let (mut h, _) = H::new(2, Stop);
    h.reach_flushing(Stop);
    let (_, out) = h.msg(
        0,
        AgentMsg::Resumed {
            downtime: Duration::ZERO,
        },
    );
    assert!(matches!(
        aborted(&out).1,
        AbortReason::ProtocolViolation {
            msg: MsgKind::Resumed,
            ..
        }
    ));
    // Stop mode: STOPPED before the commit.
    let (mut h, _) = H::new(2, Stop);
    h.reach_flushing(Stop);
    let _ = h.msg(0, flushed(0));
    let (_, out) = h.msg(
        0,
        AgentMsg::Stopped {
            downtime: Duration::ZERO,
        },
    );
    assert!(matches!(
        aborted(&out).1,
        AbortReason::ProtocolViolation {
            msg: MsgKind::Stopped,
            ..
        }
    ));
    // FLUSHED before the node's DUMPED.
    let (mut h, _) = H::new(2, Continue);
    h.all(|_| AgentMsg::Ready);
    let (_, out) = h.msg(1, flushed(1));
    assert!(matches!(
        aborted(&out).1,
        AbortReason::ProtocolViolation {
            msg: MsgKind::Flushed,
            ..
        }
    ));
    // RESUMED before COMMIT went out (the node had DUMPED).
    let (mut h, _) = H::new(2, Continue);
    h.all(|_| AgentMsg::Ready);
    let _ = h.msg(0, AgentMsg::Dumped(dump("n0", "4.1.1", 1.0)));
    let (_, out) = h.msg(
        0,
        AgentMsg::Resumed {
            downtime: Duration::ZERO,
        },
    );
    assert!(matches!(
        aborted(&out).1,
        AbortReason::ProtocolViolation {
            msg: MsgKind::Resumed,
            phase: Phase::Dumping,
            ..
        }
    ));
}

#[test]
fn flushed_before_commit_and_resumed_after_the_manifest() {
    let (mut h, _) = H::new(2, Continue);
    h.at(10);
    h.all(|_| AgentMsg::Ready);
    h.at(20);
    // n0 dumps and flushes before n1 has dumped: no COMMIT, no manifest.
    let (_, out) = h.msg(0, AgentMsg::Dumped(dump("n0", "4.1.1", 1.0)));
    assert!(out.is_empty(), "{out:?}");
    let (hd, out) = h.msg(0, flushed(0));
    assert_eq!(hd, Handled::Applied);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.e.phase(), Phase::Dumping);
    // A duplicate FLUSHED is ignored.
    let (hd, _) = h.msg(0, flushed(0));
    assert_eq!(
        hd,
        Handled::Ignored(Ignored::Duplicate {
            node: NodeId(0),
            msg: MsgKind::Flushed
        })
    );
    // The last DUMPED: COMMIT, and no manifest while n1 is not flushed.
    h.at(30);
    let (_, out) = h.msg(1, AgentMsg::Dumped(dump("n1", "4.1.1", 1.0)));
    assert_eq!(commands(&out), [Command::Commit { mode: Continue }]);
    assert!(!out.iter().any(|a| matches!(a, Action::WriteManifest(_))));
    // n0 resumes while n1 still flushes.
    h.at(35);
    let (hd, out) = h.msg(
        0,
        AgentMsg::Resumed {
            downtime: Duration::from_millis(25),
        },
    );
    assert_eq!(hd, Handled::Applied);
    assert!(out.is_empty());
    h.at(60);
    let (_, out) = h.msg(1, flushed(1));
    let m = manifest(&out);
    m.validate().unwrap();
    assert_eq!(m.nodes[1].files, digests("n1"));
    assert_eq!(h.e.phase(), Phase::Committing);
    // Committed before n1's RESUMED: the epoch waits for it.
    h.at(70);
    let (_, out) = h.ev(Event::CommitSucceeded);
    assert_eq!(commands(&out), [Command::Committed { mode: Continue }]);
    assert!(!out.iter().any(|a| matches!(a, Action::Done(_))));
    assert_eq!(h.e.phase(), Phase::Resuming);
    assert!(h.e.phase().is_committed());
    // A cancel cannot undo it.
    let (hd, _) = h.ev(Event::Cancel {
        reason: "late".into(),
    });
    assert_eq!(hd, Handled::Ignored(Ignored::CancelAfterCommit));
    h.at(80);
    let (_, out) = h.msg(
        1,
        AgentMsg::Resumed {
            downtime: Duration::from_millis(50),
        },
    );
    let o = outcome(&out);
    assert!(o.committed());
    assert_eq!(o.max_downtime, Some(Duration::from_millis(50)));
    assert_eq!(o.timings.finish, Some(Duration::from_millis(10)));
    assert_eq!(
        o.timings.total - o.timings.finish.unwrap(),
        Duration::from_millis(70)
    );
}

#[test]
fn every_flushed_before_the_last_dumped_commits_in_one_step() {
    for mode in [Continue, Stop] {
        let (mut h, _) = H::new(3, mode);
        h.all(|_| AgentMsg::Ready);
        for i in 0..2 {
            let _ = h.msg(i, AgentMsg::Dumped(dump(&node_name(i), "4.1.1", 1.0)));
            let _ = h.msg(i, flushed(i));
        }
        let (_, out) = h.msg(2, AgentMsg::Dumped(dump("n2", "4.1.1", 1.0)));
        assert_eq!(commands(&out), [Command::Commit { mode }]);
        assert!(!out.iter().any(|a| matches!(a, Action::WriteManifest(_))));
        let (_, out) = h.msg(2, flushed(2));
        manifest(&out).validate().unwrap();
    }
}

#[test]
fn a_silent_resume_after_the_commit_is_a_problem_not_an_abort() {
    let (mut h, _) = H::new(2, Continue);
    h.reach_flushing(Continue);
    h.at(100);
    let _ = h.all(flushed);
    let _ = h.msg(
        0,
        AgentMsg::Resumed {
            downtime: Duration::from_millis(5),
        },
    );
    h.at(110);
    let (_, out) = h.ev(Event::CommitSucceeded);
    assert!(!out.iter().any(|a| matches!(a, Action::Done(_))));
    // Past the finish deadline without n1's RESUMED.
    h.at(110 + DEADLINES.finish.as_millis() as u64);
    let (_, out) = h.ev(Event::Tick);
    let o = outcome(&out);
    assert!(o.committed());
    assert_eq!(
        o.after_commit,
        [PostCommitProblem::Silent { node: "n1".into() }]
    );
    assert!(!commands(&out)
        .iter()
        .any(|c| matches!(c, Command::Abort { .. })));
}

#[test]
fn flushed_digests_that_miss_a_file_abort() {
    let (mut h, _) = H::new(2, Stop);
    h.reach_flushing(Stop);
    let mut files = digests("n0");
    files.pop();
    let (_, out) = h.msg(0, AgentMsg::Flushed { files });
    let (phase, reason) = aborted(&out);
    assert_eq!(phase, Phase::Flushing);
    assert!(matches!(reason, AbortReason::BadDigests { node, .. } if node == "n0"));
    assert!(commands(&out)
        .iter()
        .any(|c| matches!(c, Command::Abort { .. })));
}

#[test]
fn wrong_image_or_mixed_criu_aborts() {
    let (mut h, _) = H::new(2, Continue);
    h.all(|_| AgentMsg::Ready);
    let (_, out) = h.msg(0, AgentMsg::Dumped(dump("n1", "4.1.1", 1.0)));
    assert!(
        matches!(aborted(&out).1, AbortReason::WrongImage { node, claimed } if node == "n0" && claimed == "n1")
    );

    let (mut h, _) = H::new(2, Continue);
    h.all(|_| AgentMsg::Ready);
    let _ = h.msg(0, AgentMsg::Dumped(dump("n0", "4.1.1", 1.0)));
    let (_, out) = h.msg(1, AgentMsg::Dumped(dump("n1", "4.2", 1.0)));
    assert!(matches!(aborted(&out).1, AbortReason::MixedCriu { node, .. } if node == "n1"));
}

#[test]
fn failure_after_commit_does_not_abort() {
    let (mut h, _) = H::new(4, Stop);
    h.reach_flushing(Stop);
    let _ = h.all(flushed);
    let _ = h.ev(Event::CommitSucceeded);
    assert!(h.e.phase().is_committed());
    let (hd, out) = h.msg(
        1,
        AgentMsg::Failed {
            reason: "kill failed".into(),
        },
    );
    assert_eq!(hd, Handled::Applied);
    assert!(out.is_empty(), "{out:?}");
    let (hd, _) = h.ev(Event::Cancel {
        reason: "shutdown".into(),
    });
    assert_eq!(hd, Handled::Ignored(Ignored::CancelAfterCommit));
    let _ = h.msg(
        0,
        AgentMsg::Stopped {
            downtime: Duration::ZERO,
        },
    );
    // A finished agent closing its connection is harmless.
    let (_, out) = h.ev(Event::Lost { node: NodeId(0) });
    assert!(out.is_empty());
    let (_, out) = h.msg(
        3,
        AgentMsg::Resumed {
            downtime: Duration::ZERO,
        },
    );
    assert!(out.is_empty());
    let (_, out) = h.ev(Event::Lost { node: NodeId(2) });
    assert!(commands(&out).is_empty(), "no ABORT after the commit");
    let o = outcome(&out);
    assert!(o.committed());
    assert_eq!(
        o.after_commit,
        [
            PostCommitProblem::Failed {
                node: "n1".into(),
                reason: "kill failed".into()
            },
            PostCommitProblem::Unexpected {
                node: "n3".into(),
                msg: MsgKind::Resumed
            },
            PostCommitProblem::Lost { node: "n2".into() },
        ]
    );
}

#[test]
fn silent_nodes_after_commit_are_listed_at_the_finish_deadline() {
    let (mut h, _) = H::new(3, Stop);
    h.reach_flushing(Stop);
    h.at(100);
    let _ = h.all(flushed);
    let _ = h.ev(Event::CommitSucceeded);
    let _ = h.msg(
        1,
        AgentMsg::Stopped {
            downtime: Duration::ZERO,
        },
    );
    h.at(100 + 400);
    let (_, out) = h.ev(Event::Tick);
    assert!(commands(&out).is_empty());
    let o = outcome(&out);
    assert!(o.committed());
    assert_eq!(
        o.after_commit,
        [
            PostCommitProblem::Silent { node: "n0".into() },
            PostCommitProblem::Silent { node: "n2".into() }
        ]
    );
}

#[test]
fn cancel_before_commit_aborts() {
    let (mut h, _) = H::new(2, Continue);
    let (_, out) = h.ev(Event::Cancel {
        reason: "coordinator shutting down".into(),
    });
    assert!(matches!(aborted(&out).1, AbortReason::Cancelled { .. }));
}

#[test]
fn phase_transitions_are_exactly_the_documented_ones() {
    use Phase::*;
    let all = [
        Preparing, Dumping, Flushing, Committing, Stopping, Done, Aborted,
    ];
    let allowed = [
        (Preparing, Dumping),
        (Dumping, Flushing),
        (Flushing, Committing),
        (Committing, Stopping),
        (Committing, Done),
        (Stopping, Done),
        (Preparing, Aborted),
        (Dumping, Aborted),
        (Flushing, Aborted),
        (Committing, Aborted),
    ];
    for a in all {
        for b in all {
            assert_eq!(a.can_go_to(b), allowed.contains(&(a, b)), "{a} -> {b}");
        }
    }
    // Nothing leaves a committed phase for Aborted.
    for p in all.into_iter().filter(|p| p.is_committed()) {
        assert!(!p.can_go_to(Aborted));
    }
}

#[test]
fn bad_specs_and_rosters_are_refused() {
    let roster = Arc::new(Roster::new(["a", "b"]).unwrap());
    assert_eq!(roster.id("b"), Some(NodeId(1)));
    assert_eq!(roster.name(NodeId(0)), Some("a"));
    assert_eq!(roster.id("c"), None);
    let begin = |s: EpochSpec| Epoch::begin(s, roster.clone(), Instant::now(), &mut Vec::new());
    let mut s = spec(Continue);
    s.epoch = 0;
    assert!(matches!(begin(s), Err(EpochError::ZeroEpoch { .. })));
    let mut s = spec(Continue);
    s.deadlines.flush = Duration::ZERO;
    let err = begin(s).unwrap_err();
    assert!(err.to_string().contains("flush deadline is zero"), "{err}");
    let mut s = spec(Continue);
    s.job = "../x".into();
    assert!(matches!(begin(s), Err(EpochError::InvalidJob { .. })));

    assert!(matches!(
        Roster::new(Vec::<String>::new()),
        Err(RosterError::Empty)
    ));
    assert!(matches!(
        Roster::new(["a", "a"]),
        Err(RosterError::Duplicate { .. })
    ));
    assert!(matches!(
        Roster::new(["a/b"]),
        Err(RosterError::BadName { .. })
    ));
}
