//! The messages of a backlog: 200-byte payloads that start with their sequence number, and
//! keys drawn by the workload from the sequence number alone, so that every table of a run
//! holds the same messages and per-key order can be checked at the broker.

use std::sync::OnceLock;

use outbox_core::NewMessage;

/// Payload size of every benchmark message.
pub(crate) const PAYLOAD: usize = 200;

/// Digits of the sequence number at the start of a payload.
const SEQ_DIGITS: usize = 12;

/// Keys of the `zipf` workload.
const ZIPF_KEYS: u64 = 1_000;

/// Exponent of the `zipf` workload.
const ZIPF_S: f64 = 1.1;

/// Seed of the `zipf` draws: the same keys in every run.
const ZIPF_SEED: u64 = 0x6f75_7462_6f78_2121;

/// How the messages of a backlog spread over keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    /// Keys come back in turn, every `keys` messages (`--messages-per-key` each).
    Uniform,
    /// Every message on one key.
    Single,
    /// Each message's key drawn from 1,000 keys with a Zipf distribution (s = 1.1).
    Zipf,
}

impl Workload {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Uniform => "uniform",
            Workload::Single => "single",
            Workload::Zipf => "zipf",
        }
    }
}

/// The keys of one backlog: a workload and, for `uniform`, how many keys there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Keys {
    workload: Workload,
    uniform: u64,
}

impl Keys {
    /// The keys of a backlog of `messages` with about `per_key` messages per key (`uniform`).
    pub(crate) fn new(workload: Workload, messages: u64, per_key: u64) -> Self {
        Self {
            workload,
            uniform: (messages / per_key.max(1)).max(1),
        }
    }

    /// A key of its own for every message.
    pub(crate) fn one_per_message() -> Self {
        Self {
            workload: Workload::Uniform,
            uniform: u64::MAX,
        }
    }

    pub(crate) fn workload(&self) -> Workload {
        self.workload
    }

    /// Distinct keys the backlog can use.
    pub(crate) fn count(&self) -> u64 {
        match self.workload {
            Workload::Uniform => self.uniform,
            Workload::Single => 1,
            Workload::Zipf => ZIPF_KEYS,
        }
    }

    /// The key of message `seq`.
    pub(crate) fn key(&self, seq: u64) -> String {
        let k = match self.workload {
            Workload::Uniform => seq % self.uniform,
            Workload::Single => 0,
            Workload::Zipf => zipf_rank(seq),
        };
        format!("k{k}")
    }
}

/// SplitMix64: a well-mixed 64-bit value for each input.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Cumulative Zipf probabilities of ranks `0..ZIPF_KEYS` (rank 0 the most frequent).
fn zipf_cdf() -> &'static [f64] {
    static CDF: OnceLock<Vec<f64>> = OnceLock::new();
    CDF.get_or_init(|| {
        let weights: Vec<f64> = (1..=ZIPF_KEYS)
            .map(|k| 1.0 / (k as f64).powf(ZIPF_S))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut sum = 0.0;
        weights
            .iter()
            .map(|w| {
                sum += w / total;
                sum
            })
            .collect()
    })
}

/// The Zipf rank of message `seq`, by inverse CDF of a uniform draw seeded by `seq`.
fn zipf_rank(seq: u64) -> u64 {
    let u = (mix(ZIPF_SEED ^ seq) >> 11) as f64 / (1u64 << 53) as f64;
    let cdf = zipf_cdf();
    let rank = cdf.partition_point(|p| *p <= u);
    rank.min(cdf.len() - 1) as u64
}

/// Message `seq` of a backlog with keys `keys`, to `destination`.
pub(crate) fn message(destination: &str, seq: u64, keys: Keys) -> NewMessage {
    let mut payload = format!("{seq:0width$} ", width = SEQ_DIGITS).into_bytes();
    payload.resize(PAYLOAD, b'x');
    NewMessage::new(destination, payload).key(keys.key(seq))
}

/// The sequence number a payload starts with.
pub(crate) fn seq_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..SEQ_DIGITS)?)
        .ok()?
        .parse()
        .ok()
}

/// Checks deliveries `(key, seq)` in broker order: every sequence number in `0..expected`
/// arrives, and the first delivery of each message comes after the first delivery of every
/// earlier message of its key. Returns (distinct, duplicates, order violations).
pub(crate) fn check_order(
    deliveries: impl IntoIterator<Item = (String, u64)>,
    expected: u64,
) -> (u64, u64, u64) {
    let mut seen = vec![false; usize::try_from(expected).unwrap_or(0)];
    let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let (mut distinct, mut duplicates, mut violations) = (0, 0, 0);
    for (key, seq) in deliveries {
        let Some(slot) = usize::try_from(seq).ok().and_then(|i| seen.get_mut(i)) else {
            violations += 1;
            continue;
        };
        if *slot {
            duplicates += 1;
            continue;
        }
        *slot = true;
        distinct += 1;
        if let Some(previous) = last.insert(key, seq)
            && previous > seq
        {
            violations += 1;
        }
    }
    (distinct, duplicates, violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_sequence_and_size() {
        let msg = message("d", 42, Keys::new(Workload::Uniform, 100, 10));
        assert_eq!(msg.payload().len(), PAYLOAD);
        assert_eq!(seq_of(msg.payload()), Some(42));
        assert_eq!(msg.ordering_key(), Some("k2"));
    }

    #[test]
    fn keys_follow_the_workload() {
        let single = Keys::new(Workload::Single, 1000, 10);
        assert_eq!(single.count(), 1);
        assert!((0..100).all(|seq| single.key(seq) == "k0"));
        assert_eq!(Keys::one_per_message().key(123_456), "k123456");

        let zipf = Keys::new(Workload::Zipf, 100_000, 10);
        assert_eq!(zipf.count(), ZIPF_KEYS);
        // The same message gets the same key in every table and every run.
        assert_eq!(zipf.key(7), zipf.key(7));
        let mut counts = vec![0u64; ZIPF_KEYS as usize];
        for seq in 0..100_000 {
            counts[zipf_rank(seq) as usize] += 1;
        }
        // Rank 1 takes about 1 / H(1000, 1.1) = 17% of the messages, rank 2 half as much
        // again (2^-1.1), and the tail is long but not empty.
        let top = counts[0] as f64 / 100_000.0;
        assert!((0.15..0.19).contains(&top), "top key share {top}");
        let second = counts[1] as f64 / counts[0] as f64;
        assert!((0.42..0.51).contains(&second), "second to first {second}");
        assert!(counts.iter().filter(|c| **c > 0).count() > 900);
    }

    #[test]
    fn order_violations_and_duplicates_are_counted() {
        let ok = [("a", 0), ("b", 1), ("a", 2), ("a", 2)];
        let ok = ok.iter().map(|(k, s)| (k.to_string(), *s));
        assert_eq!(check_order(ok, 3), (3, 1, 0));
        let bad = [("a", 2), ("a", 0), ("b", 1)];
        let bad = bad.iter().map(|(k, s)| (k.to_string(), *s));
        assert_eq!(check_order(bad, 3), (3, 0, 1));
    }
}
