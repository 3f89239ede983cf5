//! The coordinator task: owns the sessions, the jobs and their running
//! epochs, and is the only code that touches them.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::epoch::{
    Action, AgentMsg, Epoch, EpochSpec, Event, Handled, Ignored, Outcome, Roster, Verdict,
};

use super::registry::{AgentReport, DueCheckpoint, JobRegistry, JobView, RegistryFile};
use super::remote_spawn::{Outgoing, RemoteMsg, RemoteSpawns};
use super::restart::{
    RestartAction, RestartError, RestartEvent, RestartOutcome, RestartRequest, RestartRun,
};
use super::wire::{self, EpochWire, Framed, RestartReply};
use super::{
    CheckpointError, CheckpointRequest, ManifestWriter, NodeInfo, Refusal, NAMED_MISSING,
    REFUSALS_KEPT,
};

/// Names one connection for its whole life (a node's session id can
/// repeat across reconnections; this never does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId(pub u64);

/// Everything the coordinator task hears.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A connection authenticated as `node`.
    Register {
        conn: ConnId,
        node: Arc<str>,
        session: String,
        peer: SocketAddr,
        tx: mpsc::Sender<Framed>,
        close: oneshot::Sender<String>,
    },
    /// A connection failed its handshake.
    Refused {
        peer: SocketAddr,
        reason: String,
    },
    /// An agent's reply about an epoch.
    Agent {
        conn: ConnId,
        job: String,
        epoch: u64,
        msg: AgentMsg,
    },
    /// An agent's reply that only a restart waits for.
    Restart {
        conn: ConnId,
        job: String,
        epoch: u64,
        msg: RestartReply,
    },
    /// A remote spawn to route (remote_spawn.rs).
    Remote {
        conn: ConnId,
        msg: RemoteMsg,
    },
    /// A tree report or progress for the job registry.
    Registry {
        conn: ConnId,
        report: AgentReport,
    },
    /// A session ended.
    Closed {
        conn: ConnId,
        reason: String,
    },
    /// A [`ManifestWriter::commit`] returned.
    CommitResult {
        job: String,
        epoch: u64,
        result: Result<(), String>,
    },
    Request(Request),
}

type Reply<T> = oneshot::Sender<T>;

/// What the API handle asks.
#[derive(Debug)]
pub(crate) enum Request {
    Checkpoint {
        req: Box<CheckpointRequest>,
        reply: Reply<Result<Outcome, CheckpointError>>,
    },
    Restart {
        req: Box<RestartRequest>,
        reply: Reply<Result<RestartOutcome, RestartError>>,
    },
    Nodes {
        reply: Reply<Vec<NodeInfo>>,
    },
    Refusals {
        reply: Reply<Vec<Refusal>>,
    },
    Shutdown {
        reply: Reply<()>,
    },
    /// The registry: one job, every job, schedules.
    Job {
        job: String,
        reply: Reply<Option<JobView>>,
    },
    Jobs {
        reply: Reply<Vec<JobView>>,
    },
    Schedule {
        job: String,
        interval: std::time::Duration,
        keep: u32,
        reply: Reply<bool>,
    },
    Due {
        reply: Reply<Vec<DueCheckpoint>>,
    },
    /// A checkpoint of a known job that did not start.
    FailedToStart {
        job: String,
        error: String,
    },
    /// Registers a job named by root with its nodes (no-op if known).
    Ensure {
        job: String,
        uid: u32,
        gid: u32,
        nodes: Vec<String>,
    },
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    tx: mpsc::Sender<Framed>,
    /// Closing with a reason ends the session at once, queued frames or not.
    close: oneshot::Sender<String>,
    session: String,
    peer: SocketAddr,
}

#[derive(Debug)]
struct Running {
    epoch: Epoch,
    wire: EpochWire,
    reply: Option<Reply<Result<Outcome, CheckpointError>>>,
}

#[derive(Debug)]
struct Job {
    /// Kept across epochs while the node set stays the same.
    roster: Arc<Roster>,
    last_epoch: u64,
    running: Option<Running>,
}

