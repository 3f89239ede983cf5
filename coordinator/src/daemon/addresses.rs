//! Job-stable addresses: the coordinator hands each new tree of a job an
//! address of the job network (`job_network` in coordinator.toml) and
//! confirms a restored tree's address (from its committed manifest).
//!
//! Durable and never reused: every grant is recorded in a small JSON file
//! (write temp, fsync, rename, fsync the dir) *before* the agent hears of
//! it, and addresses are never released, so an address that a committed
//! epoch holds can never be handed to another job — even across
//! coordinator restarts. (A /16 holds 65,534 addresses.)
//!
//! Why not released when a job ends: the registry cannot tell that a job
//! has ended for good. No live tree is also the state of a job stopped by
//! a checkpoint and waiting for its restart (possibly for days, possibly
//! after a coordinator restart); and whether a committed epoch is left is
//! the image store's business (retention, `ckpt-job rm`, an admin's
//! `rm -r`, a copy elsewhere), which the registry does not follow. Released
//! too early, the address would go to another job and the restore of the
//! first would then be refused or, worse, collide. Releasing needs an
//! explicit end of job (the job's removal from the store, through the
//! coordinator) to hook onto.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ckpt_protocol::cluster::pb;
use ckpt_protocol::jobnet::JobNetwork;
use serde::{Deserialize, Serialize};

