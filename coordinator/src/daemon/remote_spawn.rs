//! Routing of remote spawns (`ckpt-job rsh`): an agent asks for a tree of
//! a job on another node; the coordinator passes the request to that
//! node's agent and its answer back.
//!
//! ```text
//!  agent A ── RemoteSpawn{request: a, node: B} ──► coordinator ── RemoteSpawn{request: c, node: A} ──► agent B
//!  agent A ◄── RemoteSpawned{request: a, node: B} ── coordinator ◄── RemoteSpawned{request: c} ─────── agent B
//! ```
//!
//! Each hop numbers its own requests, so that answers never need to be
//! trusted to name the asker. Pure bookkeeping: the actor sends the frames
//! this returns, and tells it about lost sessions.

use std::collections::HashMap;

use ckpt_protocol::cluster::pb;

/// A remote-spawn frame from an agent.
#[derive(Debug)]
pub enum RemoteMsg {
    /// Start a tree on `node`.
    Spawn(pb::RemoteSpawn),
    /// The answer of the node asked.
    Spawned(pb::RemoteSpawned),
}

#[derive(Debug)]
struct Pending {
    origin: String,
    origin_request: u64,
    target: String,
}

/// Remote spawns in flight.
#[derive(Debug, Default)]
pub(crate) struct RemoteSpawns {
    next: u64,
    pending: HashMap<u64, Pending>,
}

/// Frames to send: (node, frame).
pub(crate) type Outgoing = Vec<(String, pb::Frame)>;

impl RemoteSpawns {
    /// Handles `msg` from the agent of `from`; `connected` lists the nodes
    /// with a session, `owner` gives a job's registered owner (uid, gid).
    ///
    /// A spawn is refused unless its uid is the job's registered owner: the
    /// asking agent vouches that the asker runs in a tree of the job, and
    /// the job's trees all belong to its owner, so another uid means a
    /// confused or lying agent, and the target node must not start a tree
    /// of the job as someone else.
    pub fn handle(
        &mut self,
        from: &str,
        msg: RemoteMsg,
        connected: &[&str],
        owner: impl Fn(&str) -> Option<(u32, u32)>,
    ) -> Outgoing {
        match msg {
            RemoteMsg::Spawn(mut s) => {
                let target = std::mem::take(&mut s.node);
                let refused = match owner(&s.job) {
                    None => Some(format!(
                        "job {:?} is not registered with the coordinator (no tree of it was \
                         reported): a remote spawn must come from a tree of its job",
                        s.job
                    )),
                    Some((uid, _)) if uid != s.uid => Some(format!(
                        "uid {} may not start trees of job {:?} on node {target:?}: the job \
                         belongs to uid {uid}",
                        s.uid, s.job
                    )),
                    Some(_) => None,
                };
                if let Some(error) = refused {
                    tracing::warn!(node = from, target, job = %s.job, uid = s.uid, %error, "remote spawn refused");
                    return vec![(from.to_owned(), refusal(s.request, &target, error))];
                }
                if !connected.contains(&target.as_str()) {
                    let mut known: Vec<&str> = connected.to_vec();
                    known.sort_unstable();
                    let error = format!(
                        "no agent of node {target:?} is connected to the coordinator \
                         (connected: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    );
                    tracing::warn!(node = from, target, job = %s.job, "remote spawn to an unknown node");
                    return vec![(from.to_owned(), refusal(s.request, &target, error))];
                }
                self.next += 1;
                let id = self.next;
                self.pending.insert(
                    id,
                    Pending {
                        origin: from.to_owned(),
                        origin_request: s.request,
                        target: target.clone(),
                    },
                );
                tracing::info!(node = from, target, job = %s.job, request = id, "remote spawn");
                s.request = id;
                s.node = from.to_owned();
                vec![(target, s.into())]
            }
            RemoteMsg::Spawned(mut r) => {
                let ours = self
                    .pending
                    .get(&r.request)
                    .is_some_and(|p| p.target == from);
                if !ours {
                    tracing::debug!(
                        node = from,
                        request = r.request,
                        "answer to no remote spawn: dropped"
                    );
                    return Vec::new();
                }
                let Some(p) = self.pending.remove(&r.request) else {
                    return Vec::new();
                };
                r.request = p.origin_request;
                r.node = p.target;
                vec![(p.origin, r.into())]
            }
        }
    }

    /// `node`'s session ended: requests waiting for it fail; those it asked
    /// are forgotten (nobody waits for their answers).
    pub fn lost(&mut self, node: &str) -> Outgoing {
        let mut out = Vec::new();
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.target == node || p.origin == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            if p.origin != node {
                let error = format!("the agent of node {node:?} was lost before it answered");
                out.push((p.origin, refusal(p.origin_request, node, error)));
            }
        }
        out
    }
}