/// A restart in flight and who waits for it.
#[derive(Debug)]
struct RunningRestart {
    run: RestartRun,
    reply: Option<Reply<Result<RestartOutcome, RestartError>>>,
}

struct Actor {
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Arc<str>>,
    jobs: HashMap<String, Job>,
    /// Restarts in flight, by job (a job runs an epoch or a restart, never
    /// both).
    restarts: HashMap<String, RunningRestart>,
    restart_events: VecDeque<(String, RestartEvent)>,
    refusals: VecDeque<Refusal>,
    writer: Arc<dyn ManifestWriter>,
    /// For commit results; weak, so the task ends once its handles are gone.
    inbox: mpsc::WeakSender<Inbound>,
    /// Events produced while acting (a dropped session, lost nodes), fed
    /// in order before the next message.
    events: VecDeque<(String, Event)>,
    out: Vec<Action>,
    shutting_down: bool,
    /// Jobs, owners, trees, epochs (registry.rs); its persisted part goes
    /// to `persist` whenever it changes.
    reg: JobRegistry,
    persist: Option<tokio::sync::watch::Sender<RegistryFile>>,
    /// Remote spawns waiting for the target node's answer.
    remote: RemoteSpawns,
}

/// The coordinator task.
pub(crate) async fn run(
    mut rx: mpsc::Receiver<Inbound>,
    inbox: mpsc::WeakSender<Inbound>,
    writer: Arc<dyn ManifestWriter>,
    reg: JobRegistry,
    persist: Option<tokio::sync::watch::Sender<RegistryFile>>,
) {
    let mut a = Actor {
        sessions: HashMap::new(),
        conns: HashMap::new(),
        jobs: HashMap::new(),
        restarts: HashMap::new(),
        restart_events: VecDeque::new(),
        refusals: VecDeque::new(),
        writer,
        inbox,
        events: VecDeque::new(),
        out: Vec::new(),
        shutting_down: false,
        reg,
        persist,
        remote: RemoteSpawns::default(),
    };
    loop {
        let msg = match a.next_deadline() {
            Some(at) => {
                let at = tokio::time::Instant::from_std(at);
                tokio::select! {
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep_until(at) => {
                        a.tick();
                        continue;
                    }
                }
            }
            None => rx.recv().await,
        };
        let Some(msg) = msg else { break };
        let stop = a.handle(msg);
        if a.reg.take_dirty() {
            if let Some(p) = &a.persist {
                p.send_replace(a.reg.snapshot());
            }
        }
        if stop {
            break;
        }
    }
    tracing::info!("coordinator task stopped");
}

impl Actor {
    /// Returns true when the task should stop.
    fn handle(&mut self, msg: Inbound) -> bool {
        match msg {
            Inbound::Register {
                conn,
                node,
                session,
                peer,
                tx,
                close,
            } => self.register(conn, node, session, peer, tx, close),
            Inbound::Refused { peer, reason } => {
                tracing::warn!(%peer, %reason, "refused an agent connection");
                if self.refusals.len() == REFUSALS_KEPT {
                    self.refusals.pop_front();
                }
                self.refusals.push_back(Refusal {
                    peer,
                    reason,
                    at: SystemTime::now(),
                });
            }
            Inbound::Agent {
                conn,
                job,
                epoch,
                msg,
            } => self.agent(conn, job, epoch, msg),
            Inbound::Restart {
                conn,
                job,
                epoch,
                msg,
            } => self.restart_reply(conn, job, epoch, msg),
            Inbound::Remote { conn, msg } => {
                if let Some(node) = self.conns.get(&conn).cloned() {
                    let connected: Vec<&str> = self.sessions.keys().map(|n| &**n).collect();
                    let out = self
                        .remote
                        .handle(&node, msg, &connected, |j| self.reg.owner(j));
                    self.send_remote(out);
                }
            }
            Inbound::Registry { conn, report } => {
                if let Some(node) = self.conns.get(&conn).cloned() {
                    self.reg.apply(&node, report);
                }
            }
            Inbound::Closed { conn, reason } => {
                if let Some(node) = self.conns.get(&conn).cloned() {
                    self.drop_session(&node, reason, false);
                }
            }
            Inbound::CommitResult { job, epoch, result } => self.commit_result(job, epoch, result),
            Inbound::Request(req) => return self.request(req),
        }
        self.pump();
        false
    }

