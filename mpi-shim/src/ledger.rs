//! Count bookkeeping of the drain: a rank is drained when it has received
//! from every peer exactly as many messages as that peer says it sent to it.

/// What is still missing at one rank, given `sent_to_me[p]` (peer p's count
/// of messages sent to this rank, from the all-to-all exchange) and
/// `received[p]` (this rank's count of messages received from p).
/// Errors name the peer if a count went backwards (received more than sent),
/// which means a message was counted twice or a send was not counted.
pub fn missing(sent_to_me: &[u64], received: &[u64]) -> Result<u64, String> {
    if sent_to_me.len() != received.len() {
        return Err(format!(
            "count vectors differ in length: {} peers sent, {} peers received",
            sent_to_me.len(),
            received.len()
        ));
    }
    let mut total = 0u64;
    for (peer, (&s, &r)) in sent_to_me.iter().zip(received).enumerate() {
        if r > s {
            return Err(format!(
                "rank received {r} messages from world rank {peer}, which sent only {s}"
            ));
        }
        total += s - r;
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn balanced_counts_are_drained() {
        assert_eq!(missing(&[3, 0, 7], &[3, 0, 7]), Ok(0));
    }

    #[test]
    fn in_flight_messages_are_missing() {
        assert_eq!(missing(&[3, 2, 7], &[1, 2, 5]), Ok(4));
    }

    #[test]
    fn over_received_names_the_peer() {
        let e = missing(&[3, 2], &[3, 5]).unwrap_err();
        assert!(e.contains("world rank 1"), "{e}");
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(missing(&[1], &[1, 0]).is_err());
    }
}
