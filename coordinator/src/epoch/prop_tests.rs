//! Random event orders against the epoch's safety invariants.
//!
//! Simulated agents answer the commands they have seen, in random order,
//! interleaved with duplicates, stragglers of other epochs, unknown nodes
//! and clock ticks; "faulty" runs also inject FAIL, lost agents, messages
//! out of order, failed commits, cancels and large clock jumps. After every
//! step the actions are checked against what the agents really sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::manifest::CheckpointMode;

use super::tests::{dump, flushed, node_name, spec, EPOCH};
use super::*;

/// splitmix64: small, deterministic, good enough to shuffle events.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the agents really did, and what the epoch broadcast so far.
#[derive(Default)]
struct World {
    n: usize,
    /// Per node: sent READY after PREPARE, DUMPED after DUMP, FLUSHED any
    /// time after its DUMPED, RESUMED after COMMIT, STOPPED after COMMITTED
    /// (right epoch).
    ready: Vec<bool>,
    dumped: Vec<bool>,
    resumed: Vec<bool>,
    flushed: Vec<bool>,
    stopped: Vec<bool>,
    dump_sent: bool,
    commit_sent: bool,
    manifest_written: bool,
    commit_result_given: bool,
    committed_sent: bool,
    abort_sent: bool,
    done: Option<Box<Outcome>>,
}

fn all(v: &[bool]) -> bool {
    v.iter().all(|b| *b)
}

const MSG_KINDS: [MsgKind; 6] = [
    MsgKind::Ready,
    MsgKind::Failed,
    MsgKind::Dumped,
    MsgKind::Resumed,
    MsgKind::Flushed,
    MsgKind::Stopped,
];

fn make(kind: MsgKind, node: usize, rng: &mut Rng) -> AgentMsg {
    let d = Duration::from_millis(rng.below(100));
    match kind {
        MsgKind::Ready => AgentMsg::Ready,
        MsgKind::Failed => AgentMsg::Failed {
            reason: "injected".into(),
        },
        MsgKind::Dumped => AgentMsg::Dumped(dump(&node_name(node), "4.1.1", 1.0)),
        MsgKind::Resumed => AgentMsg::Resumed { downtime: d },
        MsgKind::Flushed => flushed(node),
        MsgKind::Stopped => AgentMsg::Stopped { downtime: d },
    }
}

impl World {
    /// A next message node `i` could send, given the commands it has seen:
    /// after DUMPED, FLUSHED and RESUMED come in either order.
    fn next_for(&self, i: usize, mode: CheckpointMode, rng: &mut Rng) -> Option<MsgKind> {
        let cont = mode == CheckpointMode::Continue;
        if !self.ready[i] {
            return Some(MsgKind::Ready);
        }
        if self.dump_sent && !self.dumped[i] {
            return Some(MsgKind::Dumped);
        }
        let flush = self.dumped[i] && !self.flushed[i];
        let resume = self.commit_sent && cont && !self.resumed[i];
        match (flush, resume) {
            (true, true) if rng.chance(50) => Some(MsgKind::Flushed),
            (_, true) => Some(MsgKind::Resumed),
            (true, false) => Some(MsgKind::Flushed),
            (false, false) if self.committed_sent && !cont && !self.stopped[i] => {
                Some(MsgKind::Stopped)
            }
            (false, false) => None,
        }
    }

    /// Records a right-epoch message as sent "in order" if the command that
    /// asks for it had gone out.
    fn record(&mut self, i: usize, kind: MsgKind, mode: CheckpointMode) {
        let cont = mode == CheckpointMode::Continue;
        match kind {
            MsgKind::Ready => self.ready[i] = true,
            MsgKind::Dumped if self.dump_sent => self.dumped[i] = true,
            MsgKind::Resumed if self.commit_sent && cont => self.resumed[i] = true,
            MsgKind::Flushed if self.dumped[i] => self.flushed[i] = true,
            MsgKind::Stopped if self.committed_sent => self.stopped[i] = true,
            _ => {}
        }
    }

