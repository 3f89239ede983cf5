//! The real `ckpt-coordinator` and `ckpt-agent` binaries on 127.0.0.1: two
//! agents with the cluster key authenticate, an agent with another key is
//! refused with a logged reason, a bad key file or a taken port stops a
//! daemon at start with a clear message, and SIGTERM stops every daemon
//! cleanly.
//!
//! Prerequisites: root and CRIU (an agent asks CRIU for its version when it
//! starts).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::{bin_dir, require, run_with_timeout, text, Prereq};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(15);

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A daemon whose stderr (its log) goes to a file. Killed if still running
/// when dropped (a failed test leaves nothing behind).
struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, binary: &str, name: &str, config: &Path) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin(binary))
            .arg("--config")
            .arg(config)
            .env("CKPT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {binary}: {e}"));
        Daemon {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until every one of `needles` is on one line of the log.
    fn wait_for(&mut self, needles: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} ended ({st}) before logging {needles:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                t0.elapsed() < WAIT,
                "{} logged no {needles:?} within {WAIT:?}:\n{log}",
                self.name
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// SIGTERM, then the exit status (panics if it takes longer than
    /// [`WAIT`]).
    fn terminate(&mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} ignored SIGTERM for {WAIT:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A key file of mode 0600 with a fresh random key.
fn write_key(path: &Path) {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn write(path: PathBuf, text: &str) -> PathBuf {
    fs::write(&path, text).unwrap();
    path
}

fn coordinator_config(dir: &Path, name: &str, listen: &str, key: &Path) -> PathBuf {
    write(
        dir.join(format!("{name}.toml")),
        &format!(
            "listen = \"{listen}\"\nkey_file = \"{}\"\nckpt_dir = \"{}\"\n\
             heartbeat_interval = \"200ms\"\n",
            key.display(),
            dir.join("images").display()
        ),
    )
}

fn agent_config(dir: &Path, node: &str, coordinator: &str, key: &Path) -> PathBuf {
    write(
        dir.join(format!("{node}.toml")),
        &format!(
            "node = \"{node}\"\ncoordinator = \"{coordinator}\"\nkey_file = \"{}\"\n\
             state_dir = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n",
            key.display(),
            dir.join(format!("{node}.state")).display()
        ),
    )
}

/// Processes whose command line mentions `dir` (our daemons name their
/// config there).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// `listen=127.0.0.1:PORT` from the coordinator's start line.
fn listen_addr(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .unwrap_or_else(|| panic!("no listen= in {line:?}"))
        .to_owned()
}

fn assert_clean_exit(name: &str, st: ExitStatus, log: &str) {
    assert!(st.success(), "{name} exited with {st}:\n{log}");
}

#[test]
fn daemons_authenticate_refuse_a_wrong_key_and_stop_on_sigterm() {
    if !require(
        "daemons_authenticate_refuse_a_wrong_key_and_stop_on_sigterm",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("cluster.key");
    let other_key = dir.join("other.key");
    write_key(&key);
    write_key(&other_key);

    // Port 0: the kernel picks a free one; the log says which.
    let cfg = coordinator_config(dir, "coordinator", "127.0.0.1:0", &key);
    let mut coord = Daemon::start(dir, "ckpt-coordinator", "coordinator", &cfg);
    let addr = listen_addr(&coord.wait_for(&["ckpt-coordinator started", "listen="]));

    let mut agents: Vec<Daemon> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let cfg = agent_config(dir, n, &addr, &key);
            Daemon::start(dir, "ckpt-agent", n, &cfg)
        })
        .collect();
    for a in &mut agents {
        let node = format!("node={}", a.name);
        a.wait_for(&["ckpt-agent started", &node, &format!("coordinator={addr}")]);
        // The agent's "connected" follows its half of the handshake, the
        // coordinator's "agent connected" its own: both sides authenticated.
        a.wait_for(&["connected", &node, "session="]);
        coord.wait_for(&["agent connected", &node]);
    }

    // Another key: refused, and both sides say why.
    let cfg = agent_config(dir, "intruder", &addr, &other_key);
    let mut intruder = Daemon::start(dir, "ckpt-agent", "intruder", &cfg);
    let refusal = coord.wait_for(&["refused an agent connection", "\"intruder\""]);
    assert!(refusal.contains("cluster key"), "{refusal}");
    intruder.wait_for(&["refused by the coordinator", "cluster key"]);
    assert!(
        !coord.log().contains("agent connected node=intruder"),
        "{}",
        coord.log()
    );

    // A second coordinator on the same port stops with a clear message.
    let taken = coordinator_config(dir, "taken", &addr, &key);
    let out = run_with_timeout(
        {
            let mut c = Command::new(bin("ckpt-coordinator"));
            c.arg("--config").arg(&taken);
            c
        },
        WAIT,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("Address already in use") && err.contains("listen"),
        "{err}"
    );

    // SIGTERM: every daemon stops on its own, with status 0.
    for d in agents.iter_mut().chain([&mut intruder]) {
        let st = d.terminate();
        assert_clean_exit(&d.name, st, &d.log());
        assert!(d.log().contains("ckpt-agent stopped"), "{}", d.log());
    }
    coord.wait_for(&["agent disconnected", "n1"]);
    coord.wait_for(&["agent disconnected", "n2"]);
    let st = coord.terminate();
    assert_clean_exit("coordinator", st, &coord.log());
    assert!(coord.log().contains("ckpt-coordinator stopped"));
    let left = processes_using(dir);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

/// Mistakes that must stop a daemon at start with a message naming them.
#[test]
fn daemons_refuse_bad_key_files_and_configs() {
    if !require("daemons_refuse_bad_key_files_and_configs", &[Prereq::Root]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("cluster.key");
    write_key(&key);
    let run = |binary: &str, config: &Path| {
        let mut c = Command::new(bin(binary));
        c.arg("--config").arg(config);
        let out = run_with_timeout(c, WAIT);
        assert!(!out.status.success(), "{binary} started with {config:?}");
        text(&out.stderr)
    };

    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = coordinator_config(dir, "coordinator", "127.0.0.1:0", &key);
    let err = run("ckpt-coordinator", &cfg);
    assert!(
        err.contains("mode 0644") && err.contains("cluster.key"),
        "{err}"
    );
    let cfg = agent_config(dir, "n1", "127.0.0.1:1", &key);
    let err = run("ckpt-agent", &cfg);
    assert!(
        err.contains("mode 0644") && err.contains("cluster.key"),
        "{err}"
    );

    let missing = dir.join("missing.key");
    let cfg = agent_config(dir, "n1", "127.0.0.1:1", &missing);
    let err = run("ckpt-agent", &cfg);
    assert!(err.contains("missing.key"), "{err}");

    let cfg = write(
        dir.join("bad.toml"),
        "listen = \"127.0.0.1:0\"\nlisten_on = 1\n",
    );
    let err = run("ckpt-coordinator", &cfg);
    assert!(
        err.contains("bad.toml") && err.contains("line 2") && err.contains("listen_on"),
        "{err}"
    );
    let cfg = write(dir.join("bad-agent.toml"), "\ncoordinator = \"nowhere\"\n");
    let err = run("ckpt-agent", &cfg);
    assert!(
        err.contains("bad-agent.toml") && err.contains("`coordinator` at line 2"),
        "{err}"
    );
    let err = run("ckpt-agent", &dir.join("absent.toml"));
    assert!(err.contains("absent.toml"), "{err}");
}
