//! A test cluster: N "nodes" on this machine, each a network namespace with
//! its own address and a UTS namespace with its own hostname, joined by a
//! Linux bridge.
//!
//! # Topology
//!
//! ```text
//!   root netns (untouched: no link, address, route, sysctl or iptables rule)
//!
//!   <prefix>sw  "switch" netns:  br0 ── p0 ── veth ── eth0  <prefix>n0  10.A.B.1/24
//!                                    ├─ p1 ── veth ── eth0  <prefix>n1  10.A.B.2/24
//!                                    └─ …
//! ```
//!
//! * `<prefix>` is `ckt<pid>s<starttime>x<k>-`: the creating process's pid and
//!   start time (clock ticks since boot, so a reused pid is not mistaken for
//!   the creator) and a per-process counter. Parallel tests and leftovers of
//!   other runs never collide, and [`TestCluster::sweep_stale`] can tell
//!   whether a leftover's creator is still alive. The trailing `-` makes
//!   every prefix match exact (cluster `x1-` never matches `x12-…`).
//! * The bridge lives in its own "switch" namespace, not in the root
//!   namespace: the host's namespace gets no interface at all, so the node
//!   addresses are not routable from it, nothing needs forwarding or NAT, and
//!   a crashed run leaves nothing in the host's `ip link`. Deleting the switch
//!   namespace removes the bridge and every switch-side veth end in one go.
//!   The bridge has no address (pure L2); the nodes have only their connected
//!   /24 route — no default route, so nothing can leave the cluster.
//! * The subnet is a /24 in 10.128.0.0/9 picked from the pid and counter,
//!   skipping anything that overlaps an address or route of the root
//!   namespace (so the "not routable" checks stay meaningful). Two clusters
//!   may share a subnet: their bridges are in different namespaces.
//! * Hostname of a node = its netns name (unique, so Open MPI session dirs
//!   etc. in the shared /tmp of parallel clusters never collide). There is no
//!   name resolution for it (that would need a private /etc/hosts, i.e. a
//!   mount namespace); [`TestCluster::hosts`] gives hosts(5) lines if a test
//!   wants to feed a launcher's hostfile.
//! * Each node's UTS namespace is held by a "holder" process (`cat` reading a
//!   pipe whose write end only this process has, argv[0]
//!   `ckpt-node-holder:<node>`). It is itself inside the node's net and UTS
//!   namespaces; it exits by itself when this process dies (EOF), so even a
//!   SIGKILLed test leaves no holder behind.
//!
//! # Running things on a node
//!
//! [`Node::command`] returns a [`Command`] that enters the node's network
//! and UTS namespaces in the child (`setns` on fds opened beforehand, then
//! exec) — never a mount namespace: `ip netns exec` creates one, and CRIU
//! cannot dump a process in it. [`Node::nsenter`] does the same through the
//! `nsenter` binary, for when the command line must be self-contained.
//! [`Node::spawn`] additionally records the pid for cleanup.
//!
//! Not provided: a private /tmp and /dev/shm per node. They would need a
//! mount namespace per node, which CRIU cannot dump on this platform (see
//! DESIGN.md). Nodes share the host's filesystem — which also serves as the
//! "shared filesystem" for images — and filesystem Unix sockets work across
//! nodes (abstract ones do not: they are per network namespace).
//!
//! # Cleanup
//!
//! On drop (also while unwinding from a panic, and if [`TestCluster::new`]
//! itself fails half-way): every process on the nodes is SIGKILLed — pids
//! recorded by [`Node::spawn`] and their descendants, plus any process whose
//! network *or* UTS namespace is one of the cluster's (found by namespace
//! inode through `/proc/*/ns`; the UTS check catches processes that moved to
//! a network namespace of their own, as a node agent does for a job), plus
//! processes whose command line names the prefix. The namespaces searched
//! for stay open (fds) during the search, so their inodes — which the
//! kernel reuses — cannot meanwhile name a namespace of a parallel test.
//! Then the node and switch namespaces are deleted, which destroys the veths
//! and the bridge. The
//! harness adds no iptables rule and no mount other than the `/run/netns/*`
//! bind mounts `ip netns` manages. `TestCluster::new` first calls
//! [`TestCluster::sweep_stale`] (once per process), which does the same for
//! clusters whose creator is dead (a SIGKILLed or aborted test run).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every cluster's prefix starts with this.
pub const PREFIX_TAG: &str = "ckt";
/// argv[0] of the UTS-namespace holders (followed by the node name).
pub const HOLDER_TAG: &str = "ckpt-node-holder:";

