//! The per-rank control socket protocol (`$CKPT_SHIM_DIR/<world rank>.sock`,
//! SOCK_STREAM, one line per message):
//!
//! ```text
//! agent -> rank:  DRAIN
//! rank  -> agent: READY sent=<n> received=<n> stashed=<n> rounds=<n>
//!                 (or FAIL <reason>)
//! agent -> rank:  RESUME
//! rank  -> agent: RESUMED
//! ```

/// What a rank reports once drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub sent: u64,
    pub received: u64,
    pub stashed: u64,
    /// Count-exchange rounds this drain took (more than 1 when ranks were
    /// inside collectives); the same on every rank.
    pub rounds: u64,
}

impl Ready {
    pub fn line(&self) -> String {
        format!(
            "READY sent={} received={} stashed={} rounds={}\n",
            self.sent, self.received, self.stashed, self.rounds
        )
    }

    pub fn parse(line: &str) -> Result<Ready, String> {
        let line = line.trim_end();
        let rest = line
            .strip_prefix("READY ")
            .ok_or_else(|| format!("expected `READY ...`, got {line:?}"))?;
        let mut r = Ready {
            sent: 0,
            received: 0,
            stashed: 0,
            rounds: 0,
        };
        let mut seen = 0;
        for kv in rest.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("bad field {kv:?} in {line:?}"))?;
            let v: u64 = v
                .parse()
                .map_err(|e| format!("bad value of {k} in {line:?}: {e}"))?;
            match k {
                "sent" => r.sent = v,
                "received" => r.received = v,
                "stashed" => r.stashed = v,
                "rounds" => r.rounds = v,
                _ => return Err(format!("unknown field {k:?} in {line:?}")),
            }
            seen += 1;
        }
        if seen != 4 {
            return Err(format!(
                "expected sent, received, stashed, rounds in {line:?}"
            ));
        }
        Ok(r)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ready_round_trips() {
        let r = Ready {
            sent: 10,
            received: 9,
            stashed: 2,
            rounds: 3,
        };
        assert_eq!(Ready::parse(&r.line()), Ok(r));
    }

    #[test]
    fn garbage_is_refused_with_the_line() {
        let e = Ready::parse("FAIL inside MPI_Allreduce").unwrap_err();
        assert!(e.contains("FAIL inside"), "{e}");
        assert!(Ready::parse("READY sent=1 received=x stashed=0").is_err());
        assert!(Ready::parse("READY sent=1").is_err());
    }
}
