//! The test-cluster harness itself: per-node hostnames, TCP between nodes,
//! isolation from the host, and cleanup (drop, panic, crashed creator).
//!
//! Programs run on the nodes are this test binary itself, re-executed with
//! `CKT_HELPER=<mode>` to run only [`node_helper`] (a tiny std::net listener
//! or client, or a "crashing" cluster creator): no python, nc or socat.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{
    host_prefixes, leftovers, overlaps, require_cluster, Node, NsId, TestCluster, HOLDER_TAG,
};
use ckpt_e2e::{run_with_timeout, text};

const T: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The helper, run on nodes as a re-executed copy of this binary.

/// Does nothing in a normal run. With `CKT_HELPER` set (by [`helper`]):
/// - `listen`: listens on `CKT_ADDR`, prints `HELPER LISTENING`, then for
///   each connection `HELPER ACCEPT <peer>` and sends `hello from <host>`;
/// - `connect`: connects to `CKT_ADDR`, prints `HELPER CONNECTED <local>
///   <line received>`, or `HELPER ERROR <error>` and exits 1;
/// - `crash`: builds a 2-node cluster, starts processes on it, prints
///   `HELPER PREFIX <prefix> <ns inodes>` and waits to be SIGKILLed.
#[test]
fn node_helper() {
    let Ok(mode) = std::env::var("CKT_HELPER") else {
        return;
    };
    let addr = || -> SocketAddr { std::env::var("CKT_ADDR").unwrap().parse().unwrap() };
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let say = |s: String| {
        let mut o = std::io::stdout().lock();
        writeln!(o, "HELPER {s}").unwrap();
        o.flush().unwrap();
    };
    match mode.as_str() {
        "listen" => {
            let l = TcpListener::bind(addr()).unwrap();
            say(format!("LISTENING {}", l.local_addr().unwrap()));
            for s in l.incoming() {
                let mut s = s.unwrap();
                say(format!("ACCEPT {}", s.peer_addr().unwrap()));
                let _ = writeln!(s, "hello from {host}");
            }
        }
        "connect" => match TcpStream::connect_timeout(&addr(), Duration::from_secs(5)) {
            Ok(s) => {
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                say(format!(
                    "CONNECTED {} {}",
                    s.local_addr().unwrap(),
                    line.trim()
                ));
            }
            Err(e) => {
                say(format!("ERROR {e}"));
                std::process::exit(1);
            }
        },
        // The processes started here must outlive this helper (it is
        // SIGKILLed): nobody waits for them but the sweep.
        #[allow(clippy::zombie_processes)]
        "crash" => {
            let c = TestCluster::new(2);
            let n1 = c.node(1);
            // Untracked, tracked, and one in a network namespace of its own.
            // (No stdio of ours: they outlive us and must not hold a pipe.)
            let quiet = |mut c: Command| {
                c.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                c
            };
            let mut a = quiet(n1.command("sleep"));
            a.arg("1000").spawn().unwrap();
            let mut b = quiet(c.node(0).command("sleep"));
            c.node(0).spawn(b.arg("1001")).unwrap();
            let mut u = quiet(n1.command("unshare"));
            u.args(["--net", "sleep", "1002"]).spawn().unwrap();
            wait_until(|| n1.pids().len() >= 2, "processes on the node");
            let inodes: Vec<String> = c.namespace_ids().iter().map(NsId::encode).collect();
            say(format!("PREFIX {} {}", c.prefix(), inodes.join(",")));
            loop {
                sleep(Duration::from_secs(1));
            }
        }
        m => panic!("unknown CKT_HELPER mode {m}"),
    }
}

