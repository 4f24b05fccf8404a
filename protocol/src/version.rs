//! Format versions (specs/protocol.md, "Format evolution").
//!
//! Owns the list of versions this release speaks, how a version is named on the wire (the `v`
//! field of every message and audit entry, and the QUIC ALPN id of a connection), and which
//! version a writer uses by default. A version's field tables are fixed in the specs; a
//! decoder of one version stays strict (unknown fields refused), and a new field or kind only
//! ever comes with a new version.

/// A format version of messages and audit entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// Version 1: the first release's formats (frozen).
    V1,
    /// Version 2: version 1 plus the `format` entry kind; grows by amendment until frozen.
    V2,
}

impl Version {
    /// Every version this release reads, oldest first.
    pub const ALL: [Version; 2] = [Version::V1, Version::V2];
    /// The version this release writes: new chains, chains after their switch, and the
    /// reference client's requests.
    pub const CURRENT: Version = Version::V2;
    /// The oldest version this release reads.
    pub const OLDEST: Version = Version::V1;

    /// The `v` value.
    pub const fn as_u64(self) -> u64 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// The version whose `v` value is `v`, if this release speaks it.
    pub const fn from_u64(v: u64) -> Option<Self> {
        match v {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }

    /// The ALPN id of a connection carrying messages of this version: `didgate/N`.
    pub const fn alpn(self) -> &'static [u8] {
        match self {
            Self::V1 => b"didgate/1",
            Self::V2 => b"didgate/2",
        }
    }

    /// The version an ALPN id names, if this release speaks it.
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.alpn() == alpn)
    }

    /// The version after this one, if this release knows it.
    pub const fn next(self) -> Option<Self> {
        match self {
            Self::V1 => Some(Self::V2),
            Self::V2 => None,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for v in Version::ALL {
            assert_eq!(Version::from_u64(v.as_u64()), Some(v));
            assert_eq!(Version::from_alpn(v.alpn()), Some(v));
        }
        assert_eq!(Version::from_u64(0), None);
        assert_eq!(Version::from_u64(3), None);
        assert_eq!(Version::from_alpn(b"didgate/3"), None);
        assert_eq!(Version::V1.next(), Some(Version::V2));
        assert!(Version::OLDEST < Version::CURRENT);
    }
}