/// The lock file serializing [`TestCluster::sweep_stale`] machine-wide.
pub const SWEEP_LOCK: &str = "/run/ckpt-e2e-cluster-sweep.lock";

/// Holds the sweep lock (see [`TestCluster::sweep_lock`]) until dropped.
#[derive(Debug)]
pub struct SweepGuard(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

static CLUSTER_SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP_ONCE: Once = Once::new();

/// True if the cluster harness can run: root, `ip` and `nsenter`. Same
/// semantics as [`crate::require`]: under `CI=true` a missing prerequisite
/// panics; elsewhere it prints why the test is skipped and returns false.
pub fn require_cluster(test: &str) -> bool {
    let mut why = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        why.push("not running as root".to_string());
    }
    for (bin, arg) in [("ip", "-V"), ("nsenter", "--version")] {
        let ok = Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            why.push(format!("`{bin}` not found (iproute2 / util-linux)"));
        }
    }
    if why.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: prerequisite missing: {} (run scripts/bootstrap.sh as root)",
        why.join("; ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// One node of a [`TestCluster`].
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    ip: Ipv4Addr,
    prefix_len: u8,
    net_fd: Arc<OwnedFd>,
    uts_fd: Arc<OwnedFd>,
    holder_pid: u32,
    tracked: Arc<Mutex<Vec<(i32, u64)>>>,
}

impl Node {
    /// 0-based index in the cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Name of the node's network namespace (`ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's hostname (what `hostname` prints on it): its netns name.
    pub fn hostname(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port` on this node.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// `10.A.B.C/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// An fd of the network namespace (valid while the node lives), e.g. to
    /// pass to CRIU with `--inherit-fd`.
    pub fn netns_fd(&self) -> BorrowedFd<'_> {
        self.net_fd.as_fd()
    }

    /// Inode of the network namespace (`net:[inode]` in /proc/*/ns/net).
    pub fn netns_inode(&self) -> u64 {
        fd_inode(&self.net_fd)
    }

