//! The network core over real loopback TCP, with simulated agents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::async_framing::{read_frame, write_frame};
use ckpt_protocol::auth::{handshake_client, ClientConfig};
use ckpt_protocol::cluster::pb;
use ckpt_protocol::manifest::{CheckpointMode, Key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sim::{Fault, SimAgent, SimConfig, SimStats, Step};
use super::*;
use crate::epoch::{AbortReason, Phase, Verdict};

use CheckpointMode::{Continue, Stop};

const DEADLINES: Deadlines = Deadlines {
    prepare: Duration::from_secs(3),
    dump: Duration::from_secs(3),
    flush: Duration::from_secs(3),
    commit: Duration::from_secs(3),
    finish: Duration::from_secs(3),
};

fn key() -> Key {
    Key::from_bytes([7; 32])
}

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        name: "coord-test".into(),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_misses: 3,
        handshake_timeout: Duration::from_secs(2),
        ..CoordinatorConfig::default()
    }
}

async fn start() -> (Coordinator, Arc<MemoryWriter>) {
    start_with(config()).await
}

async fn start_with(cfg: CoordinatorConfig) -> (Coordinator, Arc<MemoryWriter>) {
    let listener = bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let writer = Arc::new(MemoryWriter::new());
    let c = Coordinator::start(listener, key(), cfg, writer.clone()).unwrap();
    (c, writer)
}

/// Hand-driven agents send no heartbeats: give them time.
fn patient() -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_misses: 100,
        ..config()
    }
}

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