    /// Checks one step's actions against the invariants and updates the
    /// world.
    fn observe(&mut self, actions: &[Action], commit_succeeded_now: bool, ctx: &str) {
        if !actions.is_empty() {
            assert!(
                self.done.is_none(),
                "{ctx}: actions after Done: {actions:?}"
            );
        }
        for (k, a) in actions.iter().enumerate() {
            match a {
                Action::Broadcast { epoch, command } => {
                    assert_eq!(*epoch, EPOCH, "{ctx}");
                    match command {
                        Command::Prepare => panic!("{ctx}: PREPARE after begin"),
                        Command::Dump => {
                            assert!(!self.dump_sent, "{ctx}: DUMP twice");
                            assert!(all(&self.ready), "{ctx}: DUMP before every READY");
                            self.dump_sent = true;
                        }
                        Command::Commit { .. } => {
                            assert!(!self.commit_sent, "{ctx}: COMMIT twice");
                            assert!(self.dump_sent && all(&self.dumped), "{ctx}: COMMIT early");
                            self.commit_sent = true;
                        }
                        Command::Committed { .. } => {
                            assert!(!self.committed_sent, "{ctx}: COMMITTED twice");
                            assert!(
                                self.manifest_written && commit_succeeded_now,
                                "{ctx}: COMMITTED without a successful commit"
                            );
                            assert!(!self.abort_sent, "{ctx}: COMMITTED after ABORT");
                            self.committed_sent = true;
                        }
                        Command::Abort { .. } => {
                            assert!(!self.abort_sent, "{ctx}: ABORT twice");
                            assert!(!self.committed_sent, "{ctx}: ABORT after COMMITTED");
                            self.abort_sent = true;
                        }
                    }
                }
                Action::WriteManifest(m) => {
                    assert!(!self.manifest_written, "{ctx}: manifest twice");
                    assert!(
                        all(&self.dumped) && all(&self.flushed),
                        "{ctx}: manifest before every DUMPED and FLUSHED"
                    );
                    assert!(self.commit_sent, "{ctx}: manifest before COMMIT");
                    // Digests come from FLUSHED only.
                    for (i, node) in m.nodes.iter().enumerate() {
                        assert_eq!(
                            node.files,
                            super::tests::digests(&node_name(i)),
                            "{ctx}: digests not from FLUSHED"
                        );
                    }
                    assert_eq!(m.nodes.len(), self.n, "{ctx}");
                    for (i, node) in m.nodes.iter().enumerate() {
                        assert_eq!(node.node, node_name(i), "{ctx}");
                    }
                    m.validate().unwrap();
                    self.manifest_written = true;
                }
                Action::Done(o) => {
                    assert_eq!(k + 1, actions.len(), "{ctx}: Done is not last");
                    // A committed continue-mode epoch ends once every tree
                    // resumed (or the finish deadline passed, in faulty runs).
                    if o.committed() && o.mode == CheckpointMode::Continue && all(&self.resumed) {
                        assert!(o.max_downtime.is_some(), "{ctx}: no downtime: {o:?}");
                    }
                    assert_eq!(o.committed(), self.committed_sent, "{ctx}: verdict {o:?}");
                    assert_eq!(o.committed(), !self.abort_sent, "{ctx}: verdict {o:?}");
                    self.done = Some(o.clone());
                }
            }
        }
    }
}