    /// `/proc/<holder>/ns/uts`: a path of the UTS namespace.
    pub fn uts_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/uts", self.holder_pid))
    }

    pub fn uts_fd(&self) -> BorrowedFd<'_> {
        self.uts_fd.as_fd()
    }

    pub fn uts_inode(&self) -> u64 {
        fd_inode(&self.uts_fd)
    }

    /// Pid of the process holding the UTS namespace.
    pub fn holder_pid(&self) -> u32 {
        self.holder_pid
    }

    /// A command that runs `program` on this node: the child enters the
    /// node's network and UTS namespaces (setns on fds opened beforehand)
    /// and then execs. No mount namespace. The child's pid is the program's.
    /// Not tracked by pid (use [`Node::spawn`] for that), but found and
    /// killed at cleanup anyway through its namespaces.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        let mut c = Command::new(program);
        let net = Arc::clone(&self.net_fd);
        let uts = Arc::clone(&self.uts_fd);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; it allocates nothing
        // (io::Error::last_os_error builds an OS error code) and touches no
        // lock. The fds are kept open by the Arcs the closure owns.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(uts.as_raw_fd(), libc::CLONE_NEWUTS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// `nsenter --net=<netns path> --uts=<holder's uts> -- program`: for when
    /// the command must be a plain command line (e.g. handed to a script or a
    /// launcher). Same namespaces as [`Node::command`].
    pub fn nsenter<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        let mut c = Command::new("nsenter");
        c.args(self.nsenter_args()).arg("--").arg(program);
        c
    }

    /// The `nsenter` options that enter this node.
    pub fn nsenter_args(&self) -> Vec<String> {
        vec![
            format!("--net={}", self.netns_path().display()),
            format!("--uts={}", self.uts_path().display()),
        ]
    }

    /// Spawns `cmd` (normally made by [`Node::command`]) and records its pid
    /// (with its start time, so a reused pid is never killed) for cleanup,
    /// which kills it and its descendants and reaps it if it is a zombie. If
    /// you hold the [`Child`] past the cluster's drop, `wait` on it fails.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        if let Some(st) = proc_starttime(pid) {
            self.tracked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((pid, st));
        }
        Ok(child)
    }

    /// Runs `f` on a fresh thread that has entered the node's network and
    /// UTS namespaces, and returns its result. Sockets made in `f` belong to
    /// the node's network namespace (and keep belonging to it when used from
    /// other threads afterwards), e.g. a [`TcpListener`] "on" the node owned
    /// by the test itself.
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(self.net_fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .expect("setns(net) on a thread");
                nix::sched::setns(self.uts_fd.as_fd(), CloneFlags::CLONE_NEWUTS)
                    .expect("setns(uts) on a thread");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A TCP port that is free on this node right now (bound to port 0 on
    /// the node's address, then released). Racy by nature like any
    /// free-port helper, but the node's namespace is private to the test.
    pub fn free_port(&self) -> u16 {
        self.in_netns(|| {
            TcpListener::bind(SocketAddrV4::new(self.ip, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("binding port 0 on the node")
        })
    }

    /// Host pids of the processes on this node right now: those in the
    /// node's network or UTS namespace (the holder excluded).
    pub fn pids(&self) -> Vec<i32> {
        let net: BTreeSet<u64> = [self.netns_inode()].into();
        let uts: BTreeSet<u64> = [self.uts_inode()].into();
        pids_in_namespaces(&net, &uts)
            .into_iter()
            .filter(|p| *p != self.holder_pid as i32)
            .collect()
    }

    /// SIGKILLs every process on the node (see [`Node::pids`]) and their
    /// descendants, until none is left (at most 10 s): "the node died". The
    /// node itself (namespaces, address, holder) stays usable.
    pub fn kill_all(&self) {
        let holder = self.holder_pid as i32;
        kill_until_gone(&|| {
            let mut v = Vec::new();
            for p in self.pids() {
                v.extend(crate::tree_pids(p));
            }
            v.retain(|p| *p != holder);
            v
        });
    }
}

#[derive(Debug)]
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// N network-namespace nodes on a bridge; everything is removed on drop.
#[derive(Debug)]
pub struct TestCluster {
    prefix: String,
    subnet: Ipv4Addr,
    prefix_len: u8,
    nodes: Vec<Node>,
    holders: Vec<Holder>,
    tracked: Arc<Mutex<Vec<(i32, u64)>>>,
}

impl TestCluster {
    /// Builds a cluster of `n_nodes` nodes (1..=200). Panics with the failing
    /// command's output if the kernel or `ip` refuses something; whatever was
    /// created up to then is removed (the half-built cluster is dropped).
    pub fn new(n_nodes: usize) -> Self {
        assert!(
            (1..=200).contains(&n_nodes),
            "a test cluster has 1..=200 nodes, not {n_nodes}"
        );
        SWEEP_ONCE.call_once(|| {
            Self::sweep_stale();
        });
        let me = std::process::id();
        let start = proc_starttime(me as i32).expect("own /proc/self/stat");
        let k = CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX_TAG}{me}s{start}x{k}-");
        let subnet = pick_subnet(me, k);
        let mut c = Self {
            prefix,
            subnet,
            prefix_len: 24,
            nodes: Vec::new(),
            holders: Vec::new(),
            tracked: Arc::new(Mutex::new(Vec::new())),
        };
        let sw = c.switch_netns();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..n_nodes {
            c.add_node(i);
        }
        c
    }

    fn add_node(&mut self, i: usize) {
        let name = format!("{}n{i}", self.prefix);
        let sw = self.switch_netns();
        let port = format!("p{i}");
        let o = self.subnet.octets();
        let addr = Ipv4Addr::new(o[0], o[1], o[2], u8::try_from(i + 1).unwrap_or(255));
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/{}", self.prefix_len),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);

        let net_fd: OwnedFd = fs::File::open(Path::new(NETNS_DIR).join(&name))
            .unwrap_or_else(|e| panic!("opening netns {name}: {e}"))
            .into();
        let net_fd = Arc::new(net_fd);

        // The UTS holder: enters the node's netns, unshares UTS, sets the
        // hostname, then execs `cat` on a pipe only we can write to.
        let mut cmd = Command::new("cat");
        cmd.arg0(format!("{HOLDER_TAG}{name}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let hostname = std::ffi::CString::new(name.clone()).unwrap_or_default();
        let nfd = Arc::clone(&net_fd);
        // SAFETY: runs in the forked child before exec; only setns(2),
        // unshare(2) and sethostname(2) — async-signal-safe syscalls — on
        // data allocated before the fork; no allocation, no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nfd.as_raw_fd(), libc::CLONE_NEWNET) != 0
                    || libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the UTS holder of {name}: {e}"));
        let stdin = child.stdin.take();
        let holder_pid = child.id();
        self.holders.push(Holder { child, stdin });
        // spawn() returned, so pre_exec succeeded: the namespace exists.
        let uts_fd: OwnedFd = fs::File::open(format!("/proc/{holder_pid}/ns/uts"))
            .unwrap_or_else(|e| panic!("opening the UTS namespace of {name}: {e}"))
            .into();
        self.nodes.push(Node {
            index: i,
            name,
            ip: addr,
            prefix_len: self.prefix_len,
            net_fd,
            uts_fd: Arc::new(uts_fd),
            holder_pid,
            tracked: Arc::clone(&self.tracked),
        });
    }

    /// `ckt<pid>s<starttime>x<k>-`: every namespace, hostname and holder of
    /// this cluster starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of the switch namespace (holding the bridge `br0`).
    pub fn switch_netns(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// The cluster's subnet: (network address, prefix length).
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (self.subnet, self.prefix_len)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// hosts(5) lines `IP HOSTNAME` for every node.
    pub fn hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{} {}\n", n.ip, n.hostname()))
            .collect()
    }

    /// Identities of every network and UTS namespace of the cluster (switch
    /// included), for [`leftovers`] checks after the drop.
    pub fn namespace_ids(&self) -> Vec<NsId> {
        let mut v = Vec::new();
        for n in &self.nodes {
            v.extend(NsId::of(n.net_fd.as_fd(), NsKind::Net));
            v.extend(NsId::of(n.uts_fd.as_fd(), NsKind::Uts));
        }
        if let Ok(f) = fs::File::open(Path::new(NETNS_DIR).join(self.switch_netns())) {
            v.extend(NsId::of(f.as_fd(), NsKind::Net));
        }
        v
    }

    /// Removes leftovers of clusters whose creating process is dead (pid
    /// gone, or reused: the start time in the prefix differs): processes,
    /// namespaces (and so veths and bridges). Returns the prefixes removed.
    /// Clusters of live processes — e.g. parallel tests — are not touched.
    /// Sweeps of all processes on the machine are serialized by
    /// [`TestCluster::sweep_lock`].
    pub fn sweep_stale() -> Vec<String> {
        Self::sweep_stale_with(&Self::sweep_lock())
    }

    /// Takes the machine-wide sweep lock (flock on [`SWEEP_LOCK`]): while it
    /// is held, no other process sweeps. For tests that inspect a crashed
    /// run's leftovers before sweeping them with [`TestCluster::sweep_stale_with`].
    /// Never hold it while waiting for a process that builds a cluster: its
    /// first [`TestCluster::new`] sweeps, so it would wait for you.
    pub fn sweep_lock() -> SweepGuard {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(SWEEP_LOCK)
            .unwrap_or_else(|e| panic!("opening {SWEEP_LOCK}: {e}"));
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {SWEEP_LOCK}: {e}"));
        SweepGuard(lock)
    }

    /// [`TestCluster::sweep_stale`] under a lock the caller holds.
    pub fn sweep_stale_with(_lock: &SweepGuard) -> Vec<String> {
        let mut stale = BTreeSet::new();
        for name in netns_names() {
            if let Some((prefix, pid, start)) = parse_name(&name) {
                // A zombie creator is dead too (init may reap it late).
                if !proc_alive(pid) || proc_starttime(pid) != Some(start) {
                    stale.insert(prefix);
                }
            }
        }
        for p in &stale {
            eprintln!("cluster harness: removing leftovers of {p} (creator is gone)");
            destroy(p, &[], &BTreeSet::new());
        }
        stale.into_iter().collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The node fds stay open until everything is killed: while we hold
        // them, no namespace of ours can be freed and its inode reused by a
        // namespace created meanwhile (a parallel test), which would make the
        // inode-based search kill somebody else's processes. The holders are
        // killed with the rest.
        let tracked = self
            .tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let uts: BTreeSet<u64> = self.nodes.iter().map(|n| n.uts_inode()).collect();
        destroy(&self.prefix, &tracked, &uts);
        for h in &mut self.holders {
            drop(h.stdin.take());
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
        // Now our fds go, and with them the last references.
        self.nodes.clear();
        let rest = leftovers(&self.prefix, &[]);
        if !rest.is_empty() {
            eprintln!(
                "cluster harness: {} not fully removed: {}",
                self.prefix,
                rest.join("; ")
            );
        }
    }
}

/// Kind of a namespace the harness makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsKind {
    Net,
    Uts,
}

impl NsKind {
    /// Name in /proc/*/ns and in `net:[inode]` links.
    pub fn name(self) -> &'static str {
        match self {
            NsKind::Net => "net",
            NsKind::Uts => "uts",
        }
    }

    fn flag(self) -> CloneFlags {
        match self {
            NsKind::Net => CloneFlags::CLONE_NEWNET,
            NsKind::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

/// A namespace's identity that survives its death: the inode (which the
/// kernel reuses for later namespaces) plus a tag telling a reused inode
/// apart — the network namespace cookie (`SO_NETNS_COOKIE`, never reused)
/// or the hostname of a UTS namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsId {
    pub kind: NsKind,
    pub inode: u64,
    pub tag: String,
}

impl NsId {
    /// Identity of the namespace `fd` refers to.
    pub fn of(fd: BorrowedFd<'_>, kind: NsKind) -> Option<Self> {
        let inode = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?.st_ino;
        Some(Self {
            kind,
            inode,
            tag: ns_tag(fd, kind)?,
        })
    }

    /// `net:4026532000:<cookie>` (no ',' in it).
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.kind.name(), self.inode, self.tag)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.splitn(3, ':');
        let kind = match it.next()? {
            "net" => NsKind::Net,
            "uts" => NsKind::Uts,
            _ => return None,
        };
        Some(Self {
            kind,
            inode: it.next()?.parse().ok()?,
            tag: it.next()?.to_string(),
        })
    }
}

const SO_NETNS_COOKIE: libc::c_int = 71; // asm-generic (x86, arm, …)

/// Cookie of a network namespace / hostname of a UTS namespace, read on a
/// short-lived thread that enters it.
fn ns_tag(fd: BorrowedFd<'_>, kind: NsKind) -> Option<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(fd, kind.flag()).ok()?;
            match kind {
                NsKind::Uts => nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned()),
                NsKind::Net => {
                    let sock = nix::sys::socket::socket(
                        nix::sys::socket::AddressFamily::Unix,
                        nix::sys::socket::SockType::Datagram,
                        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .ok()?;
                    let mut cookie: u64 = 0;
                    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                    // SAFETY: getsockopt writes at most `len` (8) bytes into
                    // `cookie`, a live u64, and updates `len`.
                    let r = unsafe {
                        libc::getsockopt(
                            sock.as_raw_fd(),
                            libc::SOL_SOCKET,
                            SO_NETNS_COOKIE,
                            (&mut cookie as *mut u64).cast(),
                            &mut len,
                        )
                    };
                    (r == 0).then(|| cookie.to_string())
                }
            }
        })
        .join()
        .ok()
        .flatten()
    })
}