const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("job address state {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("job address state {path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "job address state {path} was made for job network {was}, but job_network is now {now}: \
         addresses of committed epochs would change (move the file away to start afresh)"
    )]
    NetworkChanged {
        path: PathBuf,
        was: String,
        now: String,
    },
    #[error("job network {0} has no free address left")]
    Exhausted(String),
    #[error("{address} is not in job network {network}")]
    Outside { address: Ipv4Addr, network: String },
    #[error("{address} belongs to job {owner}, not to job {job}")]
    Taken {
        address: Ipv4Addr,
        owner: String,
        job: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    format: u32,
    network: String,
    /// Where the next search for a free address starts (host index).
    next: u32,
    /// Job -> its addresses.
    jobs: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

/// The allocator and its file.
#[derive(Debug)]
pub struct Addresses {
    network: JobNetwork,
    path: PathBuf,
    state: Mutex<State>,
}

impl Addresses {
    /// Loads `path` (absent: nothing granted yet) for `network`.
    pub fn open(network: JobNetwork, path: &Path) -> Result<Self, AddressError> {
        let state = match fs::read(path) {
            Ok(bytes) => {
                let s: State =
                    serde_json::from_slice(&bytes).map_err(|e| AddressError::Corrupt {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                if s.format != FORMAT {
                    return Err(AddressError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!("format {} (this ckpt reads {FORMAT})", s.format),
                    });
                }
                if s.network != network.to_string() {
                    return Err(AddressError::NetworkChanged {
                        path: path.to_path_buf(),
                        was: s.network,
                        now: network.to_string(),
                    });
                }
                s
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State {
                format: FORMAT,
                network: network.to_string(),
                next: 0,
                jobs: BTreeMap::new(),
            },
            Err(source) => {
                return Err(AddressError::Io {
                    path: path.to_path_buf(),
                    what: "read",
                    source,
                })
            }
        };
        Ok(Addresses {
            network,
            path: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    pub fn network(&self) -> JobNetwork {
        self.network
    }

    /// A fresh address for `job` (`want` None), or the confirmation that
    /// `want` is `job`'s (recorded if nobody had it). Durable on return.
    pub fn grant(&self, job: &str, want: Option<Ipv4Addr>) -> Result<Ipv4Addr, AddressError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let owner = |st: &State, a: Ipv4Addr| {
            st.jobs
                .iter()
                .find(|(_, set)| set.contains(&a))
                .map(|(j, _)| j.clone())
        };
        let mut next = st.next;
        let address = match want {
            Some(a) => {
                if !self.network.contains(a) {
                    return Err(AddressError::Outside {
                        address: a,
                        network: self.network.to_string(),
                    });
                }
                match owner(&st, a) {
                    Some(o) if o == job => return Ok(a),
                    Some(o) => {
                        return Err(AddressError::Taken {
                            address: a,
                            owner: o,
                            job: job.to_owned(),
                        })
                    }
                    None => a,
                }
            }
            None => {
                let used: BTreeSet<Ipv4Addr> = st.jobs.values().flatten().copied().collect();
                let n = self.network.hosts();
                let found = (0..n)
                    .map(|k| (st.next + k) % n)
                    .find(|i| self.network.host(*i).is_some_and(|a| !used.contains(&a)));
                let i = found.ok_or_else(|| AddressError::Exhausted(self.network.to_string()))?;
                next = (i + 1) % n;
                self.network
                    .host(i)
                    .ok_or_else(|| AddressError::Exhausted(self.network.to_string()))?
            }
        };
        let mut new = st.clone();
        new.next = next;
        new.jobs.entry(job.to_owned()).or_default().insert(address);
        self.save(&new)?;
        *st = new;
        tracing::info!(job, %address, "job address granted");
        Ok(address)
    }

    /// The answer to an agent's AddressRequest.
    pub fn answer(&self, req: &pb::AddressRequest) -> pb::AddressGrant {
        let mut g = pb::AddressGrant {
            job: req.job.clone(),
            request_id: req.request_id,
            network: self.network.to_string(),
            ..Default::default()
        };
        let want = if req.address.is_empty() {
            Ok(None)
        } else {
            req.address
                .parse::<Ipv4Addr>()
                .map(Some)
                .map_err(|_| format!("{:?} is not an IPv4 address", req.address))
        };
        let r = match want {
            Ok(want) if ckpt_protocol::manifest::check_name("job", &req.job).is_ok() => {
                self.grant(&req.job, want).map_err(|e| e.to_string())
            }
            Ok(_) => Err(format!("{:?} is not a job name", req.job)),
            Err(e) => Err(e),
        };
        match r {
            Ok(a) => g.address = a.to_string(),
            Err(e) => g.error = e,
        }
        g
    }

    fn save(&self, st: &State) -> Result<(), AddressError> {
        let err = |what: &'static str| {
            let path = self.path.clone();
            move |source| AddressError::Io { path, what, source }
        };
        let bytes = serde_json::to_vec_pretty(st).map_err(|e| AddressError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).map_err(err("create the directory of"))?;
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(err("create a temp file next to"))?;
        f.write_all(&bytes).map_err(err("write"))?;
        f.sync_all().map_err(err("fsync"))?;
        fs::rename(&tmp, &self.path).map_err(err("rename into place"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("fsync the directory of"))?;
        Ok(())
    }
}

/// The answer when no job network is configured: no address, no network
/// (the agent then gives the tree loopback only).
pub fn no_network(req: &pb::AddressRequest) -> pb::AddressGrant {
    pb::AddressGrant {
        job: req.job.clone(),
        request_id: req.request_id,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> JobNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn grants_are_unique_durable_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addresses.json");
        let a = Addresses::open(net("10.211.0.0/16"), &path).unwrap();
        let x1 = a.grant("a", None).unwrap();
        let x2 = a.grant("a", None).unwrap();
        let y1 = a.grant("b", None).unwrap();
        assert_eq!(x1, Ipv4Addr::new(10, 211, 0, 1));
        assert_ne!(x1, x2);
        assert_ne!(y1, x1);
        assert_ne!(y1, x2);
        // A restarted coordinator knows them all.
        drop(a);
        let a = Addresses::open(net("10.211.0.0/16"), &path).unwrap();
        assert_eq!(a.grant("a", Some(x1)).unwrap(), x1);
        let e = a.grant("b", Some(x1)).unwrap_err().to_string();
        assert!(e.contains("belongs to job a"), "{e}");
        let z = a.grant("c", None).unwrap();
        assert!(![x1, x2, y1].contains(&z), "{z} handed out twice");
        // An address from a manifest nobody recorded is taken for the job.
        let w = Ipv4Addr::new(10, 211, 9, 9);
        assert_eq!(a.grant("d", Some(w)).unwrap(), w);
        assert!(a.grant("e", Some(w)).is_err());
        let e = a
            .grant("a", Some(Ipv4Addr::new(10, 9, 0, 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in job network 10.211.0.0/16"), "{e}");
    }

    #[test]
    fn a_full_network_is_refused_and_a_changed_network_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addresses.json");
        let a = Addresses::open(net("10.5.0.0/30"), &path).unwrap();
        a.grant("a", None).unwrap();
        a.grant("b", None).unwrap();
        let e = a.grant("c", None).unwrap_err().to_string();
        assert!(e.contains("no free address"), "{e}");
        drop(a);
        let e = Addresses::open(net("10.6.0.0/16"), &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("was made for job network 10.5.0.0/30"), "{e}");
        fs::write(&path, b"{not json").unwrap();
        let e = Addresses::open(net("10.5.0.0/30"), &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not valid"), "{e}");
    }

    #[test]
    fn answers_name_the_request_and_refuse_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let a = Addresses::open(net("10.211.0.0/16"), &dir.path().join("s")).unwrap();
        let req = pb::AddressRequest {
            job: "j".into(),
            request_id: 7,
            address: String::new(),
        };
        let g = a.answer(&req);
        assert_eq!((g.request_id, g.address.as_str()), (7, "10.211.0.1"));
        assert_eq!(g.network, "10.211.0.0/16");
        let bad = pb::AddressRequest {
            address: "nope".into(),
            ..req.clone()
        };
        assert!(a.answer(&bad).error.contains("not an IPv4 address"));
        let bad = pb::AddressRequest {
            job: "../x".into(),
            ..req
        };
        assert!(a.answer(&bad).error.contains("not a job name"));
    }
}