fn refusal(request: u64, node: &str, error: String) -> pb::Frame {
    pb::RemoteSpawned {
        request,
        node: node.to_owned(),
        error,
        ..Default::default()
    }
    .into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pb::frame::Body;

    fn spawn(request: u64, node: &str) -> RemoteMsg {
        RemoteMsg::Spawn(pb::RemoteSpawn {
            request,
            node: node.into(),
            job: "j".into(),
            argv: vec!["true".into()],
            uid: 1000,
            gid: 1000,
            ..Default::default()
        })
    }

    /// Job "j" belongs to uid 1000.
    fn owner(job: &str) -> Option<(u32, u32)> {
        (job == "j").then_some((1000, 1000))
    }

    fn refused(out: &Outgoing) -> &pb::RemoteSpawned {
        assert_eq!(out.len(), 1, "{out:?}");
        let (to, frame) = &out[0];
        assert_eq!(to, "n1", "the refusal goes back to the asker");
        let Some(Body::RemoteSpawned(d)) = &frame.body else {
            panic!("{frame:?}")
        };
        d
    }

    #[test]
    fn a_spawn_as_another_uid_than_the_jobs_owner_is_refused() {
        let mut r = RemoteSpawns::default();
        let RemoteMsg::Spawn(mut s) = spawn(4, "n2") else {
            unreachable!()
        };
        s.uid = 0;
        let out = r.handle("n1", RemoteMsg::Spawn(s), &["n1", "n2"], owner);
        let d = refused(&out);
        assert_eq!((d.request, d.node.as_str(), d.tree_id), (4, "n2", 0));
        assert!(
            d.error.contains("uid 0") && d.error.contains("belongs to uid 1000"),
            "{}",
            d.error
        );
        assert!(r.pending.is_empty());
        // The owner's own spawn goes through.
        let out = r.handle("n1", spawn(5, "n2"), &["n1", "n2"], owner);
        assert_eq!(out[0].0, "n2");
    }

    #[test]
    fn a_spawn_for_an_unregistered_job_is_refused() {
        let mut r = RemoteSpawns::default();
        let RemoteMsg::Spawn(mut s) = spawn(9, "n2") else {
            unreachable!()
        };
        s.job = "other".into();
        let out = r.handle("n1", RemoteMsg::Spawn(s), &["n1", "n2"], owner);
        let d = refused(&out);
        assert_eq!(d.request, 9);
        assert!(
            d.error.contains("\"other\" is not registered"),
            "{}",
            d.error
        );
        assert!(r.pending.is_empty());
    }

    #[test]
    fn routes_there_and_back_with_each_hops_numbers() {
        let mut r = RemoteSpawns::default();
        let out = r.handle("n1", spawn(7, "n2"), &["n1", "n2"], owner);
        assert_eq!(out.len(), 1);
        let (to, frame) = &out[0];
        assert_eq!(to, "n2");
        let Some(Body::RemoteSpawn(s)) = &frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!(s.node, "n1");
        let id = s.request;
        // A stranger's answer is not taken.
        let answer = |from_tree| pb::RemoteSpawned {
            request: id,
            node: "whatever".into(),
            tree_id: from_tree,
            root_pid: 42,
            error: String::new(),
        };
        assert!(r
            .handle("n3", RemoteMsg::Spawned(answer(1)), &[], owner)
            .is_empty());
        let out = r.handle("n2", RemoteMsg::Spawned(answer(3)), &[], owner);
        assert_eq!(out.len(), 1);
        let (to, frame) = &out[0];
        assert_eq!(to, "n1");
        let Some(Body::RemoteSpawned(d)) = &frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!((d.request, d.node.as_str(), d.tree_id), (7, "n2", 3));
        // Answered once only.
        assert!(r
            .handle("n2", RemoteMsg::Spawned(answer(3)), &[], owner)
            .is_empty());
    }

    #[test]
    fn unknown_node_is_refused_naming_it_and_the_connected_ones() {
        let mut r = RemoteSpawns::default();
        let out = r.handle("n1", spawn(1, "nosuch"), &["n2", "n1"], owner);
        let (to, frame) = &out[0];
        assert_eq!(to, "n1");
        let Some(Body::RemoteSpawned(d)) = &frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!(d.request, 1);
        assert!(d.error.contains("\"nosuch\""), "{}", d.error);
        assert!(d.error.contains("n1, n2"), "{}", d.error);
    }

    #[test]
    fn losing_the_target_fails_its_requests() {
        let mut r = RemoteSpawns::default();
        r.handle("n1", spawn(5, "n2"), &["n1", "n2"], owner);
        r.handle("n2", spawn(6, "n1"), &["n1", "n2"], owner);
        let out = r.lost("n2");
        assert_eq!(out.len(), 1, "{out:?}");
        let (to, frame) = &out[0];
        assert_eq!(to, "n1");
        let Some(Body::RemoteSpawned(d)) = &frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!(d.request, 5);
        assert!(d.error.contains("lost"), "{}", d.error);
        assert!(r.pending.is_empty());
    }
}
