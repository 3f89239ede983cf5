//! Client of the MPI drain shim's per-rank control sockets
//! (`$CKPT_SHIM_DIR/<world rank>.sock`, see mpi-shim/README.md).
//!
//! A tree's ranks find their directory in `CKPT_SHIM_DIR` (set by
//! `ckpt-job rsh-exec` for the tree's command); the agent finds it in the
//! environment of the tree's processes. [`drain`] sends `DRAIN` to every
//! rank and waits for all `READY` lines within a deadline; the connections
//! stay open in [`Parked`]: the ranks are parked in the shim until they are
//! dropped (closed: the shim resumes a rank whose agent went away) or
//! [`Parked::resume`]d. The agent closes them before the dump (a connection
//! to a process outside the tree cannot be dumped), so a thawed or restored
//! rank reads end-of-file and resumes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable naming a tree's shim socket directory.
pub const SHIM_DIR_ENV: &str = "CKPT_SHIM_DIR";

/// One rank's `READY` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RankReady {
    pub rank: u32,
    pub sent: u64,
    pub received: u64,
    pub stashed: u64,
    pub rounds: u64,
}

/// Parses `READY sent=<n> received=<n> stashed=<n> rounds=<n>`.
pub fn parse_ready(rank: u32, line: &str) -> Result<RankReady, String> {
    let line = line.trim_end();
    let rest = line
        .strip_prefix("READY ")
        .ok_or_else(|| format!("rank {rank} answered {line:?}, not READY"))?;
    let mut r = RankReady {
        rank,
        ..Default::default()
    };
    for kv in rest.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("rank {rank}: bad READY field {kv:?} in {line:?}"))?;
        let v: u64 = v
            .parse()
            .map_err(|_| format!("rank {rank}: bad number in {kv:?} of {line:?}"))?;
        match k {
            "sent" => r.sent = v,
            "received" => r.received = v,
            "stashed" => r.stashed = v,
            "rounds" => r.rounds = v,
            _ => {} // newer shims may add fields
        }
    }
    Ok(r)
}

/// The distinct `CKPT_SHIM_DIR`s in the environments of `pids`.
pub fn shim_dirs(pids: &[i32]) -> Vec<PathBuf> {
    let mut dirs = BTreeSet::new();
    let key = format!("{SHIM_DIR_ENV}=");
    for pid in pids {
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            if let Some(v) = var.strip_prefix(key.as_bytes()) {
                let v = String::from_utf8_lossy(v).into_owned();
                if Path::new(&v).is_absolute() {
                    dirs.insert(PathBuf::from(v));
                }
            }
        }
    }
    dirs.into_iter().collect()
}

/// The rank sockets (`<rank>.sock`) in `dirs`, by rank, to connect to
/// from `netns`.
pub fn rank_sockets(dirs: &[PathBuf], netns: Option<&Path>) -> Vec<RankSocket> {
    let mut v = Vec::new();
    for d in dirs {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rank) = name
                .strip_suffix(".sock")
                .and_then(|r| r.parse::<u32>().ok())
            {
                v.push(RankSocket {
                    rank,
                    path: e.path(),
                    netns: netns.map(Path::to_path_buf),
                });
            }
        }
    }
    v.sort_by_key(|s| s.rank);
    v
}

/// Connections to drained (or draining) ranks. Dropping closes them, which
/// resumes the ranks.
#[derive(Debug, Default)]
pub struct Parked {
    conns: Vec<(u32, UnixStream)>,
}

impl Parked {
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Sends RESUME to every rank and waits (up to `limit` in all) for
    /// RESUMED; a rank that does not answer is resumed by the close anyway.
    pub fn resume(self, limit: Duration) {
        let end = Instant::now() + limit;
        for (_, s) in &self.conns {
            let _ = (&*s).write_all(b"RESUME\n");
        }
        for (rank, s) in &self.conns {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                break;
            }
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_err() || line.trim_end() != "RESUMED" {
                tracing::debug!(rank, answer = %line.trim_end(), "rank did not answer RESUMED");
            }
        }
    }
}

/// Connects to `path` from network namespace `netns` (a `/proc/<pid>/ns/net`;
/// None: ours). The server's end of a Unix stream connection lives in the
/// connecting socket's namespace: a rank's end must be in its tree's
/// namespace, or CRIU does not find it there when it dumps the tree.
fn connect_in(netns: Option<&Path>, path: &Path) -> std::io::Result<UnixStream> {
    let Some(ns) = netns else {
        return UnixStream::connect(path);
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = fs::File::open(ns)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            UnixStream::connect(path)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
    })
}

/// A rank's control socket, and the network namespace to connect from
/// (its tree's; see [`connect_in`]).
#[derive(Debug, Clone)]
pub struct RankSocket {
    pub rank: u32,
    pub path: PathBuf,
    pub netns: Option<PathBuf>,
}

