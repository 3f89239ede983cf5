//! Maps from an outstanding receive request handle (or nonblocking
//! collective) to what the shim needs to count it when it completes:
//! [`ReqMap`], a direct-mapped array in front of [`ReqTable`], an
//! open-addressing table (linear probing, backward-shift deletion, no
//! tombstones) for the keys whose direct slot is taken. Allocated at
//! MPI_Init; they allocate again only when the overflow table must grow
//! past its largest size so far.

#[derive(Debug)]
pub struct ReqTable<V: Copy> {
    /// (key, value); key 0 = empty slot. Keys and values side by side: one
    /// cache line per probe.
    slots: Box<[(usize, Option<V>)]>,
    len: usize,
    mask: usize,
    /// 64 - log2(capacity): the hash is the top bits of the product.
    shift: u32,
}

impl<V: Copy> ReqTable<V> {
    /// `capacity` is rounded up to a power of two; at most 3/4 is used
    /// before the table doubles (the only allocation after creation, when
    /// more requests are outstanding than ever before).
    pub fn with_capacity(capacity: usize) -> Self {
        let cap = capacity.next_power_of_two().max(8);
        ReqTable {
            slots: vec![(0, None); cap].into_boxed_slice(),
            len: 0,
            mask: cap - 1,
            shift: 64 - cap.trailing_zeros(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// How many entries fit before the table grows.
    pub fn limit(&self) -> usize {
        (self.mask + 1) / 4 * 3
    }

    #[inline(always)]
    fn home(&self, key: usize) -> usize {
        // Fibonacci hashing: handles are aligned pointers or small ints.
        (key as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_shr(self.shift) as usize
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, ReqTable::with_capacity((self.mask + 1) * 2));
        for (k, v) in old.slots.iter() {
            if let (true, Some(v)) = (*k != 0, v) {
                self.insert(*k, *v);
            }
        }
    }

    /// Insert or replace.
    pub fn insert(&mut self, key: usize, val: V) {
        debug_assert!(key != 0);
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                self.slots[i].1 = Some(val);
                return;
            }
            if k == 0 {
                if self.len >= self.limit() {
                    self.grow();
                    self.insert(key, val);
                    return;
                }
                self.slots[i] = (key, Some(val));
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn find(&self, key: usize) -> Option<usize> {
        if key == 0 || self.len == 0 {
            return None;
        }
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                return Some(i);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, key: usize) -> Option<V> {
        self.find(key).and_then(|i| self.slots[i].1)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut V> {
        let i = self.find(key)?;
        self.slots[i].1.as_mut()
    }

    #[inline]
    pub fn remove(&mut self, key: usize) -> Option<V> {
        let mut hole = self.find(key)?;
        let out = self.slots[hole].1.take();
        self.slots[hole].0 = 0;
        self.len -= 1;
        // Backward shift: move later entries of the cluster into the hole
        // when their home position is not between the hole and them.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let k = self.slots[j].0;
            if k == 0 {
                break;
            }
            let dist_j = j.wrapping_sub(self.home(k)) & self.mask;
            let dist_hole = j.wrapping_sub(hole) & self.mask;
            if dist_j >= dist_hole {
                self.slots[hole] = (k, self.slots[j].1.take());
                self.slots[j].0 = 0;
                hole = j;
            }
        }
        out
    }

    /// Every (key, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, V)> + '_ {
        self.slots
            .iter()
            .filter_map(|&(k, v)| if k == 0 { None } else { v.map(|v| (k, v)) })
    }
}

/// The shim's request map: a direct-mapped array of 16-byte slots (one slot
/// per key, no probing, no hashing: the slot is a few bits of the handle)
/// in front of a [`ReqTable`] that takes the keys whose slot is taken.
/// Values are small `Copy` words (the shim packs its into a u64).
///
/// The slot is `(key >> shift) ^ (key >> (shift + log2 slots))`, masked:
/// MPI implementations hand out request handles with a constant stride
/// (Open MPI: pointers into a free list of 768-byte ob1 requests; MPICH:
/// an index in the low bits), so consecutive requests land in nearby,
/// distinct slots — sequential memory for the prefetcher, no multiply.
/// A bad `shift` only costs overflow-table trips, never correctness.
#[derive(Debug)]
pub struct ReqMap<V: Copy + Default> {
    /// (key, value); key 0 = empty.
    direct: Box<[(usize, V)]>,
    shift: u32,
    fold: u32,
    mask: usize,
    overflow: ReqTable<V>,
    len: usize,
}

impl<V: Copy + Default> ReqMap<V> {
    /// `slots` (rounded up to a power of two) direct slots; `shift`: log2
    /// of the typical distance between two handles (see the type's doc).
    pub fn new(slots: usize, shift: u32) -> Self {
        let cap = slots.next_power_of_two().max(8);
        ReqMap {
            direct: vec![(0, V::default()); cap].into_boxed_slice(),
            shift: shift.min(32),
            fold: shift.min(32) + cap.trailing_zeros(),
            mask: cap - 1,
            overflow: ReqTable::with_capacity(64),
            len: 0,
        }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn slot(&self, key: usize) -> usize {
        ((key >> self.shift) ^ (key >> self.fold)) & self.mask
    }

    /// Insert or replace.
    #[inline(always)]
    pub fn insert(&mut self, key: usize, val: V) {
        debug_assert!(key != 0);
        let i = self.slot(key);
        let s = &mut self.direct[i];
        if s.0 == key || (s.0 == 0 && self.overflow.is_empty()) {
            if s.0 == 0 {
                self.len += 1;
            }
            *s = (key, val);
            return;
        }
        self.insert_slow(i, key, val);
    }

    #[inline(never)]
    fn insert_slow(&mut self, i: usize, key: usize, val: V) {
        if self.direct[i].0 == 0 && self.overflow.get(key).is_none() {
            self.direct[i] = (key, val);
            self.len += 1;
            return;
        }
        let before = self.overflow.len();
        self.overflow.insert(key, val);
        self.len += self.overflow.len() - before;
    }

    #[inline]
    pub fn get(&self, key: usize) -> Option<V> {
        let s = self.direct[self.slot(key)];
        if s.0 == key && key != 0 {
            return Some(s.1);
        }
        self.overflow.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut V> {
        let i = self.slot(key);
        if self.direct[i].0 == key && key != 0 {
            return Some(&mut self.direct[i].1);
        }
        self.overflow.get_mut(key)
    }

    #[inline(always)]
    pub fn remove(&mut self, key: usize) -> Option<V> {
        let i = self.slot(key);
        let s = &mut self.direct[i];
        if s.0 == key && key != 0 {
            s.0 = 0;
            self.len -= 1;
            return Some(s.1);
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.remove_slow(key)
    }

    #[inline(never)]
    fn remove_slow(&mut self, key: usize) -> Option<V> {
        let out = self.overflow.remove(key);
        if out.is_some() {
            self.len -= 1;
        }
        out
    }

    /// Remove every key of `keys` that is present, calling `f(position in
    /// keys, value)` for each: the batch form of [`ReqMap::remove`] for
    /// MPI_Waitall and friends, with the table's geometry in registers.
    #[inline(always)]
    pub fn remove_each(&mut self, keys: &[usize], mut f: impl FnMut(usize, V)) {
        if self.len == 0 {
            return;
        }
        let ReqMap {
            direct,
            shift,
            fold,
            mask,
            overflow,
            ..
        } = self;
        let (shift, fold, mask) = (*shift, *fold, *mask);
        let direct: &mut [(usize, V)] = direct;
        let mut removed = 0;
        for (pos, &key) in keys.iter().enumerate() {
            let i = ((key >> shift) ^ (key >> fold)) & mask;
            let s = &mut direct[i];
            if s.0 == key && key != 0 {
                s.0 = 0;
                removed += 1;
                f(pos, s.1);
            } else if !overflow.is_empty() {
                if let Some(v) = overflow.remove(key) {
                    removed += 1;
                    f(pos, v);
                }
            }
        }
        self.len -= removed;
    }

    /// Every (key, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, V)> + '_ {
        self.direct
            .iter()
            .filter(|&&(k, _)| k != 0)
            .copied()
            .chain(self.overflow.iter())
    }
}

/// Why a tracked request matters at completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// A receive: `world_src` >= 0 if the source was given, else the
    /// communicator's rank map is needed (`map`, 0 = MPI_COMM_WORLD).
    Recv {
        world_src: i32,
        map: usize,
        counted: bool,
    },
    /// An application nonblocking collective.
    Coll,
}

const T_COLL: u64 = 1 << 63;
const T_COUNTED: u64 = 1 << 62;
const T_ANY: u64 = 1 << 61;
const T_LOW: u64 = (1 << 48) - 1;

impl Tracked {
    /// Bits of a packed word other than a known world source: a packed
    /// word without them is `world_src` of an uncounted receive.
    pub const FLAGS: u64 = T_COLL | T_COUNTED | T_ANY;

    /// One word, for 16-byte table slots: bit 63 collective, bit 62
    /// counted, bit 61 "source from the status" with the map address (user
    /// space addresses fit 48 bits) in the low bits, else the world source.
    #[inline(always)]
    pub fn pack(self) -> u64 {
        match self {
            Tracked::Coll => T_COLL,
            Tracked::Recv {
                world_src,
                map,
                counted,
            } => {
                let c = if counted { T_COUNTED } else { 0 };
                if world_src >= 0 {
                    c | world_src as u32 as u64
                } else {
                    c | T_ANY | (map as u64 & T_LOW)
                }
            }
        }
    }

    #[inline(always)]
    pub fn unpack(w: u64) -> Tracked {
        if w & T_COLL != 0 {
            return Tracked::Coll;
        }
        let counted = w & T_COUNTED != 0;
        if w & T_ANY != 0 {
            Tracked::Recv {
                world_src: -1,
                map: (w & T_LOW) as usize,
                counted,
            }
        } else {
            Tracked::Recv {
                world_src: (w & 0xffff_ffff) as u32 as i32,
                map: 0,
                counted,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn insert_get_remove() {
        let mut t = ReqTable::with_capacity(16);
        t.insert(0x1000, 1u32);
        t.insert(0x2000, 2);
        assert_eq!(t.get(0x1000), Some(1));
        assert_eq!(t.remove(0x1000), Some(1));
        assert_eq!(t.get(0x1000), None);
        assert_eq!(t.get(0x2000), Some(2));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_grows_and_keeps_everything() {
        let mut t = ReqTable::with_capacity(8);
        for k in 1..=1000usize {
            t.insert(k * 8, k);
        }
        assert_eq!(t.len(), 1000);
        assert!(t.limit() >= 1000);
        for k in 1..=1000usize {
            assert_eq!(t.get(k * 8), Some(k));
        }
    }

    #[test]
    fn random_ops_agree_with_a_hashmap() {
        // Deterministic xorshift; keys collide often (small key space).
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t = ReqTable::with_capacity(8);
        let mut m = HashMap::new();
        for _ in 0..200_000 {
            let k = (next() % 96 + 1) as usize * 64; // aligned like pointers
            if next() % 2 == 0 {
                let v = next() as u32;
                t.insert(k, v);
                m.insert(k, v);
            } else {
                assert_eq!(t.remove(k), m.remove(&k));
            }
            assert_eq!(t.len(), m.len());
        }
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(*v));
        }
        assert_eq!(t.iter().count(), m.len());
    }

    #[test]
    fn reqmap_random_ops_agree_with_a_hashmap() {
        let mut x: u64 = 0x9abc_def1_2345_6789;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // 16 direct slots for up to 200 keys: most go to the overflow.
        let mut t = ReqMap::new(16, 0);
        let mut m = HashMap::new();
        for _ in 0..200_000 {
            let k = (next() % 200 + 1) as usize * 0x280;
            match next() % 3 {
                0 => {
                    let v = next() as u32;
                    t.insert(k, v);
                    m.insert(k, v);
                }
                1 => assert_eq!(t.remove(k), m.remove(&k)),
                _ => {
                    if let Some(v) = t.get_mut(k) {
                        *v += 1;
                        *m.get_mut(&k).unwrap() += 1;
                    }
                    assert_eq!(t.get(k), m.get(&k).copied());
                }
            }
            assert_eq!(t.len(), m.len());
        }
        let mut all: Vec<_> = t.iter().collect();
        all.sort();
        let mut want: Vec<_> = m.into_iter().collect();
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn strided_handles_take_distinct_direct_slots() {
        // Open MPI ob1 receive requests (768 bytes apart, shift 7) and
        // MPICH handles (index in the low bits, shift 0): a window of 128
        // outstanding requests needs no overflow.
        for (base, stride, shift) in [
            (0x5596_086b_bc80usize, 0x300usize, 7),
            (0xec00_0437, usize::MAX, 0), // decreasing indices
            (0x0000_0000_ac00_0000, 1, 0),
        ] {
            let mut t = ReqMap::new(1024, shift);
            let keys: Vec<usize> = (0..128)
                .map(|i| base.wrapping_add(stride.wrapping_mul(i)))
                .collect();
            for (i, &k) in keys.iter().enumerate() {
                t.insert(k, i as u64);
            }
            assert!(t.overflow.is_empty(), "stride {stride:#x}: overflow used");
            for (i, &k) in keys.iter().enumerate() {
                assert_eq!(t.remove(k), Some(i as u64));
            }
            assert!(t.is_empty());
        }
    }

    #[test]
    fn remove_each_agrees_with_remove() {
        let mut x: u64 = 0x1357_9bdf_2468_ace1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // 16 direct slots, keys colliding often: both tables are used.
        let mut a = ReqMap::new(16, 4);
        let mut b = ReqMap::new(16, 4);
        for _ in 0..2000 {
            let keys: Vec<usize> = (0..(next() % 40) as usize)
                .map(|_| (next() % 300) as usize * 0x30)
                .collect();
            for &k in &keys {
                if k != 0 && next() % 3 != 0 {
                    let v = next() as u32;
                    a.insert(k, v);
                    b.insert(k, v);
                }
            }
            let mut got = Vec::new();
            a.remove_each(&keys, |pos, v| got.push((pos, v)));
            let mut want = Vec::new();
            for (pos, &k) in keys.iter().enumerate() {
                if let Some(v) = b.remove(k) {
                    want.push((pos, v));
                }
            }
            assert_eq!(got, want);
            assert_eq!(a.len(), b.len());
        }
    }

    #[test]
    fn reqmap_with_a_bad_shift_is_still_exact() {
        // Every key in one slot: all but one go to the overflow table.
        let mut t = ReqMap::new(64, 20);
        for k in 1..=500usize {
            t.insert(k * 8, k as u64);
        }
        assert_eq!(t.len(), 500);
        for k in (1..=500usize).rev() {
            assert_eq!(t.get(k * 8), Some(k as u64));
            assert_eq!(t.remove(k * 8), Some(k as u64));
            assert_eq!(t.remove(k * 8), None);
        }
        assert!(t.is_empty());
    }

    #[test]
    fn tracked_packs_into_one_word_and_back() {
        for t in [
            Tracked::Coll,
            Tracked::Recv {
                world_src: 0,
                map: 0,
                counted: false,
            },
            Tracked::Recv {
                world_src: 4095,
                map: 0,
                counted: true,
            },
            Tracked::Recv {
                world_src: -1,
                map: 0x7fff_dead_beef,
                counted: false,
            },
            Tracked::Recv {
                world_src: -1,
                map: 0,
                counted: true,
            },
        ] {
            assert_eq!(Tracked::unpack(t.pack()), t);
        }
    }
}
