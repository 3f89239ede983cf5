//! Job-stable network addresses: a tree in its own network namespace,
//! reachable from every node at an address of the job network, wherever
//! the tree runs.
//!
//! ```text
//!  tree netns                      node netns                        other nodes
//!  lo, eth0 10.211.0.5/32  ─veth─  cj0ad30005 169.254.1.1/32         <jobnet> dev eth0 (on-link)
//!  default via 169.254.1.1         10.211.0.5/32 dev cj0ad30005  ──  ARP "who has 10.211.0.5?"
//!                                  eth0: proxy_arp=1, forwarding  ◄── answered by this node
//! ```
//!
//! Every node treats the whole job network as on-link on its uplink; the
//! node that runs a tree answers ARP for the tree's address (proxy ARP: it
//! has a /32 route to it over another interface) and forwards. A restored
//! tree gets the same address on its new node, and a gratuitous ARP from
//! there moves the peers' neighbour entries at once.
//!
//! Why proxy ARP rather than a bridge or routes on every node: nothing
//! about a tree has to be configured anywhere but on the node that runs
//! it, so a move needs no cluster-wide route update (the old node's /32
//! route goes with its veth).
//!
//! The network lock of a checkpoint is two DROP rules (everything but
//! loopback, both directions) inside the tree's own namespace, so that
//! nothing else on the node is touched.
//!
//! Commands (`ip`, `iptables`) run in the tree's namespace through `setns`
//! in the child before exec, never `ip netns exec` (its mount namespace
//! makes CRIU fail to dump the tree).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The node-side address every tree's default route points to.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The interface name of the tree's end of its veth.
pub const TREE_IF: &str = "eth0";

pub use ckpt_protocol::jobnet::JobNetwork;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: `{cmd}` failed: {detail}")]
    Command {
        what: String,
        cmd: String,
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// Runs `prog args…` (in the network namespace `netns` if given) and
/// returns its stdout; a failure quotes its stderr.
fn run(
    what: &str,
    netns: Option<RawFd>,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(fd) = netns {
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open in the
        // parent (and so in the forked child) until the command returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let line = format!("{prog} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| NetError::Command {
        what: what.into(),
        cmd: line.clone(),
        detail: e.to_string(),
    })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = w.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Command {
        what: what.into(),
        cmd: line.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: what.into(),
            cmd: line,
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(io_err(format!("writing {value} to {path}")))
}

/// The interface this node reaches `peer` through (its uplink). A peer on
/// this very node (loopback) falls back to the first interface with a
/// global IPv4 address.
pub fn uplink_towards(peer: IpAddr) -> Result<String, NetError> {
    let what = format!("finding the uplink towards {peer}");
    let out = run(
        &what,
        None,
        "ip",
        &["-o", "route", "get", &peer.to_string()],
        None,
    )?;
    let dev = word_after(&out, "dev");
    if let Some(dev) = dev.filter(|d| *d != "lo") {
        return Ok(dev.to_owned());
    }
    let out = run(
        &what,
        None,
        "ip",
        &["-o", "-4", "addr", "show", "scope", "global"],
        None,
    )?;
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|d| *d != "lo")
        .map(str::to_owned)
        .ok_or_else(|| NetError::Command {
            what,
            cmd: "ip -o -4 addr show scope global".into(),
            detail: "no interface with a global IPv4 address".into(),
        })
}

fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut it = text.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next();
        }
    }
    None
}

/// Makes this node's network namespace serve trees of `net` on `uplink`
/// (idempotent): the job network on-link on the uplink, forwarding, and
/// proxy ARP without delay on the uplink.
pub fn setup_node(net: &JobNetwork, uplink: &str) -> Result<(), NetError> {
    check_if_name(uplink)?;
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{uplink}/proxy_arp"), "1")?;
    // Proxy replies are delayed by up to 0.8 s by default.
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{uplink}/proxy_delay"),
        "0",
    )?;
    run(
        &format!("routing job network {net} on-link via {uplink}"),
        None,
        "ip",
        &["route", "replace", &net.to_string(), "dev", uplink],
        None,
    )?;
    Ok(())
}