/// A running helper; its stdout lines arrive on a channel. Killed on drop.
struct Helper {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Helper {
    /// Starts this test binary in `mode` — on `node` if given (tracked).
    fn start(node: Option<&Node>, mode: &str, addr: Option<SocketAddr>) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut c = match node {
            Some(n) => n.command(&exe),
            None => Command::new(&exe),
        };
        c.args(["node_helper", "--exact", "--nocapture", "--test-threads=1"])
            .env("CKT_HELPER", mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(a) = addr {
            c.env("CKT_ADDR", a.to_string());
        }
        // SAFETY: prctl(2) only, async-signal-safe, in the child before exec.
        // The helper dies with the thread that started it, also when the
        // whole test process is SIGKILLed.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match node {
            Some(n) => n.spawn(&mut c).unwrap(),
            None => c.spawn().unwrap(),
        };
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest may have written "test node_helper ... " first.
                if let Some(i) = l.find("HELPER ") {
                    if tx.send(l[i + 7..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The next helper line starting with `word` (earlier ones are kept in
    /// `seen`). Panics after `timeout`.
    fn expect(&mut self, word: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if let Some(rest) = l.strip_prefix(word) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => panic!("no helper line {word:?} ({e}); seen: {:?}", self.seen),
            }
        }
    }

    /// Every line that arrived so far.
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

/// Runs `c` to completion; (success, stdout, stderr).
fn run(c: Command) -> (bool, String, String) {
    let o = run_with_timeout(c, T);
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

fn run_ok(c: Command) -> String {
    let d = format!("{c:?}");
    let (ok, out, err) = run(c);
    assert!(ok, "{d} failed:\n{out}\n{err}");
    out
}

fn sh(cmd: &str) -> String {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]);
    run(c).1
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let st = s[s.rfind(')').unwrap() + 1..].split_whitespace().next();
        !matches!(st, Some("Z" | "X"))
    })
}

/// Nothing of the cluster is left: namespaces (`ip netns list`), links in
/// the root namespace (`ip link`), mounts, processes naming the prefix or
/// inside / holding one of its namespaces, and none of `pids` is alive.
fn assert_gone(prefix: &str, inodes: &[NsId], pids: &[i32]) {
    let rest = leftovers(prefix, inodes);
    assert!(rest.is_empty(), "leftovers of {prefix}: {rest:#?}");
    assert!(
        !sh("ip netns list").contains(prefix),
        "ip netns list still shows {prefix}"
    );
    assert!(
        !sh("ip -o link show").contains(prefix),
        "ip link still shows {prefix}"
    );
    // Killed children of init may need a moment to be reaped; they must
    // not be running any more.
    let live: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        live.is_empty(),
        "processes of the cluster still alive: {live:?}"
    );
}

// ---------------------------------------------------------------------------

#[test]
fn each_node_has_its_own_hostname_and_no_mount_namespace() {
    if !require_cluster("each_node_has_its_own_hostname_and_no_mount_namespace") {
        return;
    }
    let host_before = nix::unistd::gethostname().unwrap();
    let t0 = Instant::now();
    let c = TestCluster::new(3);
    eprintln!("3-node cluster up in {:?}", t0.elapsed());
    let my_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut names = Vec::new();
    for n in c.nodes() {
        let got = run_ok(n.command("hostname"));
        assert_eq!(got.trim(), n.hostname(), "hostname on node {}", n.index());
        let got = run_ok(n.nsenter("hostname"));
        assert_eq!(got.trim(), n.hostname(), "hostname via nsenter");
        assert!(n.hostname().starts_with(c.prefix()));
        names.push(got.trim().to_string());

        // The command is in the node's net and UTS namespaces, and in ours
        // for everything else (mount namespace above all: CRIU).
        let mut cmd = n.command("sh");
        cmd.args([
            "-c",
            "readlink /proc/self/ns/net /proc/self/ns/uts /proc/self/ns/mnt",
        ]);
        let out = run_ok(cmd);
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l[0], format!("net:[{}]", n.netns_inode()));
        assert_eq!(l[1], format!("uts:[{}]", n.uts_inode()));
        assert_eq!(
            l[2],
            my_mnt.to_string_lossy(),
            "node commands share our mount ns"
        );

        // Addressing: loopback up, eth0 with the node's address, one route.
        let mut cmd = n.command("ip");
        cmd.args(["-4", "-o", "addr", "show"]);
        let out = run_ok(cmd);
        assert!(out.contains("lo    inet 127.0.0.1/8"), "{out}");
        assert!(out.contains(&format!("eth0    inet {}", n.cidr())), "{out}");
        let mut cmd = n.command("ip");
        cmd.args(["-4", "route", "show"]);
        let routes = run_ok(cmd);
        let (net, len) = c.subnet();
        assert_eq!(routes.lines().count(), 1, "routes on the node:\n{routes}");
        assert!(
            routes.starts_with(&format!("{net}/{len} dev eth0")),
            "{routes}"
        );
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "hostnames are distinct");
    assert_eq!(
        nix::unistd::gethostname().unwrap(),
        host_before,
        "the host's hostname is untouched"
    );
    assert!(c
        .hosts()
        .contains(&format!("{} {}", c.node(2).ip(), c.node(2).hostname())));
}

