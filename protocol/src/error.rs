//! [`Shared`]: another library's error carried as the `#[source]` of one of our error enums
//! that must stay `Clone` and `PartialEq` (a decode error is compared in tests and handed to
//! several waiters).
//!
//! Owns only that wrapper; each layer's error enum lives in its own module.

use std::fmt;
use std::sync::Arc;

/// Another library's error `E`, shared (an [`Arc`]) so the error enum that carries it stays
/// `Clone`. Two compare equal when their messages do, which is what the `String` this replaces
/// compared.
///
/// It is transparent: its `Display` is `E`'s, and its [`source`](std::error::Error::source) is
/// `E`'s source. Reach `E` itself with [`Shared::get`].
///
/// ```
/// use didgate_protocol::cbor::{self, DecodeError};
/// use std::error::Error;
/// let e = cbor::from_slice::<u64>(b"\xff").unwrap_err();
/// let DecodeError::Malformed(shared) = &e else { panic!("{e:?}") };
/// assert_eq!(e.source().map(|s| s.to_string()), Some(shared.get().to_string()));
/// ```
pub struct Shared<E>(Arc<E>);

impl<E> Shared<E> {
    /// Wraps `error`.
    pub fn new(error: E) -> Self {
        Self(Arc::new(error))
    }

    /// The error itself.
    pub fn get(&self) -> &E {
        &self.0
    }
}

impl<E> From<E> for Shared<E> {
    fn from(error: E) -> Self {
        Self::new(error)
    }
}

impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<E: fmt::Debug> fmt::Debug for Shared<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Display> fmt::Display for Shared<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Display> PartialEq for Shared<E> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl<E: fmt::Display> Eq for Shared<E> {}

impl<E: std::error::Error> std::error::Error for Shared<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_shared_error_shows_and_compares_as_the_error_it_wraps() {
        let a = Shared::new(Outer(std::io::Error::other("inner")));
        let b = Shared::new(Outer(std::io::Error::other("inner")));
        assert_eq!(a.to_string(), "outer");
        assert_eq!(a, b);
        assert_eq!(a.clone(), a);
        let source = std::error::Error::source(&a).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("inner"));
    }
}