fn check_if_name(name: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(NetError::Io {
            what: format!("interface name {name:?}"),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a plain interface name"),
        });
    }
    Ok(())
}

/// The node-side veth name of the tree with `address`: `cj` + the address
/// in hex (12 chars; one address lives on one node at a time).
pub fn host_if_name(address: Ipv4Addr) -> String {
    format!("cj{:08x}", u32::from(address))
}

/// One tree's network namespace with its job address, wired to this node.
/// Dropping it removes the node side (veth, route) and closes the
/// namespace (gone once the tree's processes are too).
#[derive(Debug)]
pub struct TreeNet {
    netns: OwnedFd,
    address: Ipv4Addr,
    host_if: String,
    uplink: String,
    locked: Mutex<bool>,
    /// Index of our node-side veth (0 until wired): a later namespace for
    /// the same address may own the name by the time this one is dropped.
    host_index: Mutex<u32>,
}

impl TreeNet {
    /// A fresh namespace with loopback, `eth0` at `address/32`, a default
    /// route via the node, and the node's /32 route back. Locked first if
    /// `locked` (a restore: nothing flows until the job is resumed).
    pub fn create(address: Ipv4Addr, uplink: &str, locked: bool) -> Result<TreeNet, NetError> {
        check_if_name(uplink)?;
        let netns = crate::tree::new_private_netns().map_err(io_err(format!(
            "creating a network namespace for {address}"
        )))?;
        let host_if = host_if_name(address);
        let me = TreeNet {
            netns,
            address,
            host_if,
            uplink: uplink.to_owned(),
            locked: Mutex::new(false),
            host_index: Mutex::new(0),
        };
        // A leftover of a tree that had this address here (its namespace
        // may linger briefly after the tree is gone).
        let _ = run("", None, "ip", &["link", "del", &me.host_if], None);
        if locked {
            me.lock()?;
        }
        me.wire()?;
        Ok(me)
    }

    fn wire(&self) -> Result<(), NetError> {
        let (a, h) = (self.address.to_string(), self.host_if.as_str());
        let what = format!("wiring the namespace of {a}");
        let ns_path = format!("/proc/{}/fd/{}", std::process::id(), self.netns.as_raw_fd());
        run(
            &what,
            None,
            "ip",
            &[
                "link", "add", h, "type", "veth", "peer", "name", TREE_IF, "netns", &ns_path,
            ],
            None,
        )?;
        let gw = GATEWAY.to_string();
        let inside = format!(
            "addr add {a}/32 dev {TREE_IF}\nlink set {TREE_IF} up\n\
             route add {gw} dev {TREE_IF} scope link\n\
             route add default via {gw} dev {TREE_IF} src {a}\n"
        );
        let node = format!(
            "addr add {gw}/32 dev {h} scope link\nlink set {h} up\n\
             route replace {a}/32 dev {h}\n"
        );
        let r = run(
            &what,
            Some(self.netns.as_raw_fd()),
            "ip",
            &["-batch", "-"],
            Some(&inside),
        )
        .and_then(|_| run(&what, None, "ip", &["-batch", "-"], Some(&node)));
        *lock(&self.host_index) = nix::net::if_::if_nametoindex(h).unwrap_or(0);
        if let Err(e) = r {
            self.remove_node_side();
            return Err(e);
        }
        Ok(())
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The tree's namespace (for `setns` at spawn, `--inherit-fd` at restore).
    pub fn netns(&self) -> BorrowedFd<'_> {
        self.netns.as_fd()
    }