/// Whether the namespace at `path` (a /proc/*/ns link or an nsfs fd) is
/// one of `ids`. Unknown tag (the process went away meanwhile) → no.
fn is_one_of(path: &Path, kind: NsKind, inode: u64, ids: &[NsId]) -> bool {
    let cands: Vec<&NsId> = ids
        .iter()
        .filter(|i| i.kind == kind && i.inode == inode)
        .collect();
    if cands.is_empty() {
        return false;
    }
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let Some(tag) = ns_tag(f.as_fd(), kind) else {
        return false;
    };
    cands.iter().any(|i| i.tag == tag)
}

/// What is left of a cluster: netns names, links in the root namespace and
/// mounts naming `prefix`, live processes naming it on their command line,
/// and live processes inside (or holding an fd of) a namespace in `ids` —
/// matched by inode and then by tag, so a namespace created later that got
/// a freed inode does not count. Empty = clean.
pub fn leftovers(prefix: &str, ids: &[NsId]) -> Vec<String> {
    let mut out = Vec::new();
    for n in netns_names() {
        if n.starts_with(prefix) {
            out.push(format!("netns {n}"));
        }
    }
    if let Ok(o) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if l.contains(prefix) {
                out.push(format!("link {l}"));
            }
        }
    }
    if let Ok(m) = fs::read_to_string("/proc/self/mountinfo") {
        for l in m.lines() {
            if l.contains(prefix) {
                out.push(format!("mount {l}"));
            }
        }
    }
    let me = std::process::id() as i32;
    for pid in all_pids() {
        if pid == me || !proc_alive(pid) {
            continue;
        }
        if let Ok(c) = fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(prefix) {
                out.push(format!("process {pid} ({})", c.trim()));
                continue;
            }
        }
        if ids.is_empty() {
            continue;
        }
        let mut hit = None;
        for kind in [NsKind::Net, NsKind::Uts] {
            let link = PathBuf::from(format!("/proc/{pid}/ns/{}", kind.name()));
            if let Some(i) = ns_inode(pid, kind.name()) {
                if is_one_of(&link, kind, i, ids) {
                    hit = Some(format!("process {pid} in {}:[{i}]", kind.name()));
                    break;
                }
            }
        }
        if hit.is_none() {
            if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) {
                for e in rd.flatten() {
                    let Ok(t) = fs::read_link(e.path()) else {
                        continue;
                    };
                    let t = t.to_string_lossy().into_owned();
                    if let Some((kind, i)) = nsfs_link(&t) {
                        if is_one_of(&e.path(), kind, i, ids) {
                            hit = Some(format!("process {pid} holds {t}"));
                            break;
                        }
                    }
                }
            }
        }
        out.extend(hit);
    }
    out
}

