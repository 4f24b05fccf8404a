//! The catalog exchange (specs/protocol.md, "Catalog"): a caller asks which named operations
//! it may call, the gateway answers with the operations its policy allows that DID, never with
//! the policy text.
//!
//! Owns the two messages ([`CatalogRequest`], [`Catalog`]) and the operation names and path
//! templates they carry ([`check_operation_name`], [`check_path_template`],
//! [`fill_path_template`]). Sans-IO like the rest of the crate.

use serde::{Deserialize, Serialize};

use crate::message::Message;

/// Frame `CatalogRequest` payload: asks for the operations the TLS peer may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRequest {
    /// Message version, 1.
    pub v: u64,
    /// Only this upstream's operations (`None`: all).
    #[serde(default)]
    pub upstream: Option<String>,
}

/// Frame `Catalog` payload: the operations the caller may call, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Message version, 1.
    pub v: u64,
    /// The operations policy allows this caller (with each `{param}` of the template as a
    /// path segment of its own, see [`fill_path_template`]).
    pub operations: Vec<Operation>,
}

/// One named operation of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// The upstream it belongs to.
    pub upstream: String,
    /// Its name, unique within the upstream (see [`check_operation_name`]).
    pub name: String,
    /// HTTP method, upper case.
    pub method: String,
    /// Path template: a canonical path in which whole segments may be `{param}`.
    pub path: String,
    /// What it does, for people and for agents choosing a tool.
    pub description: String,
}

impl Message for CatalogRequest {
    fn version(&self) -> u64 {
        self.v
    }
}

impl Message for Catalog {
    fn version(&self) -> u64 {
        self.v
    }
}

/// Why an operation name, path template or parameter value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The name is not 1 to 48 of `a-z A-Z 0-9 _ -`.
    #[error("operation name {0:?} must be 1 to 48 of a-z, A-Z, 0-9, _ and -")]
    Name(String),
    /// The template is not a path with whole-segment `{param}` placeholders.
    #[error("path template {0:?}: {1}")]
    Template(String, &'static str),
    /// A parameter has no value.
    #[error("missing parameter {0:?}")]
    Missing(String),
    /// A value is empty, or holds a character that could change the path's shape.
    #[error("parameter {0:?} must be a non-empty segment without /, ?, #, % or spaces")]
    Value(String),
}

/// Checks an operation name: 1 to 48 of `a-z A-Z 0-9 _ -` (so `UPSTREAM__NAME` fits the
/// 64-character tool names MCP clients accept, with upstream names up to 14 characters).
pub fn check_operation_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TemplateError::Name(name.into()))
    }
}

/// The parameter names of a path template, in order. A template starts with `/`, has no
/// query or fragment, and each `{name}` (name: `a-z A-Z 0-9 _`, at most once) is a whole segment.
pub fn check_path_template(template: &str) -> Result<Vec<String>, TemplateError> {
    let bad = |why| TemplateError::Template(template.into(), why);
    let rest = template
        .strip_prefix('/')
        .ok_or_else(|| bad("must start with /"))?;
    if template.contains(['?', '#', '%', ' ']) {
        return Err(bad("no query, fragment, percent sign or space"));
    }
    let mut params: Vec<String> = Vec::new();
    for seg in rest.split('/') {
        if let Some(inner) = seg.strip_prefix('{') {
            let name = inner
                .strip_suffix('}')
                .ok_or_else(|| bad("a {param} must be a whole segment"))?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(bad("parameter names are a-z, A-Z, 0-9 and _"));
            }
            if params.iter().any(|p| p == name) {
                return Err(bad("a parameter appears twice"));
            }
            params.push(name.into());
        } else if seg.contains(['{', '}']) {
            return Err(bad("a {param} must be a whole segment"));
        }
    }
    Ok(params)
}

/// Fills a template's `{param}` segments from `value(name)`. A value must be a non-empty
/// segment without `/`, `?`, `#`, `%`, whitespace or control characters, and not `.` or `..`,
/// so the filled path has the template's shape (the gateway checks the result like any path).
pub fn fill_path_template<'a>(
    template: &str,
    mut value: impl FnMut(&str) -> Option<&'a str>,
) -> Result<String, TemplateError> {
    check_path_template(template)?;
    let mut out = String::with_capacity(template.len());
    for seg in template.split('/').skip(1) {
        out.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                let v = value(name).ok_or_else(|| TemplateError::Missing(name.into()))?;
                let ok = !v.is_empty()
                    && v != "."
                    && v != ".."
                    && !v.chars().any(|c| {
                        matches!(c, '/' | '?' | '#' | '%') || c.is_whitespace() || c.is_control()
                    });
                if !ok {
                    return Err(TemplateError::Value(name.into()));
                }
                out.push_str(v);
            }
            None => out.push_str(seg),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_strictly() {
        let req = CatalogRequest {
            v: 1,
            upstream: Some("payments".into()),
        };
        assert_eq!(CatalogRequest::decode(&req.encode()), Ok(req));
        let cat = Catalog {
            v: 1,
            operations: vec![Operation {
                upstream: "payments".into(),
                name: "get_charge".into(),
                method: "GET".into(),
                path: "/v1/charges/{id}".into(),
                description: "One charge".into(),
            }],
        };
        assert_eq!(Catalog::decode(&cat.encode()), Ok(cat.clone()));
        let mut bytes = cat.encode();
        bytes.push(0);
        assert!(Catalog::decode(&bytes).is_err(), "trailing bytes");
        assert!(Catalog::decode(&Catalog { v: 3, ..cat }.encode()).is_err());
    }

    #[test]
    fn templates() {
        assert_eq!(
            check_path_template("/v1/charges/{id}/refunds/{r}"),
            Ok(vec!["id".to_string(), "r".to_string()])
        );
        assert_eq!(check_path_template("/v1/balance"), Ok(vec![]));
        for bad in [
            "v1",
            "/v1/{id",
            "/v1/x{id}",
            "/v1/{}",
            "/v1/{a}/{a}",
            "/v1?x=1",
            "/{a-b}",
        ] {
            assert!(check_path_template(bad).is_err(), "{bad}");
        }
        let fill = |t: &str, v: &'static str| fill_path_template(t, |_| Some(v));
        assert_eq!(
            fill("/v1/charges/{id}", "ch_1").as_deref(),
            Ok("/v1/charges/ch_1")
        );
        for bad in ["", ".", "..", "a/b", "a?b", "a%2f", "a b", "a#"] {
            assert!(fill("/v1/charges/{id}", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            fill_path_template("/v1/{id}", |_| None),
            Err(TemplateError::Missing("id".into()))
        );
        assert!(check_operation_name("get_balance").is_ok());
        assert!(check_operation_name("").is_err());
        assert!(check_operation_name("a.b").is_err());
        assert!(check_operation_name(&"x".repeat(49)).is_err());
    }
}