    /// The node-side veth.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    pub fn is_locked(&self) -> bool {
        *lock(&self.locked)
    }

    /// Drops every packet of the namespace except on loopback (idempotent).
    pub fn lock(&self) -> Result<(), NetError> {
        let mut l = lock(&self.locked);
        let what = format!("locking the network of {}", self.address);
        for rule in LOCK_RULES {
            if !self.has_rule(rule) {
                let mut args = vec!["-w", "-I", rule[0], "1"];
                args.extend_from_slice(&rule[1..]);
                run(&what, Some(self.netns.as_raw_fd()), "iptables", &args, None)?;
            }
        }
        *l = true;
        Ok(())
    }

    /// Removes the lock's rules (idempotent).
    pub fn unlock(&self) -> Result<(), NetError> {
        let mut l = lock(&self.locked);
        let what = format!("unlocking the network of {}", self.address);
        for rule in LOCK_RULES {
            while self.has_rule(rule) {
                let mut args = vec!["-w", "-D"];
                args.extend_from_slice(rule);
                run(&what, Some(self.netns.as_raw_fd()), "iptables", &args, None)?;
            }
        }
        *l = false;
        Ok(())
    }

    fn has_rule(&self, rule: &[&str]) -> bool {
        let mut args = vec!["-w", "-C"];
        args.extend_from_slice(rule);
        run("", Some(self.netns.as_raw_fd()), "iptables", &args, None).is_ok()
    }

    /// Tells the uplink's segment that the address now lives here
    /// (gratuitous ARP, a few times).
    pub fn announce(&self) -> Result<(), NetError> {
        gratuitous_arp(&self.uplink, self.address, 3)
    }

    /// Deletes our node-side veth, if the name is still ours (deleting one
    /// end of a veth deletes both, and the /32 route with it).
    fn remove_node_side(&self) {
        let mine = *lock(&self.host_index);
        let now = nix::net::if_::if_nametoindex(self.host_if.as_str()).unwrap_or(0);
        if mine != 0 && now == mine {
            let _ = run("", None, "ip", &["link", "del", &self.host_if], None);
        }
    }
}

impl Drop for TreeNet {
    fn drop(&mut self) {
        self.remove_node_side();
    }
}

const LOCK_RULES: [&[&str]; 2] = [
    &["INPUT", "!", "-i", "lo", "-j", "DROP"],
    &["OUTPUT", "!", "-o", "lo", "-j", "DROP"],
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Broadcasts `count` gratuitous ARP requests for `address` with `ifname`'s
/// MAC, 50 ms apart (AF_PACKET; no `arping` on this platform).
pub fn gratuitous_arp(ifname: &str, address: Ipv4Addr, count: u32) -> Result<(), NetError> {
    let what = format!("announcing {address} on {ifname}");
    let index = nix::net::if_::if_nametoindex(ifname)
        .map_err(|e| io_err(what.clone())(io::Error::from(e)))?;
    // SAFETY: plain socket/ioctl/sendto/close calls on a socket we own,
    // with buffers and structures that live across each call.
    unsafe {
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ARP as u16).to_be() as i32,
        );
        if s < 0 {
            return Err(io_err(what)(io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in ifname.bytes().take(15).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFHWADDR, &mut ifr) < 0 {
            let e = io::Error::last_os_error();
            libc::close(s);
            return Err(io_err(what)(e));
        }
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = ifr.ifr_ifru.ifru_hwaddr.sa_data[i] as u8;
        }
        let frame = arp_frame(mac, address);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut result = Ok(());
        for i in 0..count {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let n = libc::sendto(
                s,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if n < 0 {
                result = Err(io_err(what.clone())(io::Error::last_os_error()));
                break;
            }
        }
        libc::close(s);
        result
    }
}

/// An Ethernet broadcast frame holding a gratuitous ARP request: sender and
/// target address both `ip`, sender hardware address `mac`.
pub fn arp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_frame_layout() {
        let f = arp_frame([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 211, 0, 5));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&f[28..32], &[10, 211, 0, 5]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 211, 0, 5]);
        assert_eq!(host_if_name(Ipv4Addr::new(10, 211, 0, 5)), "cj0ad30005");
    }
}
