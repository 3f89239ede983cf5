//! Messages received by the shim during a drain, handed to the
//! application's later receives in MPI matching order: the oldest stashed
//! message whose (communicator, source, tag) matches the receive. MPI's
//! non-overtaking rule only orders messages of one sender on one
//! communicator, and the stash keeps arrival order, which respects it.

use std::collections::VecDeque;

/// One stashed message (payload in the sender's packed byte representation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stashed {
    /// The communicator handle, as an integer.
    pub comm: u64,
    /// Source rank in that communicator.
    pub source: i32,
    pub tag: i32,
    pub data: Vec<u8>,
}

/// A receive's selector; `None` is MPI_ANY_SOURCE / MPI_ANY_TAG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    pub comm: u64,
    pub source: Option<i32>,
    pub tag: Option<i32>,
}

impl Selector {
    fn matches(&self, m: &Stashed) -> bool {
        m.comm == self.comm
            && self.source.is_none_or(|s| s == m.source)
            && self.tag.is_none_or(|t| t == m.tag)
    }
}

#[derive(Debug, Default)]
pub struct Stash {
    q: VecDeque<Stashed>,
}

impl Stash {
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
    pub fn len(&self) -> usize {
        self.q.len()
    }
    pub fn push(&mut self, m: Stashed) {
        self.q.push_back(m);
    }
    /// The message a probe with `sel` would see (not removed).
    pub fn peek(&self, sel: &Selector) -> Option<&Stashed> {
        self.q.iter().find(|m| sel.matches(m))
    }
    /// Remove and return the message a receive with `sel` matches.
    pub fn take(&mut self, sel: &Selector) -> Option<Stashed> {
        let i = self.q.iter().position(|m| sel.matches(m))?;
        self.q.remove(i)
    }
    /// Drop every message of a freed communicator; returns how many.
    pub fn forget_comm(&mut self, comm: u64) -> usize {
        let before = self.q.len();
        self.q.retain(|m| m.comm != comm);
        before - self.q.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(comm: u64, source: i32, tag: i32, byte: u8) -> Stashed {
        Stashed {
            comm,
            source,
            tag,
            data: vec![byte],
        }
    }
    fn sel(comm: u64, source: Option<i32>, tag: Option<i32>) -> Selector {
        Selector { comm, source, tag }
    }

    #[test]
    fn same_sender_same_tag_keeps_order() {
        let mut s = Stash::default();
        s.push(m(1, 0, 5, 1));
        s.push(m(1, 0, 5, 2));
        s.push(m(1, 0, 5, 3));
        for want in 1..=3 {
            assert_eq!(s.take(&sel(1, Some(0), Some(5))).unwrap().data, vec![want]);
        }
        assert!(s.is_empty());
    }

    #[test]
    fn selectors_respect_comm_source_and_tag() {
        let mut s = Stash::default();
        s.push(m(1, 0, 5, 1));
        s.push(m(2, 0, 5, 2)); // other communicator
        s.push(m(1, 1, 5, 3)); // other source
        s.push(m(1, 0, 6, 4)); // other tag
        assert_eq!(s.take(&sel(1, Some(0), Some(6))).unwrap().data, vec![4]);
        assert_eq!(s.take(&sel(2, None, None)).unwrap().data, vec![2]);
        assert_eq!(s.take(&sel(1, Some(1), None)).unwrap().data, vec![3]);
        assert!(s.take(&sel(1, Some(1), None)).is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn wildcards_take_the_oldest_match() {
        let mut s = Stash::default();
        s.push(m(1, 2, 9, 1));
        s.push(m(1, 0, 5, 2));
        s.push(m(1, 2, 9, 3));
        assert_eq!(s.peek(&sel(1, None, Some(5))).unwrap().data, vec![2]);
        assert_eq!(s.take(&sel(1, None, None)).unwrap().data, vec![1]);
        assert_eq!(s.take(&sel(1, None, None)).unwrap().data, vec![2]);
        assert_eq!(s.take(&sel(1, None, None)).unwrap().data, vec![3]);
    }

    #[test]
    fn freeing_a_comm_forgets_its_messages() {
        let mut s = Stash::default();
        s.push(m(1, 0, 0, 1));
        s.push(m(2, 0, 0, 2));
        s.push(m(1, 0, 0, 3));
        assert_eq!(s.forget_comm(1), 2);
        assert_eq!(s.len(), 1);
    }
}
