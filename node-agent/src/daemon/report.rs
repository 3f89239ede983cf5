//! Tells the coordinator which trees of which job run on this node: the full
//! list after every connect (a restarted coordinator relearns them), then a
//! TREE_STARTED or TREE_EXITED for each change.

use std::collections::BTreeMap;

use ckpt_protocol::cluster::pb;

use super::trees::{Registry, Tree, TreeId, TreeState};

/// What this connection's coordinator was told, by tree id.
#[derive(Debug, Default)]
pub(crate) struct Reporter {
    told: BTreeMap<TreeId, String>,
}

fn report(t: &Tree) -> pb::TreeReport {
    pb::TreeReport {
        job: t.job.clone(),
        tree_id: t.id,
        owner_uid: t.owner.0,
        owner_gid: t.owner.1,
        root_pid: t.handle.root_pid,
        restored_from: t.info().restored_from.map_or(0, |r| r.epoch),
    }
}

impl Reporter {
    /// Every live tree, as the first report of a connection.
    pub fn full(&mut self, reg: &Registry) -> pb::Frame {
        self.told.clear();
        let mut trees = Vec::new();
        for t in reg.all() {
            if t.state() == TreeState::Running {
                self.told.insert(t.id, t.job.clone());
                trees.push(report(&t));
            }
        }
        pb::TreeList { trees }.into()
    }

    /// What changed since the last report.
    pub fn changes(&mut self, reg: &Registry) -> Vec<pb::Frame> {
        let mut out = Vec::new();
        let all = reg.all();
        for t in &all {
            match t.state() {
                TreeState::Running if !self.told.contains_key(&t.id) => {
                    self.told.insert(t.id, t.job.clone());
                    out.push(
                        pb::TreeStarted {
                            tree: Some(report(t)),
                        }
                        .into(),
                    );
                }
                TreeState::Exited(code) if self.told.remove(&t.id).is_some() => {
                    out.push(
                        pb::TreeExited {
                            job: t.job.clone(),
                            tree_id: t.id,
                            exit_status: code,
                        }
                        .into(),
                    );
                }
                _ => {}
            }
        }
        // Trees dropped from the registry (forgotten after they exited).
        let gone: Vec<TreeId> = self
            .told
            .keys()
            .filter(|id| !all.iter().any(|t| t.id == **id))
            .copied()
            .collect();
        for id in gone {
            if let Some(job) = self.told.remove(&id) {
                out.push(
                    pb::TreeExited {
                        job,
                        tree_id: id,
                        exit_status: -1,
                    }
                    .into(),
                );
            }
        }
        out
    }
}