/// Polls until the coordinator has exactly `want` connected.
async fn wait_nodes(c: &Coordinator, want: &[String]) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<String> = c.nodes().await.into_iter().map(|n| n.node).collect();
        if now == want {
            return;
        }
        assert!(Instant::now() < until, "connected {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three agents n1..n3; `faults` applies to the named one.
async fn cluster(c: &Coordinator, fault: Option<(&str, Step, Fault)>) -> Vec<SimAgent> {
    let mut agents = Vec::new();
    for node in names(3) {
        let mut cfg = SimConfig::new(node.clone(), key());
        if let Some((name, step, f)) = &fault {
            if *name == node {
                cfg = cfg.with_fault(*step, f.clone());
            }
        }
        agents.push(SimAgent::connect(c.local_addr(), cfg).await.unwrap());
    }
    wait_nodes(c, &names(3)).await;
    agents
}

fn count(a: &SimAgent, f: fn(&SimStats) -> &std::sync::atomic::AtomicU32) -> u32 {
    SimStats::get(f(&a.stats))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn aborted(o: &Outcome) -> (Phase, &AbortReason) {
    match &o.verdict {
        Verdict::Aborted { phase, reason } => (*phase, reason),
        Verdict::Committed => panic!("epoch {} committed, expected an abort", o.epoch),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_commit_in_continue_mode_twice() {
    let (c, writer) = start().await;
    let agents = cluster(&c, None).await;
    for epoch in [1, 2] {
        let o = c
            .checkpoint("job-1", epoch, Continue, names(3), DEADLINES)
            .await
            .unwrap();
        assert!(o.committed(), "{:?}", o.verdict);
        assert!(o.after_commit.is_empty(), "{:?}", o.after_commit);
        assert!(o.max_downtime.is_some());
        assert!(o.timings.prepare.is_some() && o.timings.flush.is_some());
    }
    let committed = writer.committed();
    assert_eq!(committed.len(), 2);
    assert_eq!(committed[1].epoch, 2);
    assert_eq!(committed[1].nodes, names(3));
    assert_eq!(committed[1].files, 6);
    // EPOCH_COMMITTED is broadcast after the outcome; give it a moment.
    wait_until("EPOCH_COMMITTED everywhere", || {
        agents.iter().all(|a| count(a, |s| &s.committed) == 2)
    })
    .await;
    for a in &agents {
        assert_eq!(count(a, |s| &s.prepares), 2);
        assert_eq!(count(a, |s| &s.dumps), 2);
        assert_eq!(count(a, |s| &s.commits), 2);
        assert_eq!(count(a, |s| &s.aborts), 0);
    }
    // Epoch numbers must grow.
    let err = c
        .checkpoint("job-1", 2, Continue, names(3), DEADLINES)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::StaleEpoch { last: 2, .. }),
        "{err}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_commit_in_stop_mode() {
    let (c, writer) = start().await;
    let agents = cluster(&c, None).await;
    let o = c
        .checkpoint("job-1", 1, Stop, names(3), DEADLINES)
        .await
        .unwrap();
    assert!(o.committed(), "{:?}", o.verdict);
    // Every agent confirmed STOPPED before the outcome (no Silent problem).
    assert!(o.after_commit.is_empty(), "{:?}", o.after_commit);
    assert!(o.timings.finish.is_some());
    assert_eq!(writer.committed().len(), 1);
    for a in &agents {
        assert_eq!(count(a, |s| &s.committed), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_at_prepare_aborts_naming_the_node() {
    let (c, writer) = start().await;
    let fault = Fault::Fail("cannot freeze: cgroup gone".into());
    let agents = cluster(&c, Some(("n2", Step::Prepare, fault))).await;
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    let (phase, reason) = aborted(&o);
    assert_eq!(phase, Phase::Preparing);
    assert!(
        matches!(reason, AbortReason::AgentFailed { node, .. } if node == "n2"),
        "{reason}"
    );
    let text = reason.to_string();
    assert!(
        text.contains("n2") && text.contains("cgroup gone"),
        "{text}"
    );
    assert!(writer.committed().is_empty());
    wait_until("ABORT everywhere", || {
        agents.iter().all(|a| count(a, |s| &s.aborts) == 1)
    })
    .await;
    // Nobody dumped.
    assert!(agents.iter().all(|a| count(a, |s| &s.dumps) == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_dump_aborts_as_lost() {
    let (c, writer) = start().await;
    let agents = cluster(&c, Some(("n3", Step::Dump, Fault::Drop))).await;
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    let (phase, reason) = aborted(&o);
    assert_eq!(phase, Phase::Dumping);
    assert!(
        matches!(reason, AbortReason::AgentLost { node, phase: Phase::Dumping } if node == "n3"),
        "{reason}"
    );
    assert!(writer.committed().is_empty());
    wait_nodes(&c, &names(2)).await;
    wait_until("ABORT to the others", || {
        agents[..2].iter().all(|a| count(a, |s| &s.aborts) == 1)
    })
    .await;
    // The next epoch without n3 succeeds.
    let o = c
        .checkpoint("job-1", 2, Continue, names(2), DEADLINES)
        .await
        .unwrap();
    assert!(o.committed(), "{:?}", o.verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_aborts_before_the_manifest() {
    for mode in [Continue, Stop] {
        let (c, writer) = start().await;
        let agents = cluster(
            &c,
            Some(("n2", Step::Flush, Fault::Fail("disk full".into()))),
        )
        .await;
        let o = c
            .checkpoint("job-1", 1, mode, names(3), DEADLINES)
            .await
            .unwrap();
        let (phase, reason) = aborted(&o);
        // n2's DUMPED went out first; whether the others' DUMPED were in
        // decides the phase.
        assert!(matches!(phase, Phase::Dumping | Phase::Flushing), "{phase}");
        assert!(
            matches!(reason, AbortReason::AgentFailed { node, .. } if node == "n2"),
            "{reason}"
        );
        assert!(reason.to_string().contains("disk full"), "{reason}");
        assert!(writer.committed().is_empty());
        wait_until("ABORT to every agent", || {
            agents.iter().all(|a| count(a, |s| &s.aborts) == 1)
        })
        .await;
        assert!(agents.iter().all(|a| count(a, |s| &s.committed) == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_times_out_by_name() {
    let (c, _writer) = start().await;
    let agents = cluster(&c, Some(("n1", Step::Prepare, Fault::Silent))).await;
    let deadlines = Deadlines {
        prepare: Duration::from_millis(400),
        ..DEADLINES
    };
    let t0 = Instant::now();
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), deadlines)
        .await
        .unwrap();
    let waited = t0.elapsed();
    let (phase, reason) = aborted(&o);
    assert_eq!(phase, Phase::Preparing);
    match reason {
        AbortReason::Timeout { late, nodes, .. } => {
            assert_eq!(late, &["n1".to_owned()]);
            assert_eq!(*nodes, 3);
        }
        other => panic!("{other}"),
    }
    assert!(reason.to_string().contains("n1"), "{reason}");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // Heartbeats kept it connected: a deadline caught it, not liveness.
    wait_nodes(&c, &names(3)).await;
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_heartbeats_is_lost_after_the_misses() {
    let (c, _writer) = start().await;
    let _agents = cluster(&c, Some(("n2", Step::Prepare, Fault::Freeze))).await;
    let deadlines = Deadlines {
        prepare: Duration::from_secs(30),
        ..DEADLINES
    };
    let t0 = Instant::now();
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), deadlines)
        .await
        .unwrap();
    let (_, reason) = aborted(&o);
    assert!(
        matches!(reason, AbortReason::AgentLost { node, .. } if node == "n2"),
        "{reason}"
    );
    // 3 missed 100 ms intervals, far before the 30 s deadline.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    wait_nodes(&c, &["n1".to_owned(), "n3".to_owned()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_agent_is_refused_logged_and_never_in_an_epoch() {
    let (c, _writer) = start().await;
    let mut agents = cluster(&c, None).await;
    let bad = SimConfig::new("intruder", Key::from_bytes([8; 32]));
    let err = SimAgent::connect(c.local_addr(), bad).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    // The agent learns of the refusal from the wire before the coordinator's
    // session task has recorded it: wait for the record (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut refusals = c.refusals().await;
    while refusals.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        refusals = c.refusals().await;
    }
    assert_eq!(refusals.len(), 1);
    assert!(
        refusals[0].reason.contains("intruder") && refusals[0].reason.contains("cluster key"),
        "{}",
        refusals[0].reason
    );
    wait_nodes(&c, &names(3)).await;
    let mut with_intruder = names(3);
    with_intruder.push("intruder".into());
    let err = c
        .checkpoint("job-1", 1, Continue, with_intruder, DEADLINES)
        .await
        .unwrap_err();
    match &err {
        CheckpointError::NotConnected { missing, count, .. } => {
            assert_eq!(missing, &["intruder".to_owned()]);
            assert_eq!(*count, 1);
        }
        other => panic!("{other}"),
    }
    // Nothing was sent to anybody for the refused request.
    assert!(agents.iter().all(|a| count(a, |s| &s.prepares) == 0));
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    assert!(o.committed(), "{:?}", o.verdict);
    agents.clear();
}

/// Authenticates as `node` by hand and returns the raw stream.
async fn raw_agent(c: &Coordinator, node: &str) -> TcpStream {
    let mut s = TcpStream::connect(c.local_addr()).await.unwrap();
    handshake_client(&mut s, &key(), &ClientConfig::new(node))
        .await
        .unwrap();
    s
}

/// Reads until the coordinator closes; returns the Reject, if one came.
async fn until_closed(s: &mut TcpStream) -> Option<pb::RejectCode> {
    let mut reject = None;
    let t = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_frame::<_, pb::Frame>(s, 1 << 20).await {
                Ok(pb::Frame {
                    body: Some(pb::frame::Body::Reject(r)),
                }) => reject = pb::RejectCode::try_from(r.code).ok(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(t.is_ok(), "the coordinator did not close the session");
    reject
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_oversized_frames_close_only_that_session() {
    let (c, _writer) = start_with(patient()).await;
    let _agents = cluster(&c, None).await;

    let mut garbage = raw_agent(&c, "evil1").await;
    let mut all = names(3);
    all.insert(0, "evil1".into());
    wait_nodes(&c, &all).await;
    let mut bytes = 8u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xff; 8]);
    garbage.write_all(&bytes).await.unwrap();
    assert_eq!(
        until_closed(&mut garbage).await,
        Some(pb::RejectCode::Protocol)
    );

    let mut big = raw_agent(&c, "evil2").await;
    big.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    assert_eq!(until_closed(&mut big).await, Some(pb::RejectCode::Protocol));

    // A coordinator's message from an agent is a violation too.
    let mut odd = raw_agent(&c, "evil3").await;
    write_frame(&mut odd, &pb::Frame::from(pb::Prepare::default()))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut odd).await, Some(pb::RejectCode::Protocol));

    wait_nodes(&c, &names(3)).await;
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    assert!(o.committed(), "{:?}", o.verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_during_an_epoch_loses_the_node_and_aborts() {
    let (c, _writer) = start_with(patient()).await;
    let _agents = cluster(&c, None).await;
    let mut evil = raw_agent(&c, "n4").await;
    let nodes = names(4);
    wait_nodes(&c, &nodes).await;
    let run = {
        let c = c.clone();
        tokio::spawn(async move { c.checkpoint("job-1", 1, Continue, nodes, DEADLINES).await })
    };
    // Wait for PREPARE, then answer with garbage.
    loop {
        let f: pb::Frame = read_frame(&mut evil, 1 << 20).await.unwrap();
        if f.kind() == "Prepare" {
            break;
        }
    }
    evil.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    let o = run.await.unwrap().unwrap();
    let (phase, reason) = aborted(&o);
    assert_eq!(phase, Phase::Preparing);
    assert!(
        matches!(reason, AbortReason::AgentLost { node, .. } if node == "n4"),
        "{reason}"
    );
    let mut rest = Vec::new();
    let _ = evil.read_to_end(&mut rest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first() {
    let (c, _writer) = start().await;
    let agents = cluster(&c, None).await;
    let before = c.nodes().await;
    let again = SimAgent::connect(c.local_addr(), SimConfig::new("n2", key()))
        .await
        .unwrap();
    wait_until("the old n2 closed", || {
        agents[1]
            .stats
            .closed
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let after = c.nodes().await;
    assert_eq!(after.len(), 3);
    assert_ne!(before[1].session, after[1].session);
    assert_eq!(after[1].session, again.session.id);
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    assert!(o.committed(), "{:?}", o.verdict);
    assert_eq!(count(&again, |s| &s.prepares), 1);
    assert_eq!(count(&agents[1], |s| &s.prepares), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_during_an_epoch_aborts_it() {
    let (c, _writer) = start().await;
    let _agents = cluster(&c, Some(("n1", Step::Prepare, Fault::Silent))).await;
    let run = {
        let c = c.clone();
        tokio::spawn(async move {
            c.checkpoint("job-1", 1, Continue, names(3), DEADLINES)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _again = SimAgent::connect(c.local_addr(), SimConfig::new("n1", key()))
        .await
        .unwrap();
    let o = run.await.unwrap().unwrap();
    let (_, reason) = aborted(&o);
    assert!(
        matches!(reason, AbortReason::AgentLost { node, .. } if node == "n1"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_aborts_and_busy_jobs_are_refused() {
    let (c, writer) = start().await;
    let agents = cluster(&c, Some(("n3", Step::Prepare, Fault::Silent))).await;
    let run = {
        let c = c.clone();
        tokio::spawn(async move {
            c.checkpoint("job-1", 1, Continue, names(3), DEADLINES)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = c
        .checkpoint("job-1", 2, Continue, names(3), DEADLINES)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::Busy { running: 1, .. }),
        "{err}"
    );
    c.shutdown().await;
    let o = run.await.unwrap().unwrap();
    assert!(
        matches!(aborted(&o).1, AbortReason::Cancelled { .. }),
        "{:?}",
        o.verdict
    );
    let err = c
        .checkpoint("job-1", 3, Continue, names(3), DEADLINES)
        .await
        .unwrap_err();
    assert_eq!(err, CheckpointError::ShuttingDown);
    // The ABORT still reached the agents before their sessions ended.
    wait_until("ABORT after shutdown", || {
        agents.iter().all(|a| count(a, |s| &s.aborts) == 1)
    })
    .await;
    drop(agents);

    let (c, _) = {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
        (
            Coordinator::start(listener, key(), config(), writer.clone()).unwrap(),
            (),
        )
    };
    let _agents = cluster(&c, None).await;
    writer.fail_with(Some("shared filesystem full"));
    let o = c
        .checkpoint("job-1", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap();
    let (phase, reason) = aborted(&o);
    assert_eq!(phase, Phase::Committing);
    assert!(reason.to_string().contains("filesystem full"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_anything_is_sent() {
    let (c, _writer) = start().await;
    let agents = cluster(&c, None).await;
    let mut dup = names(3);
    dup.push("n1".into());
    let err = c
        .checkpoint("job-1", 1, Continue, dup, DEADLINES)
        .await
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Roster { .. }), "{err}");
    let err = c
        .checkpoint("../job", 1, Continue, names(3), DEADLINES)
        .await
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Epoch(_)), "{err}");
    let err = c
        .checkpoint("job-1", 0, Continue, names(3), DEADLINES)
        .await
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Epoch(_)), "{err}");
    assert!(agents.iter().all(|a| count(a, |s| &s.prepares) == 0));
    let err = c
        .checkpoint("job-1", 1, Continue, names(5), DEADLINES)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("n4, n5"), "{err}");
}