/// Kills everything of cluster `prefix` and deletes its namespaces.
/// `uts` are UTS inodes known to belong to the cluster (its holders'); for a
/// stale cluster they are found from the processes still in its netns.
fn destroy(prefix: &str, tracked: &[(i32, u64)], uts: &BTreeSet<u64>) {
    let names: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    // Every namespace searched for by inode is held open until the end, so
    // that its inode cannot be reused meanwhile (see Drop).
    let mut held: Vec<fs::File> = Vec::new();
    let mut net = BTreeSet::new();
    for n in &names {
        if let Ok(f) = fs::File::open(Path::new(NETNS_DIR).join(n)) {
            if let Ok(m) = f.metadata() {
                net.insert(m.ino());
                held.push(f);
            }
        }
    }
    let mut uts = uts.clone();
    // Never treat the host's (or our own) UTS namespace as a node's.
    let host_uts: BTreeSet<u64> = [
        ns_inode(1, "uts"),
        ns_inode(std::process::id() as i32, "uts"),
    ]
    .into_iter()
    .flatten()
    .collect();
    for pid in pids_in_namespaces(&net, &BTreeSet::new()) {
        if let Ok(f) = fs::File::open(format!("/proc/{pid}/ns/uts")) {
            if let Ok(m) = f.metadata() {
                if uts.insert(m.ino()) {
                    held.push(f);
                }
            }
        }
    }
    uts.retain(|u| !host_uts.contains(u));

    let collect = || {
        let mut roots = pids_in_namespaces(&net, &uts);
        roots.extend(
            tracked
                .iter()
                .filter(|(p, st)| proc_starttime(*p) == Some(*st))
                .map(|(p, _)| *p),
        );
        roots.extend(pids_naming(prefix));
        let mut all = Vec::new();
        for r in roots {
            all.extend(crate::tree_pids(r));
        }
        all
    };
    kill_until_gone(&|| {
        // Reap our own children among them (tracked spawns), so they do not
        // linger as zombies.
        for (p, _) in tracked {
            let _ = waitpid(Pid::from_raw(*p), Some(WaitPidFlag::WNOHANG));
        }
        collect()
    });
    for (p, _) in tracked {
        let _ = waitpid(Pid::from_raw(*p), Some(WaitPidFlag::WNOHANG));
    }

    // Nodes first, then the switch (the order does not matter for the
    // kernel: deleting either end of a veth deletes the pair).
    let mut names = names;
    names.sort_by_key(|n| n.ends_with("sw"));
    for n in names {
        let ok = Command::new("ip")
            .args(["netns", "del", &n])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // A half-made entry (file without a mount): remove it by hand.
            let p = Path::new(NETNS_DIR).join(&n);
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    eprintln!("cluster harness: cannot remove netns {n}: {e}");
                }
            }
        }
    }
    drop(held);
}