#[test]
fn tcp_between_nodes_stays_inside_the_cluster() {
    if !require_cluster("tcp_between_nodes_stays_inside_the_cluster") {
        return;
    }
    let iptables = |args: &[&str]| {
        Command::new("iptables")
            .args(args)
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default()
    };
    let rules_before = iptables(&["-S"]);
    let fwd_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();

    let c = TestCluster::new(3);
    let (n0, n2) = (c.node(0), c.node(2));
    let port = n2.free_port();
    assert!(port > 0);

    // Node 0 → node 2 over the bridge.
    let mut server = Helper::start(Some(n2), "listen", Some(n2.addr(port)));
    server.expect("LISTENING", T);
    let mut client = Helper::start(Some(n0), "connect", Some(n2.addr(port)));
    let got = client.expect("CONNECTED", T);
    let (local, line) = got.split_once(' ').unwrap();
    let local: SocketAddr = local.parse().unwrap();
    assert_eq!(local.ip(), n0.ip(), "client's source address is node 0's");
    assert_eq!(line, format!("hello from {}", n2.hostname()));
    let peer: SocketAddr = server.expect("ACCEPT", T).parse().unwrap();
    assert_eq!(peer.ip(), n0.ip(), "server saw node 0");

    // A socket the test itself opens "on" node 1 reaches node 2 as well.
    let line = c.node(1).in_netns(|| {
        let s = TcpStream::connect_timeout(&n2.addr(port), Duration::from_secs(5)).unwrap();
        let mut l = String::new();
        BufReader::new(s).read_line(&mut l).unwrap();
        l
    });
    assert_eq!(line.trim(), format!("hello from {}", n2.hostname()));

    // Nothing leaves: no default route on the nodes, so the host's own
    // address and the outside are unreachable (ENETUNREACH, no packet sent).
    let mut targets: Vec<SocketAddr> = vec!["1.1.1.1:53".parse().unwrap()];
    let addrs = sh("ip -4 -o addr show scope global");
    for l in addrs.lines() {
        let a = l.split_whitespace().skip_while(|w| *w != "inet").nth(1);
        if let Some(ip) = a.and_then(|a| a.split('/').next()?.parse().ok()) {
            targets.push(SocketAddr::new(ip, 22));
        }
    }
    for t in targets {
        let mut h = Helper::start(Some(n0), "connect", Some(t));
        let e = h.expect("ERROR", T);
        assert!(e.contains("unreachable"), "node 0 → {t}: {e}");
    }

    // The root namespace has no address, link or route in the cluster's
    // subnet: the node addresses are not routable from it (a packet to them
    // would follow the default route, never a path to the bridge).
    let sub = c.subnet();
    for p in host_prefixes() {
        if p.1 > 0 {
            assert!(!overlaps(p, sub), "host prefix {p:?} overlaps {sub:?}");
        }
    }
    let mut cmd = Command::new("ip");
    cmd.args(["route", "get", &n2.ip().to_string()]);
    let (ok, r, _) = run(cmd);
    if ok {
        assert!(
            r.contains(" via "),
            "root ns has a direct route to node 2: {r}"
        );
    }
    // The switch: pure L2, no address, no route; forwarding off everywhere.
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &c.switch_netns(), "-4", "addr", "show"]);
    let a = run_ok(cmd);
    let inet = a.lines().filter(|l| l.contains("inet "));
    assert!(
        inet.clone().all(|l| l.contains("inet 127.0.0.1/8")),
        "the switch has an address: {a}"
    );
    for n in c.nodes() {
        let mut cmd = n.command("cat");
        cmd.arg("/proc/sys/net/ipv4/ip_forward");
        assert_eq!(run_ok(cmd).trim(), "0");
    }
    // Only node 0 and node 1 ever connected.
    let accepts: Vec<String> = server
        .drain()
        .iter()
        .filter(|l| l.starts_with("ACCEPT"))
        .cloned()
        .collect();
    assert_eq!(accepts.len(), 2, "{accepts:?}");

    drop(server);
    drop(client);
    drop(c);
    assert_eq!(
        iptables(&["-S"]),
        rules_before,
        "host iptables rules changed"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        fwd_before,
        "host forwarding changed"
    );
}