    fn register(
        &mut self,
        conn: ConnId,
        node: Arc<str>,
        session: String,
        peer: SocketAddr,
        tx: mpsc::Sender<Framed>,
        close: oneshot::Sender<String>,
    ) {
        if self.shutting_down {
            let _ = close.send("the coordinator is shutting down".into());
            return;
        }
        if self.sessions.contains_key(&*node) {
            let why = format!("replaced by a new connection of the same node from {peer}");
            self.drop_session(&node, why, true);
        }
        tracing::info!(node = %node, %peer, %session, "agent connected");
        self.conns.insert(conn, node.clone());
        self.sessions.insert(
            node,
            Session {
                conn,
                tx,
                close,
                session,
                peer,
            },
        );
    }

    /// Ends `node`'s session (telling its task why, if `tell`) and loses the
    /// node in every running epoch that has it.
    fn drop_session(&mut self, node: &str, reason: String, tell: bool) {
        let Some(s) = self.sessions.remove(node) else {
            return;
        };
        self.conns.remove(&s.conn);
        self.reg.disconnected(node);
        let out = self.remote.lost(node);
        self.send_remote(out);
        let in_epoch = self.lose(node);
        if in_epoch {
            tracing::warn!(node, session = %s.session, %reason, "agent lost during an epoch");
        } else {
            tracing::info!(node, session = %s.session, %reason, "agent disconnected");
        }
        if tell {
            let _ = s.close.send(reason);
        }
    }

    /// Sends remote-spawn frames; one that cannot be queued is dropped (the
    /// asking agent's wait times out).
    fn send_remote(&mut self, out: Outgoing) {
        for (node, frame) in out {
            let sent = self
                .sessions
                .get(&*node)
                .is_some_and(|s| s.tx.try_send(wire::encode(&frame)).is_ok());
            if !sent {
                tracing::warn!(node, kind = frame.kind(), "remote spawn frame not sent");
            }
        }
    }

    /// Queues `Lost` for `node` in every running epoch it belongs to.
    fn lose(&mut self, node: &str) -> bool {
        let mut any = false;
        for (job, j) in &self.jobs {
            let Some(run) = &j.running else { continue };
            if let Some(id) = run.epoch.roster().id(node) {
                self.events
                    .push_back((job.clone(), Event::Lost { node: id }));
                any = true;
            }
        }
        for (job, r) in &self.restarts {
            if r.run.has_agent(node) {
                let agent = node.to_owned();
                self.restart_events
                    .push_back((job.clone(), RestartEvent::Lost { agent }));
                any = true;
            }
        }
        any
    }

    fn agent(&mut self, conn: ConnId, job: String, epoch: u64, msg: AgentMsg) {
        let Some(node) = self.conns.get(&conn) else {
            // Queued by a connection dropped or replaced since.
            return;
        };
        if let Some(r) = self.restarts.get(&job) {
            if r.run.epoch() == epoch && r.run.has_agent(node) {
                let agent = node.to_string();
                let event = match msg {
                    AgentMsg::Resumed { .. } => RestartEvent::Resumed { agent },
                    AgentMsg::Failed { reason } => RestartEvent::Failed { agent, reason },
                    other => {
                        let reason = format!("sent {} during a restart", other.kind());
                        RestartEvent::Failed { agent, reason }
                    }
                };
                self.restart_events.push_back((job, event));
                return;
            }
        }
        let id = self
            .jobs
            .get(&job)
            .and_then(|j| j.running.as_ref())
            .and_then(|run| run.epoch.roster().id(node));
        match id {
            Some(id) => self.events.push_back((
                job,
                Event::Agent {
                    node: id,
                    epoch,
                    msg,
                },
            )),
            None => tracing::debug!(
                node = %node, job, epoch, msg = %msg.kind(),
                "reply for no running epoch of this node: dropped"
            ),
        }
    }