/// SIGKILLs what `pids` returns (never pid 1 or ourselves) until it returns
/// nothing alive; gives up with a warning after 10 s.
fn kill_until_gone(pids: &dyn Fn() -> Vec<i32>) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut v: Vec<i32> = pids()
            .into_iter()
            .filter(|p| *p > 1 && *p != me && proc_alive(*p))
            .collect();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return;
        }
        for p in &v {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        if Instant::now() > deadline {
            eprintln!("cluster harness: processes survive SIGKILL: {v:?}");
            return;
        }
        sleep(Duration::from_millis(10));
    }
}

/// Live processes whose network namespace is in `net` or UTS namespace is in
/// `uts` (main thread's view).
fn pids_in_namespaces(net: &BTreeSet<u64>, uts: &BTreeSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter(|p| {
            ns_inode(*p, "net").is_some_and(|i| net.contains(&i))
                || ns_inode(*p, "uts").is_some_and(|i| uts.contains(&i))
        })
        .collect()
}

/// Live processes whose command line contains `needle` (not ourselves).
fn pids_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn ns_inode(pid: i32, kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// `net:[4026532000]` → (Net, 4026532000); also `uts:[…]`.
fn nsfs_link(target: &str) -> Option<(NsKind, u64)> {
    [NsKind::Net, NsKind::Uts].into_iter().find_map(|k| {
        let i = target
            .strip_prefix(k.name())?
            .strip_prefix(":[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        Some((k, i))
    })
}

fn fd_inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .map(|s| s.st_ino)
        .unwrap_or(0)
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot).
fn proc_starttime(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces/parens).
    let rest = &s[s.rfind(')')? + 2..];
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Exists and is neither a zombie nor dead.
fn proc_alive(pid: i32) -> bool {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = s
        .rfind(')')
        .and_then(|i| s[i + 1..].split_whitespace().next())
        .unwrap_or("X");
    !matches!(state, "Z" | "X" | "x")
}

fn netns_names() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(PREFIX_TAG))
                .collect()
        })
        .unwrap_or_default()
}

