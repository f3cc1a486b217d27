//! Which live relay owns which partition: rendezvous hashing, so that a relay joining or
//! leaving moves only the partitions it takes or gives up.

use crate::{RelayId, RelayMember};

/// The live relay with the highest score owns the partition.
pub(super) fn owner_of(partition: u16, relays: &[RelayMember]) -> Option<&RelayId> {
    relays
        .iter()
        .map(|member| &member.id)
        .max_by_key(|id| score(partition, id.as_str()))
}

fn score(partition: u16, relay: &str) -> u64 {
    // FNV-1a 64 over relay id and partition, then a finalizer (splitmix64) to spread the bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in relay
        .as_bytes()
        .iter()
        .chain(partition.to_le_bytes().iter())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PARTITIONS;
    use chrono::Utc;

    fn member(id: &str) -> RelayMember {
        RelayMember {
            id: RelayId::new(id),
            expires_at: Utc::now(),
            partitions: Vec::new(),
        }
    }

    #[test]
    fn rendezvous_spreads_partitions_and_moves_few_on_join() {
        let two = [member("a"), member("b")];
        let three = [member("a"), member("b"), member("c")];
        let share = |relays: &[RelayMember], id: &str| {
            (0..PARTITIONS)
                .filter(|p| owner_of(*p, relays).map(RelayId::as_str) == Some(id))
                .count()
        };
        for id in ["a", "b"] {
            let n = share(&two, id);
            assert!((20..=44).contains(&n), "{id} owns {n} of 64");
        }
        for id in ["a", "b", "c"] {
            let n = share(&three, id);
            assert!((10..=34).contains(&n), "{id} owns {n} of 64");
        }
        // Joining moves partitions only to the newcomer.
        for p in 0..PARTITIONS {
            let before = owner_of(p, &two);
            let after = owner_of(p, &three);
            assert!(before == after || after.map(RelayId::as_str) == Some("c"));
        }
    }
}
