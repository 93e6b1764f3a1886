//! Choosing a backend among a route's weighted traffic: random by weight, or sticky by a
//! header's value with weighted rendezvous hashing.
//!
//! Rendezvous (highest-random-weight) hashing gives each key a score per backend and picks the
//! best; scaling the score by weight keeps the split proportional, and a weight change only
//! moves the keys whose winner changes (about the changed share), never reshuffles the rest.

/// A route's split, compiled once per table.
#[derive(Debug, Clone)]
pub struct Split {
    /// `(index into the route's backends, weight, backend-name hash)`, weight > 0 only.
    entries: Vec<(usize, u32, u64)>,
    total: u64,
}

impl Split {
    /// Builds a split from `(backend name, weight, can take traffic)`.
    pub fn new<'a>(backends: impl IntoIterator<Item = (&'a str, u32, bool)>) -> Self {
        let entries: Vec<_> = backends
            .into_iter()
            .enumerate()
            .filter(|(_, (_, w, usable))| *w > 0 && *usable)
            .map(|(i, (name, w, _))| (i, w, hash_bytes(name.as_bytes())))
            .collect();
        let total = entries.iter().map(|e| u64::from(e.1)).sum();
        Self { entries, total }
    }

    /// Whether no backend can receive traffic.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Picks by weight with a uniform random number `r`.
    pub fn pick_weighted(&self, r: u64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut point = r % self.total;
        for &(i, w, _) in &self.entries {
            let w = u64::from(w);
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }

    /// Picks the same backend for the same key as long as the weights allow it.
    pub fn pick_sticky(&self, key: &[u8]) -> Option<usize> {
        let k = hash_bytes(key);
        self.entries
            .iter()
            .map(|&(i, w, h)| {
                // Uniform in (0, 1]; score = -w / ln(u) is the weighted-rendezvous key whose
                // argmax picks backend i with probability w / total.
                let u = ((mix(k ^ h) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let score = -f64::from(w) / u.ln();
                (i, score)
            })
            .fold(None, |best: Option<(usize, f64)>, (i, s)| match best {
                Some((_, bs)) if bs >= s => best,
                _ => Some((i, s)),
            })
            .map(|(i, _)| i)
    }
}

/// FNV-1a then a finalizer: stable across processes and releases, so every router replica
/// pins a key to the same backend.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finalizer: spreads nearby inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(split: &Split, n: usize, f: impl Fn(&Split, usize) -> Option<usize>) -> Vec<usize> {
        let mut c = vec![0; 3];
        for i in 0..n {
            c[f(split, i).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn weighted_follows_weights_and_skips_zero() {
        let s = Split::new([("a", 90, true), ("b", 10, true), ("c", 0, true)]);
        let c = counts(&s, 100, |s, i| s.pick_weighted(i as u64));
        assert_eq!(c, vec![90, 10, 0]);
        let unusable = Split::new([("a", 90, false), ("b", 0, true)]);
        assert!(unusable.is_empty());
        assert_eq!(unusable.pick_weighted(3), None);
        assert_eq!(unusable.pick_sticky(b"k"), None);
    }

    #[test]
    fn sticky_is_proportional_and_remaps_minimally() {
        let before = Split::new([("a", 50, true), ("b", 50, true), ("c", 0, true)]);
        let after = Split::new([("a", 60, true), ("b", 40, true), ("c", 0, true)]);
        let n = 20_000;
        let key = |i: usize| format!("user-{i}");
        let c = counts(&before, n, |s, i| s.pick_sticky(key(i).as_bytes()));
        assert!((c[0] as f64 / n as f64 - 0.5).abs() < 0.02, "{c:?}");
        assert_eq!(c[2], 0);
        let moved = (0..n)
            .filter(|&i| {
                before.pick_sticky(key(i).as_bytes()) != after.pick_sticky(key(i).as_bytes())
            })
            .count();
        // Only the 10% share that changed hands should move.
        assert!((moved as f64 / n as f64) < 0.13, "moved {moved}");
        // Keys only ever move towards the backend that gained weight.
        assert!((0..n).all(|i| {
            let (b, a) = (
                before.pick_sticky(key(i).as_bytes()),
                after.pick_sticky(key(i).as_bytes()),
            );
            b == a || a == Some(0)
        }));
    }
}
