//! Canonical form of a request's path, query and headers (specs/protocol.md, "Canonical
//! requests").
//!
//! The gateway refuses, before policy, anything that could make the scope it checks differ
//! from what the upstream sees. These are pure checks: the caller supplies the upstream's
//! header allowlist and the name its credential is injected under.

/// Headers that are never forwarded: credentials, hop-by-hop, and those the gateway sets.
pub const FORBIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "idempotency-key",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
];

/// Request headers that make many frameworks route a request to another method or path than
/// the one policy judged. Refused unless the upstream opts in (`allow_method_override`).
pub const METHOD_OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Query parameters that make many frameworks treat a request as another method (Rails, Laravel,
/// Symfony, Express's method-override, ASP.NET): compared without case. Refused unless the
/// upstream opts in (`allow_method_override`).
pub const METHOD_OVERRIDE_QUERY: &[&str] = &[
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Why a request is not canonical.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// The path does not start with `/`, holds a host, `//`, a `.` or `..` segment, a
    /// backslash, `?`, `#`, `;`, or a control or non-ASCII character.
    #[error("path is not canonical: {0}")]
    Path(&'static str),
    /// The path percent-encodes a slash, backslash, dot or semicolon, a NUL, or a percent sign
    /// (double encoding).
    #[error("path percent-encodes a separator or a percent sign")]
    EncodedSeparator,
    /// The path has a `%` not followed by two hex digits, or percent-encodes an unreserved
    /// character (a letter, digit, `-`, `.`, `_` or `~`), which an upstream decodes into a path
    /// other than the one policy judged.
    #[error("path has a malformed or needless percent-encoding")]
    PercentEncoding,
    /// A query parameter name appears twice.
    #[error("duplicate query parameter {0:?}")]
    DuplicateQuery(String),
    /// The query uses the name the upstream's credential is injected under.
    #[error("query parameter {0:?} is reserved for the credential")]
    ReservedQuery(String),
    /// A query name is not unreserved characters (no percent-encoding in names), or a value
    /// holds a character outside the allowed set.
    #[error("query parameter {0:?} is not canonical")]
    QueryChars(String),
    /// A header the gateway never forwards (credential, hop-by-hop, set by the gateway).
    #[error("header {0:?} may not be set by the caller")]
    ForbiddenHeader(String),
    /// A header outside the upstream's allowlist.
    #[error("header {0:?} is not in the upstream's allowlist")]
    HeaderNotAllowed(String),
    /// A header name not in lower case token form, a repeated name, or a value with a control
    /// or non-ASCII character.
    #[error("header {0:?} is malformed")]
    HeaderSyntax(String),
    /// A method-override header or query parameter, which the upstream did not opt in to.
    #[error(
        "{0:?} overrides the method or path on many servers: refused unless the upstream allows method overrides"
    )]
    MethodOverride(String),
    /// The method is not one of the standard upper-case methods.
    #[error("method {0:?} is not allowed")]
    Method(String),
    /// More headers or query parameters, or more of their bytes, than a request may carry
    /// ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`], [`MAX_HEADER_VALUE`], [`MAX_QUERY_PARAMS`],
    /// [`MAX_QUERY_BYTES`]; the path's own limit is 2048 bytes).
    #[error("{0} exceeds its limit")]
    TooLarge(&'static str),
}

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 32;
/// Most bytes of header names and values together.
pub const MAX_HEADER_BYTES: usize = 8192;
/// Most bytes of one header value.
pub const MAX_HEADER_VALUE: usize = 4096;
/// Most query parameters a request may carry.
pub const MAX_QUERY_PARAMS: usize = 64;
/// Most bytes of query parameter names and values together.
pub const MAX_QUERY_BYTES: usize = 8192;

/// Methods a caller may use.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Checks the method.
pub fn check_method(method: &str) -> Result<(), CanonicalError> {
    if METHODS.contains(&method) {
        Ok(())
    } else {
        Err(CanonicalError::Method(method.to_string()))
    }
}

/// Checks a path.
pub fn check_path(path: &str) -> Result<(), CanonicalError> {
    let rest = path
        .strip_prefix('/')
        .ok_or(CanonicalError::Path("must start with '/'"))?;
    if path.len() > 2048 {
        return Err(CanonicalError::Path("longer than 2048 bytes"));
    }
    for b in path.bytes() {
        match b {
            b'\\' => return Err(CanonicalError::Path("backslash")),
            b'?' | b'#' => return Err(CanonicalError::Path("'?' or '#' (the query is separate)")),
            // a matrix parameter (`;jsessionid=x`, `/secret;`) is stripped by many servers, so
            // the path they route is not the one policy judged
            b';' => return Err(CanonicalError::Path("';' (a path parameter)")),
            0..=0x20 | 0x7f..=0xff => {
                return Err(CanonicalError::Path("control, space or non-ASCII"));
            }
            _ => {}
        }
    }
    let lower = path.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%2e", "%25", "%00", "%3b"] {
        if lower.contains(bad) {
            return Err(CanonicalError::EncodedSeparator);
        }
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            None => return Err(CanonicalError::PercentEncoding),
            Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                return Err(CanonicalError::PercentEncoding);
            }
            Some(_) => {}
        }
    }
    if rest.is_empty() {
        return Ok(());
    }
    for (i, segment) in rest.split('/').enumerate() {
        // a matrix parameter does not hide a dot segment from servers that strip it (`..;x`)
        let bare = segment.split(';').next().unwrap_or(segment);
        match segment {
            "" if i + 1 == rest.split('/').count() => {} // one trailing slash is fine
            "" => return Err(CanonicalError::Path("empty segment ('//')")),
            _ if bare == "." || bare == ".." => {
                return Err(CanonicalError::Path("'.' or '..' segment"));
            }
            s if i == 0 && s.contains(':') => {
                return Err(CanonicalError::Path("holds a scheme or host"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Refuses the method-override headers and query parameters ([`METHOD_OVERRIDE_HEADERS`],
/// [`METHOD_OVERRIDE_QUERY`]), for an upstream that did not opt in to them.
pub fn check_overrides(
    query: &[(String, String)],
    headers: &[(String, String)],
) -> Result<(), CanonicalError> {
    for (name, _) in headers {
        if METHOD_OVERRIDE_HEADERS
            .iter()
            .any(|o| o.eq_ignore_ascii_case(name))
        {
            return Err(CanonicalError::MethodOverride(name.clone()));
        }
    }
    for (name, _) in query {
        if METHOD_OVERRIDE_QUERY
            .iter()
            .any(|o| o.eq_ignore_ascii_case(name))
        {
            return Err(CanonicalError::MethodOverride(name.clone()));
        }
    }
    Ok(())
}

fn query_char_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$'()*+,;:@/".contains(&b)
}

/// Checks query parameters: no duplicates, not the credential's name, a safe character set.
pub fn check_query(
    query: &[(String, String)],
    reserved: Option<&str>,
) -> Result<(), CanonicalError> {
    let bytes: usize = query.iter().map(|(k, v)| k.len() + v.len()).sum();
    if query.len() > MAX_QUERY_PARAMS || bytes > MAX_QUERY_BYTES {
        return Err(CanonicalError::TooLarge("the query"));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, v) in query {
        let name_ok = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~[]".contains(&b));
        if !name_ok || !v.bytes().all(query_char_ok) {
            return Err(CanonicalError::QueryChars(k.clone()));
        }
        if reserved.is_some_and(|r| r.eq_ignore_ascii_case(k)) {
            return Err(CanonicalError::ReservedQuery(k.clone()));
        }
        if !seen.insert(k.as_str()) {
            return Err(CanonicalError::DuplicateQuery(k.clone()));
        }
    }
    Ok(())
}

/// Checks headers: lower-case token names, values without CR/LF/NUL, never a forbidden or the
/// credential header, only names in `allowed`.
pub fn check_headers(
    headers: &[(String, String)],
    allowed: &[String],
    credential_header: Option<&str>,
) -> Result<(), CanonicalError> {
    let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(CanonicalError::TooLarge("the header list"));
    }
    if headers.iter().any(|(_, v)| v.len() > MAX_HEADER_VALUE) {
        return Err(CanonicalError::TooLarge("a header value"));
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in headers {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let value_ok = value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if !token || !value_ok || !seen.insert(name) {
            return Err(CanonicalError::HeaderSyntax(name.clone()));
        }
        if FORBIDDEN_HEADERS.contains(&name.as_str())
            || credential_header.is_some_and(|c| c.eq_ignore_ascii_case(name))
        {
            return Err(CanonicalError::ForbiddenHeader(name.clone()));
        }
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            return Err(CanonicalError::HeaderNotAllowed(name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_query_sizes_are_capped() {
        let allowed = vec!["x-a".to_string()];
        let header = |n: usize| vec![("x-a".to_string(), "v".repeat(n))];
        assert!(check_headers(&header(MAX_HEADER_VALUE), &allowed, None).is_ok());
        assert_eq!(
            check_headers(&header(MAX_HEADER_VALUE + 1), &allowed, None),
            Err(CanonicalError::TooLarge("a header value"))
        );
        // the whole list: two values at the limit each, names included, pass 8192
        let two = vec![
            ("x-a".to_string(), "v".repeat(MAX_HEADER_VALUE)),
            ("x-b".to_string(), "v".repeat(MAX_HEADER_VALUE)),
        ];
        let allowed_two = vec!["x-a".to_string(), "x-b".to_string()];
        assert_eq!(
            check_headers(&two, &allowed_two, None),
            Err(CanonicalError::TooLarge("the header list"))
        );
        let many: Vec<_> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), String::new()))
            .collect();
        assert_eq!(
            check_headers(&many, &allowed, None),
            Err(CanonicalError::TooLarge("the header list"))
        );
        let query = |n: usize| vec![("q".to_string(), "v".repeat(n))];
        assert!(check_query(&query(MAX_QUERY_BYTES - 1), None).is_ok());
        assert_eq!(
            check_query(&query(MAX_QUERY_BYTES), None),
            Err(CanonicalError::TooLarge("the query"))
        );
        let many: Vec<_> = (0..=MAX_QUERY_PARAMS)
            .map(|i| (format!("q{i}"), String::new()))
            .collect();
        assert_eq!(
            check_query(&many, None),
            Err(CanonicalError::TooLarge("the query"))
        );
    }

    #[test]
    fn paths() {
        for ok in [
            "/",
            "/v1/charges",
            "/v1/charges/ch_1",
            "/v1/a%20b",
            "/v1/dir/",
            "/v1/...",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "v1",
            "/v1/../admin",
            "/v1/./x",
            "/v1//x",
            "//evil.com/x",
            "/v1/%2e%2e/admin",
            "/v1%2fadmin",
            "/v1%2Fadmin",
            "/v1/%252f",
            "/v1\\x",
            "/v1?x=1",
            "/v1#f",
            "/a b",
            "/v1/\r\nx",
            "/..",
            "/http://evil.com",
            "/v1/caf\u{e9}",
            // regression: encoded unreserved characters and malformed escapes pass policy as one
            // path and reach the upstream as another once decoded
            "/v1/%61dmin",
            "/v1/b%41lance",
            "/v1/%7e",
            "/v1/%",
            "/v1/%4",
            "/v1/%zz",
            // regression: matrix parameters on dot segments (`..;`) escape on servers that
            // strip them
            "/v1/charges/..;/admin",
            "/v1/.;x/balance",
            // regression (issue 18): path parameters, raw or encoded, reach a handler that policy
            // did not judge on servers that strip them
            "/v1/secret;",
            "/v1/secret;jsessionid=x",
            "/v1/x;y=1",
            "/v1/a%3bb",
            "/v1/..%3B/secret",
            "/v1/secret%3B",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn method_overrides() {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            check_overrides(&pairs(&[("limit", "1")]), &pairs(&[("accept", "a")])),
            Ok(())
        );
        for query in [
            [("_method", "DELETE")],
            [("_METHOD", "DELETE")],
            [("X-HTTP-Method-Override", "PUT")],
        ] {
            assert!(matches!(
                check_overrides(&pairs(&query), &[]),
                Err(CanonicalError::MethodOverride(_))
            ));
        }
        for header in [
            "x-http-method-override",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method",
        ] {
            assert!(matches!(
                check_overrides(&[], &pairs(&[(header, "DELETE")])),
                Err(CanonicalError::MethodOverride(_))
            ));
        }
    }

    #[test]
    fn query() {
        let q = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            check_query(&q(&[("a", "1"), ("b", "2")]), Some("key")),
            Ok(())
        );
        assert!(matches!(
            check_query(&q(&[("a", "1"), ("a", "2")]), None),
            Err(CanonicalError::DuplicateQuery(_))
        ));
        assert!(matches!(
            check_query(&q(&[("KEY", "x")]), Some("key")),
            Err(CanonicalError::ReservedQuery(_))
        ));
        assert!(matches!(
            check_query(&q(&[("a", "x&b=2")]), None),
            Err(CanonicalError::QueryChars(_))
        ));
        // an encoded name cannot dodge the duplicate or credential checks
        assert!(matches!(
            check_query(&q(&[("a", "1"), ("%61", "2")]), None),
            Err(CanonicalError::QueryChars(_))
        ));
        assert!(matches!(
            check_query(&q(&[("%6bey", "x")]), Some("key")),
            Err(CanonicalError::QueryChars(_))
        ));
    }

    #[test]
    fn headers() {
        let allowed = vec!["content-type".to_string(), "x-api-version".to_string()];
        let h = |n: &str, v: &str| vec![(n.to_string(), v.to_string())];
        assert_eq!(
            check_headers(&h("content-type", "application/json"), &allowed, None),
            Ok(())
        );
        assert!(matches!(
            check_headers(&h("authorization", "Bearer x"), &allowed, None),
            Err(CanonicalError::ForbiddenHeader(_))
        ));
        assert!(matches!(
            check_headers(&h("x-api-version", "1"), &allowed, Some("X-Api-Version")),
            Err(CanonicalError::ForbiddenHeader(_))
        ));
        assert!(matches!(
            check_headers(&h("x-other", "1"), &allowed, None),
            Err(CanonicalError::HeaderNotAllowed(_))
        ));
        assert!(matches!(
            check_headers(&h("Content-Type", "a"), &allowed, None),
            Err(CanonicalError::HeaderSyntax(_))
        ));
        assert!(matches!(
            check_headers(&h("content-type", "a\r\nx-evil: 1"), &allowed, None),
            Err(CanonicalError::HeaderSyntax(_))
        ));
        assert!(matches!(
            check_headers(&h("transfer-encoding", "chunked"), &allowed, None),
            Err(CanonicalError::ForbiddenHeader(_))
        ));
        assert!(matches!(
            check_headers(&h("content-type", "a\u{7f}"), &allowed, None),
            Err(CanonicalError::HeaderSyntax(_))
        ));
        assert!(matches!(
            check_headers(&h("content-type", "caf\u{e9}"), &allowed, None),
            Err(CanonicalError::HeaderSyntax(_))
        ));
    }
}