/// One random run; returns whether it committed.
fn run(seed: u64, faulty: bool) -> bool {
    let mut rng = Rng::new(seed);
    let n = 1 + rng.below(8) as usize;
    let mode = if rng.chance(50) {
        CheckpointMode::Continue
    } else {
        CheckpointMode::Stop
    };
    let roster = Arc::new(Roster::new((0..n).map(node_name)).unwrap());
    let t0 = Instant::now();
    let mut now = t0;
    let mut out = Vec::new();
    let mut e = Epoch::begin(spec(mode), roster, now, &mut out).unwrap();
    assert!(matches!(
        out.as_slice(),
        [Action::Broadcast {
            command: Command::Prepare,
            ..
        }]
    ));
    let mut w = World {
        n,
        ready: vec![false; n],
        dumped: vec![false; n],
        resumed: vec![false; n],
        flushed: vec![false; n],
        stopped: vec![false; n],
        ..World::default()
    };
    for step in 0..5000 {
        if w.done.is_some() && rng.chance(80) {
            break;
        }
        let ctx = format!("seed {seed} step {step} (n={n}, {mode:?}, faulty={faulty})");
        // Clean runs stay far inside the deadlines (1 s and more).
        let jump = if faulty && rng.chance(3) { 2000 } else { 4 };
        now += Duration::from_millis(rng.below(jump));
        let i = rng.below(n as u64) as usize;
        let roll = rng.below(100);
        let manifest_outstanding = w.manifest_written && !w.commit_result_given;
        let mut commit_ok = false;
        let event = if manifest_outstanding && roll < 30 {
            w.commit_result_given = true;
            if faulty && rng.chance(20) {
                Event::CommitFailed {
                    reason: "injected".into(),
                }
            } else {
                commit_ok = true;
                Event::CommitSucceeded
            }
        } else if roll < 70 {
            // The in-order next message of some agent that has one.
            let start = i;
            let mut pick = None;
            for k in 0..n {
                let j = (start + k) % n;
                if let Some(kind) = w.next_for(j, mode, &mut rng) {
                    pick = Some((j, kind));
                    break;
                }
            }
            match pick {
                Some((j, kind)) => {
                    w.record(j, kind, mode);
                    Event::Agent {
                        node: NodeId(j as u32),
                        epoch: EPOCH,
                        msg: make(kind, j, &mut rng),
                    }
                }
                None => Event::Tick,
            }
        } else if roll < 78 {
            // A duplicate of something this node already sent.
            let sent: Vec<MsgKind> = [
                (w.ready[i], MsgKind::Ready),
                (w.dumped[i], MsgKind::Dumped),
                (w.resumed[i], MsgKind::Resumed),
                (w.flushed[i], MsgKind::Flushed),
            ]
            .into_iter()
            .filter_map(|(s, k)| s.then_some(k))
            .collect();
            if sent.is_empty() {
                Event::Tick
            } else {
                let kind = sent[rng.below(sent.len() as u64) as usize];
                Event::Agent {
                    node: NodeId(i as u32),
                    epoch: EPOCH,
                    msg: make(kind, i, &mut rng),
                }
            }
        } else if roll < 84 {
            // A straggler of another epoch or an unknown node: any message.
            let kind = MSG_KINDS[rng.below(6) as usize];
            if rng.chance(50) {
                Event::Agent {
                    node: NodeId(i as u32),
                    epoch: [0, EPOCH - 1, EPOCH + 1][rng.below(3) as usize],
                    msg: make(kind, i, &mut rng),
                }
            } else {
                Event::Agent {
                    node: NodeId((n + rng.below(3) as usize) as u32),
                    epoch: EPOCH,
                    msg: make(kind, i, &mut rng),
                }
            }
        } else if !faulty || roll < 90 {
            Event::Tick
        } else {
            match rng.below(6) {
                0 => Event::Agent {
                    node: NodeId(i as u32),
                    epoch: EPOCH,
                    msg: make(MsgKind::Failed, i, &mut rng),
                },
                1 => Event::Lost {
                    node: NodeId(i as u32),
                },
                2 => Event::Cancel {
                    reason: "injected".into(),
                },
                3 => {
                    // A caller bug: a commit result at a random time.
                    commit_ok = manifest_outstanding;
                    w.commit_result_given |= manifest_outstanding;
                    Event::CommitSucceeded
                }
                _ => {
                    // Any message, in or (mostly) out of order.
                    let kind = MSG_KINDS[rng.below(6) as usize];
                    w.record(i, kind, mode);
                    Event::Agent {
                        node: NodeId(i as u32),
                        epoch: EPOCH,
                        msg: make(kind, i, &mut rng),
                    }
                }
            }
        };
        let before = e.phase();
        let desc = format!("{event:?}");
        let ctx = format!("{ctx} {desc:.80}");
        out.clear();
        let handled = e.handle(now, event, &mut out);
        let after = e.phase();
        assert!(
            before == after || before.can_go_to(after),
            "{ctx}: {before} -> {after}"
        );
        if let Handled::Ignored(_) = handled {
            // An ignored event may still come with a deadline's actions,
            // but never with progress of its own.
            assert!(before == after || after.is_final(), "{ctx}: {handled:?}");
        }
        let p = e.progress();
        assert_eq!(p.agents.iter().sum::<u32>(), n as u32, "{ctx}");
        w.observe(&out, commit_ok, &ctx);
        assert_eq!(w.done.is_some(), after.is_final(), "{ctx}");
    }
    let Some(o) = &w.done else {
        panic!("seed {seed}: epoch never ended (phase {})", e.phase());
    };
    assert!(!(w.committed_sent && w.abort_sent), "seed {seed}");
    if !faulty {
        assert!(o.committed(), "seed {seed}: clean run aborted: {o:?}");
        if mode == CheckpointMode::Continue {
            assert!(all(&w.resumed), "seed {seed}: done before every RESUMED");
            assert!(o.max_downtime.is_some(), "seed {seed}");
        } else {
            assert!(all(&w.stopped), "seed {seed}: done before every STOPPED");
        }
    }
    o.committed()
}

#[test]
fn random_clean_runs_always_commit() {
    for seed in 0..3000 {
        assert!(run(seed, false));
    }
}

#[test]
fn random_faulty_runs_keep_the_invariants() {
    let mut committed = 0;
    let runs = 6000;
    for seed in 0..runs {
        committed += u32::from(run(0x5eed_0000 + seed, true));
    }
    // Both outcomes must be exercised for the test to mean anything.
    assert!(
        committed > runs as u32 / 20 && committed < runs as u32 * 19 / 20,
        "{committed} of {runs} faulty runs committed"
    );
}
