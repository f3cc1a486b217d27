//! The messages of a backlog: 200-byte payloads that start with their sequence number, keys
//! that come back every `keys` messages, so that per-key order can be checked at the broker.

use outbox_core::NewMessage;

/// Payload size of every benchmark message.
pub(crate) const PAYLOAD: usize = 200;

/// Digits of the sequence number at the start of a payload.
const SEQ_DIGITS: usize = 12;

/// Message `seq` of a backlog with `keys` distinct keys, to `destination`.
pub(crate) fn message(destination: &str, seq: u64, keys: u64) -> NewMessage {
    let mut payload = format!("{seq:0width$} ", width = SEQ_DIGITS).into_bytes();
    payload.resize(PAYLOAD, b'x');
    NewMessage::new(destination, payload).key(format!("k{}", seq % keys.max(1)))
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
        let msg = message("d", 42, 10);
        assert_eq!(msg.payload().len(), PAYLOAD);
        assert_eq!(seq_of(msg.payload()), Some(42));
        assert_eq!(msg.ordering_key(), Some("k2"));
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