    fn restart_reply(&mut self, conn: ConnId, job: String, epoch: u64, msg: RestartReply) {
        let Some(node) = self.conns.get(&conn) else {
            return;
        };
        let ours = self
            .restarts
            .get(&job)
            .is_some_and(|r| r.run.epoch() == epoch && r.run.has_agent(node));
        if !ours {
            tracing::debug!(node = %node, job, epoch, ?msg, "reply for no running restart: dropped");
            return;
        }
        let agent = node.to_string();
        let event = match msg {
            RestartReply::Restored {
                image_node,
                verify_ms,
                restore_ms,
            } => RestartEvent::Restored {
                agent,
                image_node,
                verify_ms,
                restore_ms,
            },
            RestartReply::Aborted => RestartEvent::Aborted { agent },
        };
        self.restart_events.push_back((job, event));
    }

    fn commit_result(&mut self, job: String, epoch: u64, result: Result<(), String>) {
        let running = self
            .jobs
            .get(&job)
            .and_then(|j| j.running.as_ref())
            .is_some_and(|run| run.epoch.number() == epoch);
        if running {
            let event = match result {
                Ok(()) => Event::CommitSucceeded,
                Err(reason) => Event::CommitFailed { reason },
            };
            self.events.push_back((job, event));
        } else if result.is_ok() {
            // The epoch gave up waiting for the commit and told its agents
            // to abort: it must not stay restorable.
            self.revoke(job, epoch);
        }
    }