/// Sends DRAIN to every socket at once, then waits for every READY until
/// `deadline`. The connections are returned in any case (drop them to
/// resume the ranks); the result is every rank's counts, or why the drain
/// failed (a FAIL, a rank gone, the deadline).
pub fn drain(socks: &[RankSocket], deadline: Duration) -> (Parked, Result<Vec<RankReady>, String>) {
    let end = Instant::now() + deadline;
    let mut parked = Parked::default();
    for RankSocket { rank, path, netns } in socks {
        match connect_in(netns.as_deref(), path) {
            Ok(mut s) => {
                if let Err(e) = s.write_all(b"DRAIN\n") {
                    return (
                        parked,
                        Err(format!(
                            "rank {rank}: sending DRAIN to {}: {e}",
                            path.display()
                        )),
                    );
                }
                parked.conns.push((*rank, s));
            }
            // A rank that ended leaves no listener: nothing to drain there.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::debug!(rank, path = %path.display(), "stale shim socket");
            }
            Err(e) => {
                return (
                    parked,
                    Err(format!(
                        "rank {rank}: connecting to {}: {e}",
                        path.display()
                    )),
                )
            }
        }
    }
    let r = collect(&parked, end, deadline);
    (parked, r)
}

/// Reads every READY of `parked` until `end`.
fn collect(parked: &Parked, end: Instant, deadline: Duration) -> Result<Vec<RankReady>, String> {
    let mut ready = Vec::with_capacity(parked.conns.len());
    for (rank, s) in &parked.conns {
        let left = end.saturating_duration_since(Instant::now());
        let timeout = || {
            format!(
                "rank {rank} did not reach a drain point within {} ms (stuck outside MPI?)",
                deadline.as_millis()
            )
        };
        if left.is_zero() {
            return Err(timeout());
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return Err(format!("rank {rank}: {e}"));
        }
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line) {
            Ok(0) => return Err(format!("rank {rank} closed its drain socket (it ended?)")),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout())
            }
            Err(e) => return Err(format!("rank {rank}: reading READY: {e}")),
        }
        if let Some(why) = line.trim_end().strip_prefix("FAIL") {
            return Err(format!("rank {rank} refused the drain:{why}"));
        }
        match parse_ready(*rank, &line) {
            Ok(r) => ready.push(r),
            Err(e) => return Err(e),
        }
    }
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn ready_line_parses_and_rejects() {
        let r = parse_ready(3, "READY sent=5 received=4 stashed=1 rounds=2\n").unwrap();
        assert_eq!(
            r,
            RankReady {
                rank: 3,
                sent: 5,
                received: 4,
                stashed: 1,
                rounds: 2
            }
        );
        assert!(parse_ready(1, "FAIL x").unwrap_err().contains("not READY"));
        assert!(parse_ready(1, "READY sent=x")
            .unwrap_err()
            .contains("bad number"));
    }

    #[test]
    fn drain_collects_ready_times_out_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let l0 = UnixListener::bind(dir.path().join("0.sock")).unwrap();
        let l1 = UnixListener::bind(dir.path().join("1.sock")).unwrap();
        // A stale socket file: its rank is gone.
        drop(UnixListener::bind(dir.path().join("7.sock")).unwrap());
        let socks = rank_sockets(&[dir.path().to_path_buf()], None);
        assert_eq!(socks.iter().map(|s| s.rank).collect::<Vec<_>>(), [0, 1, 7]);
        let rank = |l: UnixListener, answer: bool| {
            std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert_eq!(line, "DRAIN\n");
                if !answer {
                    std::thread::sleep(Duration::from_millis(500));
                    return String::new();
                }
                (&s).write_all(b"READY sent=1 received=2 stashed=0 rounds=1\n")
                    .unwrap();
                line.clear();
                r.read_line(&mut line).unwrap();
                (&s).write_all(b"RESUMED\n").unwrap();
                line
            })
        };
        let (a, b) = (rank(l0, true), rank(l1, true));
        let (parked, r) = drain(&socks, Duration::from_secs(5));
        let r = r.unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].received, 2);
        parked.resume(Duration::from_secs(5));
        assert_eq!(a.join().unwrap(), "RESUME\n");
        assert_eq!(b.join().unwrap(), "RESUME\n");

        let l2 = UnixListener::bind(dir.path().join("2.sock")).unwrap();
        let c = rank(l2, false);
        // Connected from a namespace named by path (our own here).
        let two = RankSocket {
            rank: 2,
            path: dir.path().join("2.sock"),
            netns: Some(PathBuf::from("/proc/self/ns/net")),
        };
        let (_parked, r) = drain(&[two], Duration::from_millis(100));
        assert!(r.unwrap_err().contains("did not reach a drain point"));
        c.join().unwrap();
    }
}
