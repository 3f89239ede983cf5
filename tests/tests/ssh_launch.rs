//! The coordinator starts the agents of a hostfile over SSH (`[launch]` in
//! coordinator.toml): a real OpenSSH server on three nodes of a
//! [`TestCluster`], the real `ckpt-coordinator` on node 0.
//!
//! - nodes 1 and 2 are in known_hosts: their agents start and connect
//!   (node 2 under the name the hostfile gives it);
//! - node 3's host key is not in known_hosts: the coordinator refuses to log
//!   in and says so;
//! - a second coordinator start with the same hostfile finds the agents
//!   running: the new agents exit at once ("another ckpt-agent"), the
//!   coordinator reports it, and the running agents reconnect to it.
//!
//! Prerequisites: root, `ip`, `nsenter`, OpenSSH server.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::daemons::{write_key, Daemon};
use ckpt_e2e::{bin_dir, require, Prereq};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ckpt-test", "-f"])
        .arg(path));
}

/// An sshd on `node`, port 22 of its address, with its own host key.
fn sshd(node: &Node, dir: &Path) -> Daemon {
    let name = node.hostname();
    let host_key = dir.join(format!("{name}.host_key"));
    keygen(&host_key);
    let cfg = dir.join(format!("{name}.sshd_config"));
    fs::write(
        &cfg,
        format!(
            "ListenAddress {ip}:22\nHostKey {key}\nPidFile none\nUsePAM no\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nAuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\nLogLevel VERBOSE\n",
            ip = node.ip(),
            key = host_key.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut p = Daemon::start_program(
        node,
        Path::new("/usr/sbin/sshd"),
        &["-D".into(), "-e".into(), "-f".into(), OsString::from(&cfg)],
        &format!("sshd on {name}"),
        &dir.join(format!("{name}.sshd.log")),
    );
    p.wait_for(&["Server listening on"]);
    p
}

#[test]
fn coordinator_starts_hostfile_agents_over_ssh_and_checks_host_keys() {
    let name = "coordinator_starts_hostfile_agents_over_ssh_and_checks_host_keys";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Sshd]) {
        return;
    }
    // sshd's privilege-separation directory.
    fs::create_dir_all("/run/sshd").unwrap();
    fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(4);
    let (n0, n1, n2, n3) = (
        cluster.node(0),
        cluster.node(1),
        cluster.node(2),
        cluster.node(3),
    );

    let id = dir.join("id_ed25519");
    keygen(&id);
    fs::copy(id.with_extension("pub"), dir.join("authorized_keys")).unwrap();
    let _sshds: Vec<Daemon> = [n1, n2, n3].iter().map(|n| sshd(n, dir)).collect();
    // Only nodes 1 and 2 are trusted.
    let known: String = [n1, n2]
        .iter()
        .map(|n| {
            let pubkey =
                fs::read_to_string(dir.join(format!("{}.host_key.pub", n.hostname()))).unwrap();
            format!("{} {}", n.ip(), pubkey.trim())
        })
        .collect::<Vec<_>>()
        .join("\n");
    let known_hosts = dir.join("known_hosts");
    fs::write(&known_hosts, known + "\n").unwrap();

    let key = dir.join("cluster.key");
    write_key(&key);
    let listen = n0.addr(n0.free_port());
    // One agent config per node (the nodes share this machine's files); the
    // remote shell picks it by hostname.
    for n in [n1, n2, n3] {
        let h = n.hostname();
        fs::write(
            dir.join(format!("{h}.toml")),
            format!(
                "coordinator = \"{listen}\"\nkey_file = \"{}\"\nstate_dir = \"{}\"\n\
                 control_socket = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n",
                key.display(),
                dir.join(format!("{h}.state")).display(),
                dir.join(format!("{h}.sock")).display()
            ),
        )
        .unwrap();
    }
    let hostfile = dir.join("hostfile");
    fs::write(
        &hostfile,
        format!(
            "# the test cluster\n{}\n{} node=renamed-n2 slots=2\n{}\n",
            n1.ip(),
            n2.ip(),
            n3.ip()
        ),
    )
    .unwrap();
    let agent_log = dir.join("agents.log");
    let cfg = dir.join("coordinator.toml");
    fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nkey_file = \"{key}\"\nckpt_dir = \"{images}\"\n\
             heartbeat_interval = \"200ms\"\n\n[launch]\nhostfile = \"{hostfile}\"\n\
             identity = \"{id}\"\nknown_hosts = \"{known}\"\n\
             agent_command = \"{agent} --config {dir}/$(hostname).toml\"\n\
             agent_log = \"{log}\"\ntimeout = \"5s\"\n",
            key = key.display(),
            images = dir.join("images").display(),
            hostfile = hostfile.display(),
            id = id.display(),
            known = known_hosts.display(),
            agent = bin_dir().join("ckpt-agent").display(),
            dir = dir.display(),
            log = agent_log.display(),
        ),
    )
    .unwrap();

    let start_coordinator = |run: u32| {
        Daemon::start(
            n0,
            dir,
            "ckpt-coordinator",
            &format!("coordinator.{run}"),
            &cfg,
        )
    };
    let agents = || fs::read_to_string(&agent_log).unwrap_or_default();
    let extra = || format!("--- agents:\n{}", agents());

    let mut coord = start_coordinator(1);
    coord.wait_for_or(&["SSH launch done", "started=2", "failed=1"], &extra);
    let log = coord.log();
    for n in [n1, n2] {
        assert!(
            log.lines()
                .any(|l| l.contains("agent started over SSH")
                    && l.contains(&format!("host={}", n.ip()))),
            "no start on {}:\n{log}",
            n.hostname()
        );
    }
    assert!(
        log.lines().any(|l| l.contains("agent not started")
            && l.contains(&n3.ip().to_string())
            && l.contains("host key is not in")),
        "node 3's unknown host key was not refused:\n{log}"
    );
    coord.wait_for_or(
        &["agent connected", &format!("node={}", n1.hostname())],
        &extra,
    );
    coord.wait_for_or(&["agent connected", "node=renamed-n2"], &extra);
    // Nothing ran on node 3: no agent log line, no state dir.
    assert!(
        !dir.join(format!("{}.state", n3.hostname())).exists(),
        "an agent ran on the untrusted node"
    );
    coord.stop();

    // Again: the agents still run, the new ones refuse to start beside
    // them, and the running ones come back to the new coordinator.
    let mut coord = start_coordinator(2);
    coord.wait_for_or(&["SSH launch done", "started=0", "failed=3"], &extra);
    let log = coord.log();
    assert!(
        log.contains("another ckpt-agent (pid"),
        "the second launch did not report the running agent:\n{log}\n{}",
        extra()
    );
    coord.wait_for_or(
        &["agent connected", &format!("node={}", n1.hostname())],
        &extra,
    );
    coord.wait_for_or(&["agent connected", "node=renamed-n2"], &extra);
    coord.stop();
}