    fn revoke(&self, job: String, epoch: u64) {
        tracing::error!(
            job,
            epoch,
            "manifest committed after the epoch was aborted: revoking it"
        );
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = writer.revoke(&job, epoch) {
                tracing::error!(job, epoch, error = %e, "revoking a manifest failed");
            }
        });
    }

    fn request(&mut self, req: Request) -> bool {
        match req {
            Request::Checkpoint { req, reply } => {
                if let Err(e) = self.start_epoch(*req, reply) {
                    // Only errors before anything was sent come back here.
                    tracing::warn!(error = %e.1, "checkpoint refused");
                    let _ = e.0.send(Err(e.1));
                }
                self.pump();
            }
            Request::Restart { req, reply } => {
                if let Err((reply, e)) = self.start_restart(*req, reply) {
                    tracing::warn!(error = %e, "restart refused");
                    let _ = reply.send(Err(e));
                }
                self.pump();
            }
            Request::Nodes { reply } => {
                let mut nodes: Vec<NodeInfo> = self
                    .sessions
                    .iter()
                    .map(|(node, s)| NodeInfo {
                        node: node.to_string(),
                        session: s.session.clone(),
                        peer: s.peer,
                    })
                    .collect();
                nodes.sort_by(|a, b| a.node.cmp(&b.node));
                let _ = reply.send(nodes);
            }
            Request::Refusals { reply } => {
                let _ = reply.send(self.refusals.iter().cloned().collect());
            }
            Request::Job { job, reply } => {
                let _ = reply.send(self.job_view(&job));
            }
            Request::Jobs { reply } => {
                let views = self
                    .reg
                    .names()
                    .iter()
                    .filter_map(|j| self.job_view(j))
                    .collect();
                let _ = reply.send(views);
            }
            Request::Schedule {
                job,
                interval,
                keep,
                reply,
            } => {
                let _ = reply.send(self.reg.schedule(&job, interval, keep, Instant::now()));
            }
            Request::Due { reply } => {
                let (jobs, restarts) = (&self.jobs, &self.restarts);
                let busy = |job: &str| {
                    restarts.contains_key(job) || jobs.get(job).is_some_and(|j| j.running.is_some())
                };
                let _ = reply.send(self.reg.due(Instant::now(), busy));
            }
            Request::FailedToStart { job, error } => self.reg.failed_to_start(&job, error),
            Request::Ensure {
                job,
                uid,
                gid,
                nodes,
            } => self.reg.ensure(&job, uid, gid, &nodes),
            Request::Shutdown { reply } => {
                self.shutting_down = true;
                let jobs: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.running.is_some())
                    .map(|(job, _)| job.clone())
                    .collect();
                for job in jobs {
                    let reason = "the coordinator is shutting down".to_owned();
                    self.events.push_back((job, Event::Cancel { reason }));
                }
                for job in self.restarts.keys() {
                    let reason = "the coordinator is shutting down".to_owned();
                    self.restart_events
                        .push_back((job.clone(), RestartEvent::Cancel { reason }));
                }
                self.pump();
                // Dropped without a reason: each session writes what is
                // queued (the ABORTs) and then ends.
                self.sessions.clear();
                self.conns.clear();
                let _ = reply.send(());
                return true;
            }
        }
        false
    }

    #[allow(clippy::type_complexity)]
    fn start_epoch(
        &mut self,
        req: CheckpointRequest,
        reply: Reply<Result<Outcome, CheckpointError>>,
    ) -> Result<(), (Reply<Result<Outcome, CheckpointError>>, CheckpointError)> {
        if self.shutting_down {
            return Err((reply, CheckpointError::ShuttingDown));
        }
        let job_name = req.job.clone();
        if let Some(r) = self.restarts.get(&req.job) {
            let running = r.run.epoch();
            return Err((
                reply,
                CheckpointError::Busy {
                    job: job_name,
                    running,
                },
            ));
        }
        let mut roster = None;
        if let Some(j) = self.jobs.get(&req.job) {
            if let Some(run) = &j.running {
                let running = run.epoch.number();
                return Err((
                    reply,
                    CheckpointError::Busy {
                        job: job_name,
                        running,
                    },
                ));
            }
            if req.epoch <= j.last_epoch {
                let e = CheckpointError::StaleEpoch {
                    job: job_name,
                    epoch: req.epoch,
                    last: j.last_epoch,
                };
                return Err((reply, e));
            }
            if j.roster.names().eq(req.nodes.iter().map(String::as_str)) {
                roster = Some(j.roster.clone());
            }
        }
        let roster = match roster {
            Some(r) => r,
            None => match Roster::new(req.nodes.iter().cloned()) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    let reason = e.to_string();
                    return Err((
                        reply,
                        CheckpointError::Roster {
                            job: job_name,
                            reason,
                        },
                    ));
                }
            },
        };
        let mut count = 0;
        let mut missing = Vec::new();
        for node in roster.names() {
            if !self.sessions.contains_key(node) {
                count += 1;
                if missing.len() < NAMED_MISSING {
                    missing.push(node.to_owned());
                }
            }
        }
        if count > 0 {
            let e = CheckpointError::NotConnected {
                job: job_name,
                missing,
                count,
            };
            return Err((reply, e));
        }
        let wire = EpochWire {
            job: req.job.clone(),
            mode: req.mode,
            deadlines: req.deadlines,
            epoch_dir: req.epoch_dir,
        };
        let spec = EpochSpec {
            job: req.job,
            epoch: req.epoch,
            mode: req.mode,
            owner_uid: req.owner_uid,
            owner_gid: req.owner_gid,
            command: req.command,
            cwd: req.cwd,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            deadlines: req.deadlines,
        };
        let mut out = mem::take(&mut self.out);
        out.clear();
        let epoch = match Epoch::begin(spec, roster.clone(), Instant::now(), &mut out) {
            Ok(e) => e,
            Err(e) => {
                self.out = out;
                return Err((reply, CheckpointError::Epoch(e)));
            }
        };
        tracing::info!(
            job = %job_name, epoch = req.epoch, mode = ?req.mode, nodes = roster.len(),
            "epoch begins"
        );
        let running = Running {
            epoch,
            wire,
            reply: Some(reply),
        };
        let job = Job {
            roster,
            last_epoch: req.epoch,
            running: Some(running),
        };
        self.jobs.insert(job_name.clone(), job);
        self.act_all(&job_name, &mut out);
        self.out = out;
        Ok(())
    }

    /// Feeds every queued event; acting may queue more.
    fn pump(&mut self) {
        loop {
            if let Some((job, event)) = self.events.pop_front() {
                self.feed(&job, event);
            } else if let Some((job, event)) = self.restart_events.pop_front() {
                self.feed_restart(&job, event);
            } else {
                break;
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn start_restart(
        &mut self,
        req: RestartRequest,
        reply: Reply<Result<RestartOutcome, RestartError>>,
    ) -> Result<(), (Reply<Result<RestartOutcome, RestartError>>, RestartError)> {
        let job = req.job.clone();
        if self.shutting_down {
            return Err((reply, RestartError::ShuttingDown));
        }
        let running = self.restarts.get(&job).map(|r| r.run.epoch()).or_else(|| {
            self.jobs
                .get(&job)
                .and_then(|j| j.running.as_ref())
                .map(|run| run.epoch.number())
        });
        if let Some(running) = running {
            return Err((reply, RestartError::Busy { job, running }));
        }
        let refused = |reason: String| RestartError::Refused {
            job: job.clone(),
            reason,
        };
        if req.placement.is_empty() {
            return Err((reply, refused("the placement names no node".into())));
        }
        let mut agents: Vec<&str> = req.placement.values().map(String::as_str).collect();
        agents.sort_unstable();
        if let Some(w) = agents.windows(2).find(|w| w[0] == w[1]) {
            let reason = format!("agent {} is given more than one node image", w[0]);
            return Err((reply, refused(reason)));
        }
        let missing: Vec<String> = agents
            .iter()
            .filter(|a| !self.sessions.contains_key(**a))
            .map(|a| (*a).to_owned())
            .collect();
        if !missing.is_empty() {
            return Err((reply, RestartError::NotConnected { job, missing }));
        }
        tracing::info!(job, epoch = req.epoch, placement = ?req.placement, "restart begins");
        let mut out = Vec::new();
        let run = RestartRun::begin(req, Instant::now(), &mut out);
        self.restarts.insert(
            job.clone(),
            RunningRestart {
                run,
                reply: Some(reply),
            },
        );
        self.restart_act(&job, out);
        Ok(())
    }

    fn feed_restart(&mut self, job: &str, event: RestartEvent) {
        let Some(r) = self.restarts.get_mut(job) else {
            return;
        };
        let mut out = Vec::new();
        r.run.handle(Instant::now(), event, &mut out);
        self.restart_act(job, out);
    }

    fn restart_act(&mut self, job: &str, out: Vec<RestartAction>) {
        let mut stuck = Vec::new();
        for action in out {
            match action {
                RestartAction::Send { agent, frame } => {
                    let kind = frame.kind();
                    match self.sessions.get(agent.as_str()) {
                        Some(s) => match s.tx.try_send(wire::encode(&frame)) {
                            Ok(()) => tracing::debug!(job, agent, kind, "restart: sent"),
                            Err(TrySendError::Full(_)) => stuck.push(agent),
                            Err(TrySendError::Closed(_)) => {}
                        },
                        None => {
                            let event = RestartEvent::Lost { agent };
                            self.restart_events.push_back((job.to_owned(), event));
                        }
                    }
                }
                RestartAction::Done(result) => {
                    let Some(mut r) = self.restarts.remove(job) else {
                        continue;
                    };
                    match &result {
                        Ok(o) => tracing::info!(
                            job,
                            epoch = o.epoch,
                            total_ms = o.total.as_secs_f64() * 1e3,
                            "restart done: every tree resumed"
                        ),
                        Err(e) => tracing::warn!(job, error = %e, "restart failed"),
                    }
                    if let Some(reply) = r.reply.take() {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        for node in stuck {
            let why = "its outbound queue is full: the agent stopped reading".to_owned();
            self.drop_session(&node, why, true);
        }
    }

    fn feed(&mut self, job: &str, event: Event) {
        let Some(run) = self.jobs.get_mut(job).and_then(|j| j.running.as_mut()) else {
            return;
        };
        let mut out = mem::take(&mut self.out);
        out.clear();
        let handled = run.epoch.handle(Instant::now(), event, &mut out);
        if let Handled::Ignored(why) = handled {
            let epoch = run.epoch.number();
            if why == Ignored::CommitAfterAbort {
                self.revoke(job.to_owned(), epoch);
            } else {
                tracing::debug!(job, epoch, ?why, "event ignored");
            }
        }
        self.act_all(job, &mut out);
        self.out = out;
    }

    fn act_all(&mut self, job: &str, out: &mut Vec<Action>) {
        for action in out.drain(..) {
            self.act(job, action);
        }
    }

    fn act(&mut self, job: &str, action: Action) {
        match action {
            Action::Broadcast { epoch, command } => {
                let Some(run) = self.jobs.get(job).and_then(|j| j.running.as_ref()) else {
                    return;
                };
                let frame = wire::encode(&run.wire.command_frame(epoch, &command));
                let mut stuck = Vec::new();
                for node in run.epoch.roster().names() {
                    let Some(s) = self.sessions.get(node) else {
                        continue;
                    };
                    match s.tx.try_send(frame.clone()) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => stuck.push(node.to_owned()),
                        // Its task is ending; its Closed event will follow.
                        Err(TrySendError::Closed(_)) => {}
                    }
                }
                tracing::debug!(job, epoch, ?command, "broadcast");
                for node in stuck {
                    let why = "its outbound queue is full: the agent stopped reading".to_owned();
                    self.drop_session(&node, why, true);
                }
            }
            Action::WriteManifest(manifest) => {
                let writer = self.writer.clone();
                let inbox = self.inbox.clone();
                let (job, epoch) = (manifest.job.clone(), manifest.epoch);
                tracing::debug!(job, epoch, "committing the manifest");
                tokio::task::spawn_blocking(move || {
                    let result = writer.commit(&manifest);
                    drop(manifest);
                    if let Some(tx) = inbox.upgrade() {
                        let _ = tx.blocking_send(Inbound::CommitResult { job, epoch, result });
                    }
                });
            }
            Action::Done(outcome) => {
                let Some(j) = self.jobs.get_mut(job) else {
                    return;
                };
                let Some(mut run) = j.running.take() else {
                    return;
                };
                match &outcome.verdict {
                    Verdict::Committed => tracing::info!(
                        job,
                        epoch = outcome.epoch,
                        total_ms = outcome.timings.total.as_secs_f64() * 1e3,
                        problems = outcome.after_commit.len(),
                        "epoch committed"
                    ),
                    Verdict::Aborted { phase, reason } => tracing::warn!(
                        job, epoch = outcome.epoch, %phase, %reason, "epoch aborted"
                    ),
                }
                let error = match &outcome.verdict {
                    Verdict::Committed => None,
                    Verdict::Aborted { phase, reason } => Some(format!(
                        "epoch {} aborted in {phase}: {reason}",
                        outcome.epoch
                    )),
                };
                self.reg.epoch_done(job, outcome.epoch, error);
                if let Some(reply) = run.reply.take() {
                    let _ = reply.send(Ok(*outcome));
                }
            }
        }
    }

    fn job_view(&self, job: &str) -> Option<JobView> {
        let running = self
            .jobs
            .get(job)
            .and_then(|j| j.running.as_ref())
            .map(|r| r.epoch.number());
        let restarting = self.restarts.get(job).map(|r| r.run.epoch());
        self.reg
            .view(job, running, restarting, |n| self.sessions.contains_key(n))
    }

    fn next_deadline(&self) -> Option<Instant> {
        let epochs = self
            .jobs
            .values()
            .filter_map(|j| j.running.as_ref())
            .filter_map(|run| run.epoch.next_deadline());
        let restarts = self.restarts.values().map(|r| r.run.deadline());
        epochs.chain(restarts).min()
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.running
                    .as_ref()
                    .and_then(|run| run.epoch.next_deadline())
                    .is_some_and(|d| d <= now)
            })
            .map(|(job, _)| job.clone())
            .collect();
        for job in due {
            self.events.push_back((job, Event::Tick));
        }
        for (job, r) in &self.restarts {
            if r.run.deadline() <= now {
                self.restart_events
                    .push_back((job.clone(), RestartEvent::Tick));
            }
        }
        self.pump();
    }
}