/// Starts a mix of processes on the cluster: tracked, untracked, an orphan
/// (its parent exits), one in a network namespace of its own (keeps the
/// node's UTS namespace). Returns their pids once all are up, and the
/// untracked children (to be waited for after the drop: the harness must
/// have killed them).
fn populate(c: &TestCluster) -> (Vec<i32>, Vec<Child>) {
    let n = c.len();
    let mut pids = Vec::new();
    let a = c.node(0);
    // Tracked; its Child is dropped unwaited: the harness reaps it.
    pids.push(a.spawn(a.command("sleep").arg("1000")).unwrap().id() as i32);
    let b = c.node(1 % n);
    let untracked = b.command("sleep").arg("1001").spawn().unwrap();
    pids.push(untracked.id() as i32);
    let z = c.node(n - 1);
    let mut orphan = z.command("sh");
    orphan.args([
        "-c",
        "setsid sleep 1002 </dev/null >/dev/null 2>&1 & exit 0",
    ]);
    run_ok(orphan);
    let u = b
        .command("unshare")
        .args(["--net", "sleep", "1003"])
        .spawn()
        .unwrap();
    pids.push(u.id() as i32);
    wait_until(
        || {
            let cmd = |p: &i32| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            c.nodes()
                .iter()
                .flat_map(|n| n.pids())
                .filter(|p| {
                    let s = text(&cmd(p));
                    s.starts_with("sleep") && s.contains("100")
                })
                .count()
                >= 4
        },
        "4 sleeps on the nodes",
    );
    for n in c.nodes() {
        pids.extend(n.pids());
    }
    // The one in its own netns is still found through its UTS namespace.
    let own_net = std::fs::read_link(format!("/proc/{}/ns/net", u.id())).unwrap();
    assert_ne!(
        own_net.to_string_lossy(),
        format!("net:[{}]", b.netns_inode())
    );
    assert!(b.pids().contains(&(u.id() as i32)));
    pids.extend(c.nodes().iter().map(|n| n.holder_pid() as i32));
    pids.sort_unstable();
    pids.dedup();
    (pids, vec![untracked, u])
}

/// The untracked children were killed by the harness (SIGKILL).
fn assert_killed(children: Vec<Child>) {
    use std::os::unix::process::ExitStatusExt;
    for mut ch in children {
        let st = ch.wait().unwrap();
        assert_eq!(st.signal(), Some(9), "pid {}: {st}", ch.id());
    }
}

#[test]
fn drop_removes_namespaces_links_and_processes() {
    if !require_cluster("drop_removes_namespaces_links_and_processes") {
        return;
    }
    let c = TestCluster::new(3);
    let prefix = c.prefix().to_string();
    let inodes = c.namespace_ids();
    assert_eq!(inodes.len(), 7);
    let (pids, children) = populate(&c);
    assert!(sh("ip netns list").contains(&prefix));
    assert!(!leftovers(&prefix, &inodes).is_empty());

    // kill_all: node 0 "dies", but stays usable.
    let n0 = c.node(0);
    assert!(!n0.pids().is_empty());
    n0.kill_all();
    assert!(n0.pids().is_empty(), "{:?}", n0.pids());
    assert!(alive(n0.holder_pid() as i32));
    assert_eq!(run_ok(n0.command("hostname")).trim(), n0.hostname());

    let t0 = Instant::now();
    drop(c);
    eprintln!(
        "3-node cluster with 6 processes removed in {:?}",
        t0.elapsed()
    );
    assert_gone(&prefix, &inodes, &pids);
    assert_killed(children);
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !require_cluster("a_panicking_test_still_cleans_up") {
        return;
    }
    let (tx, rx) = channel();
    let r = std::thread::spawn(move || {
        let c = TestCluster::new(2);
        let (pids, children) = populate(&c);
        tx.send((c.prefix().to_string(), c.namespace_ids(), pids, children))
            .unwrap();
        panic!("deliberate panic with a live cluster");
    })
    .join();
    assert!(r.is_err(), "the thread should have panicked");
    let (prefix, inodes, pids, children) = rx.recv().unwrap();
    assert_gone(&prefix, &inodes, &pids);
    assert_killed(children);
}

