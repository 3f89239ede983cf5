//! A real Slurm on a [`TestCluster`]: `munged` (as user munge, with its own
//! key and socket), `slurmctld` on node 0 and one `slurmd` on each compute
//! node, inside the node's network and UTS namespaces: a node's hostname
//! is its `NodeName`, its `NodeAddr` is the node's IP, so a job's batch
//! script and steps run "on" the nodes Slurm gave it (in their
//! namespaces), next to each node's `ckpt-agent`.
//!
//! Everything lives in a directory of its own,
//! `/var/tmp/ckpt-slurm-<pid>s<starttime>x<k>` (the creator's pid and start
//! time, like the cluster prefix): config, munge key and socket, state save
//! location, slurmd spool dirs, logs. Fast settings: `cred_expire=5`,
//! `sched_interval=2`, `bf_interval=1` (a requeued job starts again within
//! seconds), `proctrack/linuxproc` (no cgroup plugin), `PrologFlags=Alloc`,
//! `JobRequeue=1`, `select/linear` with one CPU per node (whole nodes).
//!
//! Clients (`sbatch`, `scontrol`, …) must run inside a node (the daemons
//! listen on node addresses, which the host cannot reach): use
//! [`Slurm::command`], which runs on node 0 with `SLURM_CONF` set.
//!
//! # Cleanup
//!
//! On drop: the daemons are SIGTERMed then SIGKILLed, and so is every
//! process whose command line names the directory (job steps name the
//! spool dir); munged is stopped; the directory is removed, and so are the
//! scratch dirs the ckpt prolog made for this Slurm's jobs
//! (`/tmp/ckpt-job.slurm-<ClusterName>-*`, same in `/dev/shm`), which the
//! epilog did not get to remove if the test ended mid-job. What runs in
//! the nodes' namespaces (slurmstepd, job scripts) is killed by the
//! cluster's own drop. [`Slurm::sweep_stale`] (run once per process by
//! [`Slurm::start`]) does the same for directories whose creator is dead.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cluster::{Node, TestCluster};
use crate::run_with_timeout;

