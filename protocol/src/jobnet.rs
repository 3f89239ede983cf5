//! Job networks: the IPv4 network job-stable addresses come from
//! (`job_network` in coordinator.toml), shared by the coordinator, which
//! allocates, and the agents, which route it.

use std::net::Ipv4Addr;
use std::str::FromStr;

/// A job network, e.g. `10.211.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobNetwork {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl JobNetwork {
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.base)
    }

    /// Usable host addresses (network and broadcast addresses excluded).
    pub fn hosts(&self) -> u32 {
        (!self.mask()).saturating_sub(1)
    }

    /// The `i`-th host address (0-based), if there is one.
    pub fn host(&self, i: u32) -> Option<Ipv4Addr> {
        (i < self.hosts()).then(|| Ipv4Addr::from(u32::from(self.base) + 1 + i))
    }
}

impl std::fmt::Display for JobNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for JobNetwork {
    type Err = String;

    /// `a.b.c.d/n` with 8 <= n <= 30 and no host bits set.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 network like 10.211.0.0/16"))?;
        let base: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} in {s:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} in {s:?} is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "prefix length /{prefix} of {s:?} is outside /8../30"
            ));
        }
        let n = JobNetwork { base, prefix };
        if u32::from(base) & !n.mask() != 0 {
            return Err(format!(
                "{s:?} has host bits set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(base) & n.mask())
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_networks_parse_and_refuse_clearly() {
        let n: JobNetwork = "10.211.0.0/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.211.0.0/16");
        assert!(n.contains("10.211.255.7".parse().unwrap()));
        assert!(!n.contains("10.212.0.1".parse().unwrap()));
        assert_eq!(n.hosts(), 65534);
        assert_eq!(n.host(0), Some(Ipv4Addr::new(10, 211, 0, 1)));
        assert_eq!(n.host(65533), Some(Ipv4Addr::new(10, 211, 255, 254)));
        assert_eq!(n.host(65534), None);
        for (bad, says) in [
            ("10.211.0.0", "not an IPv4 network"),
            ("10.211.0.1/16", "host bits"),
            ("10.211.0.0/31", "outside"),
            ("10.211.0/16", "not an IPv4 address"),
            ("10.211.0.0/x", "not a prefix length"),
        ] {
            let e = bad.parse::<JobNetwork>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