/// `ckt<pid>s<start>x<k>-(n<i>|sw)` → (prefix with its '-', pid, start).
fn parse_name(name: &str) -> Option<(String, i32, u64)> {
    let (head, tail) = name.split_once('-')?;
    let rest = head.strip_prefix(PREFIX_TAG)?;
    let (pid, rest) = rest.split_once('s')?;
    let (start, k) = rest.split_once('x')?;
    let num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let is_node = tail.strip_prefix('n').is_some_and(num);
    if !num(k) || !(is_node || tail == "sw") {
        return None;
    }
    Some((format!("{head}-"), pid.parse().ok()?, start.parse().ok()?))
}

/// Runs `ip ARGS`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ip: {e}"));
    assert!(
        o.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

/// IPv4 prefixes (network, length) of the root namespace's addresses and
/// routes (all tables), default routes excluded.
pub fn host_prefixes() -> Vec<(Ipv4Addr, u8)> {
    let mut out = Vec::new();
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for l in run(&["-4", "-o", "addr", "show"]).lines() {
        let mut it = l.split_whitespace();
        while let Some(t) = it.next() {
            if t == "inet" {
                out.extend(it.next().and_then(parse_prefix));
                break;
            }
        }
    }
    const TYPES: [&str; 10] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "unreachable",
        "prohibit",
        "blackhole",
        "throw",
        "anycast",
        "nat",
    ];
    for l in run(&["-4", "route", "show", "table", "all"]).lines() {
        let mut it = l.split_whitespace();
        let mut dst = it.next();
        if dst.is_some_and(|t| TYPES.contains(&t)) {
            dst = it.next();
        }
        out.extend(dst.and_then(parse_prefix));
    }
    out
}

