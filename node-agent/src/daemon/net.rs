//! Job addresses on this node: asking the coordinator for them (it owns
//! the allocation, durable and cluster-wide), and the node's part of the
//! job network, set up once the first grant names it.
//!
//! Requests block their caller (a control-socket thread or the blocking
//! pool) until the grant arrives through the session task, or a timeout.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_protocol::cluster::pb;

use crate::jobnet::{self, JobNetwork, TreeNet};

use super::trees::lock;
use super::Shared;

/// Longest wait for the coordinator's AddressGrant.
const GRANT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests in flight and the node's job network, once set up.
#[derive(Debug, Default)]
pub(crate) struct NetState {
    pending: Mutex<HashMap<u64, SyncSender<pb::AddressGrant>>>,
    next: AtomicU64,
    /// The job network this node is set up for, and its uplink.
    node: Mutex<Option<(JobNetwork, String)>>,
}

/// A granted address and the uplink that serves it here.
#[derive(Debug, Clone)]
pub(crate) struct Granted {
    pub address: Ipv4Addr,
    pub uplink: String,
}

impl Shared {
    /// Asks the coordinator for an address of `job` (`want`: confirm that
    /// one, for a restore) and makes sure this node serves the job network.
    /// `Ok(None)`: the coordinator has no job network configured.
    pub(crate) fn job_address(
        &self,
        job: &str,
        want: Option<Ipv4Addr>,
    ) -> Result<Option<Granted>, String> {
        let id = self.net.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = sync_channel(1);
        lock(&self.net.pending).insert(id, tx);
        let sent = lock(&self.out).as_ref().is_some_and(|out| {
            out.send(
                pb::AddressRequest {
                    job: job.to_owned(),
                    request_id: id,
                    address: want.map(|a| a.to_string()).unwrap_or_default(),
                }
                .into(),
            )
            .is_ok()
        });
        let got = if sent {
            rx.recv_timeout(GRANT_TIMEOUT).ok()
        } else {
            None
        };
        lock(&self.net.pending).remove(&id);
        let g = got.ok_or_else(|| {
            if sent {
                format!(
                    "no address grant for job {job} from the coordinator within {} s",
                    GRANT_TIMEOUT.as_secs()
                )
            } else {
                format!("cannot ask for an address of job {job}: not connected to the coordinator")
            }
        })?;
        if !g.error.is_empty() {
            return Err(format!(
                "the coordinator refused an address for job {job}: {}",
                g.error
            ));
        }
        if g.network.is_empty() {
            return Ok(None);
        }
        let network: JobNetwork = g
            .network
            .parse()
            .map_err(|e| format!("the coordinator's job network: {e}"))?;
        let address: Ipv4Addr = g.address.parse().map_err(|_| {
            format!(
                "the coordinator granted {:?}, not an IPv4 address",
                g.address
            )
        })?;
        if !network.contains(address) || want.is_some_and(|w| w != address) {
            return Err(format!(
                "the coordinator granted {address}, which is not the one asked for or not in {network}"
            ));
        }
        let uplink = self.serve_network(network)?;
        Ok(Some(Granted { address, uplink }))
    }

    /// A fresh job address for a new tree of `job`, wired into a network
    /// namespace here. None: the coordinator has no job network (the tree
    /// then gets loopback only).
    pub(crate) fn new_tree_net(&self, job: &str) -> Result<Option<Arc<TreeNet>>, String> {
        let Some(g) = self.job_address(job, None)? else {
            tracing::warn!(node = %self.cfg.node, job, "no job network configured on the coordinator: the tree gets loopback only");
            return Ok(None);
        };
        let net = TreeNet::create(g.address, &g.uplink, false).map_err(|e| e.to_string())?;
        tracing::info!(node = %self.cfg.node, job, address = %g.address, veth = net.host_if(), "job address wired");
        Ok(Some(Arc::new(net)))
    }

    /// Sets this node up for `network` (once; again if it changed).
    fn serve_network(&self, network: JobNetwork) -> Result<String, String> {
        let mut node = lock(&self.net.node);
        if let Some((n, uplink)) = node.as_ref() {
            if *n == network {
                return Ok(uplink.clone());
            }
        }
        let uplink =
            jobnet::uplink_towards(self.cfg.coordinator.ip()).map_err(|e| e.to_string())?;
        jobnet::setup_node(&network, &uplink).map_err(|e| e.to_string())?;
        tracing::info!(node = %self.cfg.node, %network, %uplink, "serving the job network");
        *node = Some((network, uplink.clone()));
        Ok(uplink)
    }

    /// An AddressGrant from the coordinator: wakes its requester.
    pub(crate) fn address_granted(&self, g: pb::AddressGrant) {
        match lock(&self.net.pending).remove(&g.request_id) {
            Some(tx) => {
                let _ = tx.try_send(g);
            }
            None => {
                tracing::debug!(node = %self.cfg.node, id = g.request_id, "late address grant dropped")
            }
        }
    }
}