/// Every Slurm directory's name starts with this (under [`SLURM_ROOT`]).
pub const SLURM_TAG: &str = "ckpt-slurm-";
pub const SLURM_ROOT: &str = "/var/tmp";
/// How long the daemons may take to come up, a client command to answer.
pub const T_START: Duration = Duration::from_secs(30);
const T_CLIENT: Duration = Duration::from_secs(30);

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// The ckpt side of a Slurm test cluster, in `dir`: a ckpt config
/// (`ckpt.toml`: the daemons' image dir, key and coordinator socket; run
/// and staging dirs under `dir`) and the prolog and epilog of `slurm/`
/// installed in `dir/hooks` with a `ckpt-hooks.env` pointing them at the
/// agents' sockets (`dir/%n.sock`) and logging to `dir/hooks.log`. Returns
/// the config's path and Slurm options with the hooks set.
pub fn ckpt_setup(dir: &Path, d: &crate::daemons::Daemons) -> (PathBuf, SlurmOpts) {
    let cfg = dir.join("ckpt.toml");
    fs::write(
        &cfg,
        format!(
            "ckpt_dir = \"{}\"\nkey_file = \"{}\"\nrun_dir = \"{}\"\nstaging_dir = \"{}\"\n\
             coordinator_socket = \"{}\"\n",
            d.images.display(),
            d.key.display(),
            dir.join("run").display(),
            dir.join("staging").display(),
            d.coord_sock.display()
        ),
    )
    .unwrap();
    let hooks = dir.join("hooks");
    fs::create_dir_all(&hooks).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../slurm");
    for h in ["ckpt-prolog", "ckpt-epilog"] {
        fs::copy(src.join(h), hooks.join(h)).unwrap();
        fs::set_permissions(hooks.join(h), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(
        hooks.join("ckpt-hooks.env"),
        format!(
            "CKPT_AGENT_SOCKET='{}/%n.sock'\nCKPT_HOOK_LOG='{}'\n",
            dir.display(),
            dir.join("hooks.log").display()
        ),
    )
    .unwrap();
    let opts = SlurmOpts {
        prolog: Some(hooks.join("ckpt-prolog")),
        epilog: Some(hooks.join("ckpt-epilog")),
        ..Default::default()
    };
    (cfg, opts)
}

/// A running Slurm; stopped and removed on drop.
#[derive(Debug)]
pub struct Slurm {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// `ClusterName` (unique per instance).
    pub name: String,
    /// The compute nodes' names (= their hostnames), in config order.
    pub nodes: Vec<String>,
    ctl_node: Node0,
    munged: Option<Child>,
    daemons: Vec<(String, Child)>,
}

/// What is needed to run a client on node 0 after the cluster borrow ends.
#[derive(Debug, Clone)]
struct Node0 {
    nsenter: Vec<String>,
}

/// Options for [`Slurm::start`].
#[derive(Debug, Default, Clone)]
pub struct SlurmOpts {
    /// Indexes of the compute nodes (default: every node but 0).
    pub compute: Vec<usize>,
    /// `Prolog=` / `Epilog=` (absolute paths), if any.
    pub prolog: Option<PathBuf>,
    pub epilog: Option<PathBuf>,
    /// Appended to slurm.conf.
    pub extra: String,
    /// Appended (with a comma) to `SchedulerParameters`.
    pub sched_extra: String,
    /// Appended to the line of the default partition `test` (e.g.
    /// `PriorityTier=1 GraceTime=30`).
    pub partition_extra: String,
}

impl Slurm {
    /// Starts munged, slurmctld on node 0 and a slurmd on each compute node,
    /// and waits until every compute node is idle. Panics (after cleaning
    /// up) with the logs if that does not happen within [`T_START`].
    pub fn start(cluster: &TestCluster, opts: &SlurmOpts) -> Slurm {
        SWEEP.call_once(|| {
            Self::sweep_stale();
        });
        let me = std::process::id();
        let start = proc_starttime(me as i32).unwrap_or(0);
        let k = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{me}s{start}x{k}");
        let dir = Path::new(SLURM_ROOT).join(format!("{SLURM_TAG}{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // munge must reach its socket dir; slurmd's job scripts (as other
        // users) their spool files.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let compute: Vec<usize> = if opts.compute.is_empty() {
            (1..cluster.len()).collect()
        } else {
            opts.compute.clone()
        };
        assert!(!compute.is_empty(), "a Slurm needs a compute node");
        let n0 = cluster.node(0);
        let mut s = Slurm {
            conf: dir.join("slurm.conf"),
            name: cluster_name(me, k),
            nodes: compute
                .iter()
                .map(|i| cluster.node(*i).hostname().to_owned())
                .collect(),
            ctl_node: Node0 {
                nsenter: n0.nsenter_args(),
            },
            dir,
            munged: None,
            daemons: Vec::new(),
        };
        s.start_munge();
        s.write_conf(cluster, &compute, opts);
        let ctld = n0
            .spawn(&mut ctld_cmd(n0, &s.conf, &s.dir))
            .unwrap_or_else(|e| panic!("starting slurmctld: {e}"));
        s.daemons.push(("slurmctld".into(), ctld));
        for i in &compute {
            let node = cluster.node(*i);
            fs::create_dir_all(s.dir.join("spool").join(node.hostname())).unwrap();
            let mut c = node.command("slurmd");
            c.args(["-D", "-N", node.hostname(), "-f"])
                .arg(&s.conf)
                .env("SLURM_CONF", &s.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    fs::File::create(s.dir.join(format!("slurmd.{}.out", node.hostname())))
                        .unwrap(),
                );
            let child = node
                .spawn(&mut c)
                .unwrap_or_else(|e| panic!("starting slurmd on {}: {e}", node.hostname()));
            s.daemons
                .push((format!("slurmd {}", node.hostname()), child));
        }
        s.wait_nodes("idle", &s.nodes.clone(), T_START);
        s
    }

    fn start_munge(&mut self) {
        let m = self.dir.join("munge");
        let sock = self.dir.join("munge.sock.d");
        for d in [&m, &sock] {
            fs::create_dir_all(d).unwrap();
        }
        let key = m.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        use std::io::Read;
        fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        fs::write(&key, &bytes).unwrap();
        let st = Command::new("chown")
            .arg("-R")
            .arg("munge:munge")
            .arg(&m)
            .arg(&sock)
            .status()
            .unwrap();
        assert!(st.success(), "chown munge: {st}");
        fs::set_permissions(&m, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o755)).unwrap();
        let child = Command::new("setpriv")
            .args([
                "--reuid=munge",
                "--regid=munge",
                "--clear-groups",
                "munged",
                "-F",
            ])
            .arg(format!("--socket={}", self.munge_socket().display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", m.join("munged.pid").display()))
            .arg(format!("--log-file={}", m.join("munged.log").display()))
            .arg(format!("--seed-file={}", m.join("seed").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("munged.out")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting munged: {e}"));
        self.munged = Some(child);
        let t0 = Instant::now();
        while !self.munge_socket().exists() {
            if let Some(st) = self.munged.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "munged ended ({st}):\n{}\n{}",
                    read(&self.dir.join("munged.out")),
                    read(&m.join("munged.log"))
                );
            }
            assert!(t0.elapsed() < T_START, "munged made no socket");
            sleep(Duration::from_millis(20));
        }
    }

    pub fn munge_socket(&self) -> PathBuf {
        self.dir.join("munge.sock.d").join("munge.socket")
    }

    fn write_conf(&self, cluster: &TestCluster, compute: &[usize], opts: &SlurmOpts) {
        let n0 = cluster.node(0);
        let d = self.dir.display();
        let mut c = format!(
            "ClusterName={name}\n\
             SlurmctldHost={host}({ip})\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={sock},cred_expire=5\n\
             SlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/spool/%n/slurmd.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\n\
             SlurmdLogFile={d}/slurmd.%n.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             MpiDefault=none\n\
             SchedulerType=sched/backfill\n\
             SelectType=select/linear\n\
             SchedulerParameters=sched_interval=2,bf_interval=1{sched}\n\
             PrologFlags=Alloc\n\
             JobRequeue=1\n\
             ReturnToService=2\n\
             SlurmctldTimeout=30\nSlurmdTimeout=30\nInactiveLimit=0\n\
             MinJobAge=600\nKillWait=2\nMailProg=/bin/true\n",
            name = self.name,
            host = n0.hostname(),
            ip = n0.ip(),
            sock = self.munge_socket().display(),
            sched = if opts.sched_extra.is_empty() {
                String::new()
            } else {
                format!(",{}", opts.sched_extra)
            },
        );
        if let Some(p) = &opts.prolog {
            c.push_str(&format!("Prolog={}\n", p.display()));
        }
        if let Some(p) = &opts.epilog {
            c.push_str(&format!("Epilog={}\n", p.display()));
        }
        for i in compute {
            let n = cluster.node(*i);
            c.push_str(&format!(
                "NodeName={} NodeAddr={} CPUs=1 State=UNKNOWN\n",
                n.hostname(),
                n.ip()
            ));
        }
        c.push_str(&format!(
            "PartitionName=test Nodes={} Default=YES MaxTime=INFINITE State=UP {}\n",
            self.nodes.join(","),
            opts.partition_extra
        ));
        c.push_str(&opts.extra);
        fs::create_dir_all(self.dir.join("state")).unwrap();
        fs::write(&self.conf, c).unwrap();
    }

    /// A Slurm client command run on node 0 (`nsenter` into its namespaces)
    /// with `SLURM_CONF` set.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(&self.ctl_node.nsenter)
            .arg("--")
            .arg(program)
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null());
        c
    }

    /// Runs a client to completion; panics with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let mut c = self.command(program);
        c.args(args);
        let out = run_with_timeout(c, T_CLIENT);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a client to completion, whatever its status.
    pub fn try_run(&self, program: &str, args: &[&str]) -> Output {
        let mut c = self.command(program);
        c.args(args);
        run_with_timeout(c, T_CLIENT)
    }

    /// `sbatch --parsable ARGS`: the job id.
    pub fn sbatch(&self, args: &[&str]) -> u32 {
        let mut a = vec!["--parsable"];
        a.extend_from_slice(args);
        let out = self.run("sbatch", &a);
        parse_job_id(&out).unwrap_or_else(|| panic!("sbatch printed no job id: {out:?}"))
    }

    /// `scontrol show job -o ID` as key=value pairs (empty if unknown).
    pub fn job(&self, id: u32) -> Vec<(String, String)> {
        let out = self.try_run("scontrol", &["show", "job", "-o", &id.to_string()]);
        parse_kv(&String::from_utf8_lossy(&out.stdout))
    }

    /// One field of [`Slurm::job`].
    pub fn job_field(&self, id: u32, key: &str) -> Option<String> {
        self.job(id)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Waits until job `id`'s JobState satisfies `ok`; returns it.
    pub fn wait_job(
        &self,
        id: u32,
        what: &str,
        limit: Duration,
        ok: &dyn Fn(&str) -> bool,
    ) -> String {
        let t0 = Instant::now();
        loop {
            let st = self.job_field(id, "JobState").unwrap_or_default();
            if ok(&st) {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "job {id}: no {what} within {limit:?} (JobState {st:?}); {:?}\n{}",
                self.job(id),
                self.logs()
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node of `nodes` is in `state` (sinfo's %T, e.g.
    /// "idle", "drained").
    pub fn wait_nodes(&self, state: &str, nodes: &[String], limit: Duration) {
        let t0 = Instant::now();
        loop {
            let out = self.try_run("sinfo", &["-h", "-N", "-o", "%N %T"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let ok = nodes.iter().all(|n| {
                text.lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == [n.as_str(), state])
            });
            if ok {
                return;
            }
            if let Some((name, st)) = self.dead_daemon() {
                panic!(
                    "{name} ended ({st}) before the nodes were {state}\n{}",
                    self.logs()
                );
            }
            assert!(
                t0.elapsed() < limit,
                "nodes {nodes:?} not {state} within {limit:?}; sinfo:\n{text}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            sleep(Duration::from_millis(100));
        }
    }

    fn dead_daemon(&self) -> Option<(String, String)> {
        for (name, c) in &self.daemons {
            let pid = c.id() as i32;
            if !proc_alive(pid) {
                return Some((name.clone(), "gone".into()));
            }
        }
        None
    }

    /// The daemons' logs.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".log") || n.ends_with(".out") {
                let t = read(&p);
                let tail: Vec<&str> = t.lines().rev().take(40).collect();
                s.push_str(&format!("--- {n} (last 40 lines):\n"));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// What is left of the Slurm in `dir`: live processes (daemons,
    /// munged, anything whose command line names the directory) and its
    /// jobs' node-local scratch dirs.
    pub fn leftovers(dir: &Path) -> Vec<String> {
        let needle = dir.to_string_lossy().into_owned();
        let mut out: Vec<String> = pids_naming(&needle)
            .into_iter()
            .map(|p| format!("process {p} ({})", cmdline(p)))
            .collect();
        out.extend(
            job_scratch_dirs(dir)
                .into_iter()
                .map(|d| format!("dir {}", d.display())),
        );
        out
    }

    /// Stops and removes every Slurm directory whose creator is dead.
    pub fn sweep_stale() -> Vec<String> {
        let mut swept = Vec::new();
        for e in fs::read_dir(SLURM_ROOT).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix(SLURM_TAG) else {
                continue;
            };
            let Some((pid, rest)) = rest.split_once('s') else {
                continue;
            };
            let Some((start, _)) = rest.split_once('x') else {
                continue;
            };
            let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
                continue;
            };
            if proc_starttime(pid) == Some(start) {
                continue;
            }
            destroy(&e.path(), &[]);
            swept.push(n);
        }
        swept
    }
}

fn ctld_cmd(n0: &Node, conf: &Path, dir: &Path) -> Command {
    let mut c = n0.command("slurmctld");
    c.args(["-D", "-f"])
        .arg(conf)
        .env("SLURM_CONF", conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("slurmctld.out")).unwrap());
    c
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let mut pids: Vec<i32> = self.daemons.iter().map(|(_, c)| c.id() as i32).collect();
        pids.extend(self.munged.iter().map(|c| c.id() as i32));
        destroy(&self.dir, &pids);
        for (_, c) in &mut self.daemons {
            let _ = c.wait();
        }
        if let Some(c) = &mut self.munged {
            let _ = c.wait();
        }
    }
}

/// `ClusterName` of the Slurm made by process `pid` as its `k`th.
fn cluster_name(pid: u32, k: u32) -> String {
    format!("ck{pid}x{k}")
}

/// `…/ckpt-slurm-<pid>s<start>x<k>` → its `ClusterName`.
fn cluster_name_of(dir: &Path) -> Option<String> {
    let n = dir.file_name()?.to_str()?.strip_prefix(SLURM_TAG)?;
    let (pid, rest) = n.split_once('s')?;
    let (_, k) = rest.split_once('x')?;
    Some(cluster_name(pid.parse().ok()?, k.parse().ok()?))
}

/// Node-local scratch dirs the ckpt prolog made for this Slurm's jobs
/// (`/tmp/ckpt-job.slurm-<ClusterName>-<id>`, same in /dev/shm): normally
/// removed by the epilog, which does not run when a test ends mid-job.
fn job_scratch_dirs(dir: &Path) -> Vec<PathBuf> {
    let Some(name) = cluster_name_of(dir) else {
        return Vec::new();
    };
    let prefix = format!("ckpt-job.slurm-{name}-");
    let mut out = Vec::new();
    for root in ["/tmp", "/dev/shm"] {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                out.push(e.path());
            }
        }
    }
    out
}

/// Ends `pids` and every process naming `dir` (TERM, then KILL after 3 s),
/// then removes `dir` and its jobs' scratch dirs.
fn destroy(dir: &Path, pids: &[i32]) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let collect = || {
        let mut v: Vec<i32> = pids.to_vec();
        v.extend(pids_naming(&needle));
        v.retain(|p| *p > 1 && *p != me && proc_alive(*p));
        v.sort_unstable();
        v.dedup();
        v
    };
    for p in collect() {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let t0 = Instant::now();
    loop {
        let v = collect();
        if v.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(3) {
            for p in &v {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
        }
        if t0.elapsed() > Duration::from_secs(13) {
            eprintln!("slurm harness: processes survive SIGKILL: {v:?}");
            break;
        }
        sleep(Duration::from_millis(20));
    }
    for d in job_scratch_dirs(dir)
        .iter()
        .map(PathBuf::as_path)
        .chain([dir])
    {
        if let Err(e) = fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("slurm harness: cannot remove {}: {e}", d.display());
            }
        }
    }
}

/// `123` or `123;cluster` → 123.
pub fn parse_job_id(s: &str) -> Option<u32> {
    s.trim().split(';').next()?.trim().parse().ok()
}

/// `A=b C=d e` (scontrol -o) → pairs; values run to the next ` KEY=`.
pub fn parse_kv(s: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for tok in s.split_whitespace() {
        match tok.split_once('=') {
            Some((k, v))
                if !k.is_empty()
                    && k.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || b == b'_' || b == b'/' || b == b':'
                    }) =>
            {
                out.push((k.to_owned(), v.to_owned()));
            }
            _ => {
                if let Some(last) = out.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(tok);
                }
            }
        }
    }
    out
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn pids_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|p| *p != me && proc_alive(*p) && cmdline(*p).contains(needle))
        .collect()
}

fn proc_starttime(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_follow_the_directory() {
        let d = Path::new(SLURM_ROOT).join(format!("{SLURM_TAG}12s345x6"));
        assert_eq!(cluster_name_of(&d), Some(cluster_name(12, 6)));
        assert_eq!(cluster_name_of(Path::new("/var/tmp/other")), None);
    }

    #[test]
    fn job_ids_and_fields_parse() {
        assert_eq!(parse_job_id("12\n"), Some(12));
        assert_eq!(parse_job_id("12;ck1"), Some(12));
        assert_eq!(parse_job_id("Submitted"), None);
        let kv = parse_kv("JobId=3 JobName=a b JobState=RUNNING Reason=None");
        assert_eq!(kv[1], ("JobName".into(), "a b".into()));
        assert_eq!(kv[2], ("JobState".into(), "RUNNING".into()));
    }
}
