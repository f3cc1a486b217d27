//! [`Lsn`]: a position in PostgreSQL's write-ahead log.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log (a log sequence number), written as PostgreSQL writes it:
/// two hexadecimal halves separated by a slash (`16/B374D848`).
///
/// ```
/// use outbox_pg_cdc::Lsn;
///
/// let lsn: Lsn = "16/B374D848".parse()?;
/// assert_eq!(lsn.as_u64(), 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// # Ok::<(), outbox_pg_cdc::CdcError>(())
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// The position before any WAL (PostgreSQL's `0/0`, "no position").
    pub const ZERO: Lsn = Lsn(0);

    /// The position `value`.
    pub const fn from_u64(value: u64) -> Self {
        Self(value)
    }

    /// The position as a number of bytes from the start of the log.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Bytes of WAL from `earlier` to `self`, 0 when `earlier` is not earlier.
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    pub(crate) fn to_wire(self) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn::from_u64(self.0)
    }

    pub(crate) fn from_wire(lsn: pgwire_replication::Lsn) -> Self {
        Self(lsn.as_u64())
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = crate::CdcError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || crate::CdcError::Decode(format!("{text:?} is not a WAL position (X/Y)"));
        let (high, low) = text.split_once('/').ok_or_else(invalid)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            u32::from_str_radix(part, 16).map_err(|_| invalid())
        };
        Ok(Self((u64::from(half(high)?) << 32) | u64::from(half(low)?)))
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_and_print_as_postgresql_writes_them() {
        for text in ["0/0", "0/153C9E8", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().expect(text);
            assert_eq!(lsn.to_string(), text);
        }
        for bad in [
            "",
            "0",
            "/1",
            "1/",
            "g/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
            "+1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
        let later: Lsn = "1/10".parse().expect("valid");
        let earlier: Lsn = "0/FFFFFFF0".parse().expect("valid");
        assert_eq!(later.bytes_since(earlier), 0x20);
        assert_eq!(earlier.bytes_since(later), 0);
    }
}