#[test]
fn sweep_stale_removes_the_cluster_of_a_killed_run() {
    if !require_cluster("sweep_stale_removes_the_cluster_of_a_killed_run") {
        return;
    }
    // A separate process builds a cluster, starts processes on it, and is
    // SIGKILLed: no Drop runs.
    let mut h = Helper::start(None, "crash", None);
    let got = h.expect("PREFIX", Duration::from_secs(60));
    let (prefix, inodes) = got.split_once(' ').unwrap();
    let inodes: Vec<NsId> = inodes
        .split(',')
        .map(|i| NsId::decode(i).unwrap())
        .collect();
    let creator = h.child.id();
    // No other process may sweep the killed run while we inspect it (the
    // lock is taken only now: the helper's own first sweep needed it).
    let guard = TestCluster::sweep_lock();
    h.child.kill().unwrap();
    h.child.wait().unwrap();

    // The holders exit by themselves (EOF on their pipe)...
    wait_until(
        || ckpt_e2e::pids_mentioning(&format!("{HOLDER_TAG}{prefix}")).is_empty(),
        "the holders of the killed run to exit",
    );
    // ... but the namespaces and the processes on the nodes remain.
    let before = leftovers(prefix, &inodes);
    for n in ["n0", "n1", "sw"] {
        let ns = format!("netns {prefix}{n}");
        assert!(before.contains(&ns), "{ns} missing: {before:#?}");
    }
    let procs: Vec<i32> = before
        .iter()
        .filter_map(|l| l.strip_prefix("process "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(procs.len() >= 3, "sleeps of the killed run: {before:#?}");

    let t0 = Instant::now();
    let swept = TestCluster::sweep_stale_with(&guard);
    eprintln!("sweep_stale removed {swept:?} in {:?}", t0.elapsed());
    drop(guard);
    assert!(
        swept.iter().any(|p| p == prefix),
        "{swept:?} lacks {prefix}"
    );
    assert!(prefix.starts_with(&format!("ckt{creator}s")));
    assert_gone(prefix, &inodes, &procs);
}

#[test]
fn sweep_stale_leaves_live_clusters_alone() {
    if !require_cluster("sweep_stale_leaves_live_clusters_alone") {
        return;
    }
    let c = TestCluster::new(1);
    let swept = TestCluster::sweep_stale();
    assert!(!swept.iter().any(|p| p == c.prefix()), "{swept:?}");
    assert_eq!(
        run_ok(c.node(0).command("hostname")).trim(),
        c.node(0).hostname()
    );
}

#[test]
fn dropping_one_cluster_leaves_the_others_intact() {
    if !require_cluster("dropping_one_cluster_leaves_the_others_intact") {
        return;
    }
    // Enough clusters that prefixes like x1- and x12- coexist.
    let mut all: Vec<TestCluster> = (0..12).map(|_| TestCluster::new(1)).collect();
    while !all.is_empty() {
        let gone = all.remove(0);
        let prefix = gone.prefix().to_string();
        let ids = gone.namespace_ids();
        drop(gone);
        assert_gone(&prefix, &ids, &[]);
        for c in &all {
            let n = c.node(0);
            assert!(
                alive(n.holder_pid() as i32),
                "{} lost its holder",
                c.prefix()
            );
            assert!(
                sh("ip netns list").contains(n.name()),
                "{} lost its netns",
                c.prefix()
            );
        }
    }
}