/// `a.b.c.d[/n]` → (network, n); `default` and garbage → None.
fn parse_prefix(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (s, 32),
    };
    let a: Ipv4Addr = a.parse().ok()?;
    (len <= 32).then(|| (mask(a, len), len))
}

fn mask(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let m = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Addr::from(u32::from(a) & m)
}

/// True if the two prefixes share an address.
pub fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let l = a.1.min(b.1);
    mask(a.0, l) == mask(b.0, l)
}

/// A /24 in 10.128.0.0/9 derived from (pid, k) that overlaps nothing of the
/// root namespace.
fn pick_subnet(pid: u32, k: u32) -> Ipv4Addr {
    let host = host_prefixes();
    let mut h = pid.wrapping_mul(2_654_435_761) ^ k.wrapping_mul(40_503);
    for _ in 0..4096 {
        let cand = Ipv4Addr::new(10, 128 | ((h >> 8) & 0x7f) as u8, (h & 0xff) as u8, 0);
        // 0.0/24 and .255/24 are fine technically; skip them anyway.
        let ok = cand.octets()[2] != 0
            && cand.octets()[2] != 255
            && !host
                .iter()
                .filter(|p| p.1 > 0)
                .any(|p| overlaps(*p, (cand, 24)));
        if ok {
            return cand;
        }
        h = h.wrapping_add(1);
    }
    panic!("no free /24 in 10.128.0.0/9 (host routes: {host:?})");
}

/// Clusters that have namespaces right now: prefix → netns names.
pub fn live_cluster_prefixes() -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in netns_names() {
        if let Some((p, _, _)) = parse_name(&n) {
            m.entry(p).or_default().push(n);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_name("ckt123s456x7-n0"),
            Some(("ckt123s456x7-".into(), 123, 456))
        );
        assert_eq!(
            parse_name("ckt123s456x17-sw"),
            Some(("ckt123s456x17-".into(), 123, 456))
        );
        assert_eq!(parse_name("ckt123s456x7-"), None);
        assert_eq!(parse_name("ckt123s456x-n1"), None);
        assert_eq!(parse_name("ckt123s456x7-n"), None);
        assert_eq!(parse_name("other"), None);
        // The '-' keeps cluster 1 from matching cluster 12 by prefix.
        assert!(!"ckt1s2x12-n0".starts_with("ckt1s2x1-"));
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix("10.1.2.3/8"),
            Some((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_prefix("default"), None);
        assert!(overlaps(
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            (Ipv4Addr::new(10, 200, 1, 0), 24)
        ));
        assert!(!overlaps(
            (Ipv4Addr::new(192, 0, 2, 0), 24),
            (Ipv4Addr::new(10, 200, 1, 0), 24)
        ));
        assert_eq!(
            nsfs_link("net:[4026532000]"),
            Some((NsKind::Net, 4026532000))
        );
        assert_eq!(nsfs_link("uts:[5]"), Some((NsKind::Uts, 5)));
        assert_eq!(nsfs_link("/dev/null"), None);
        let id = NsId {
            kind: NsKind::Uts,
            inode: 7,
            tag: "a:b".into(),
        };
        assert_eq!(NsId::decode(&id.encode()), Some(id));
    }
}
