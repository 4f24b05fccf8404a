//! The catalog exchange (specs/protocol.md, "Catalog"): a caller asks which named operations
//! it may call, the gateway answers with the operations its policy allows that DID, never with
//! the policy text.
//!
//! Owns the two messages ([`CatalogRequest`], [`Catalog`], whose operations carry version 2
//! hints: [`BodyMode`], [`check_title`], [`check_body_schema`]) and the operation names and path
//! templates they carry ([`check_operation_name`], [`check_path_template`],
//! [`fill_path_template`]). Sans-IO like the rest of the crate.

use serde::{Deserialize, Serialize};

use crate::Version;
use crate::cbor::DecodeError;
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
///
/// `title`, `destructive`, `body` and `body_schema` are version 2 fields (amendment 2.5): a
/// version 1 Catalog never carries them (its decoder refuses them), and each is absent when the
/// operator did not set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A short human-readable name (see [`check_title`]); version 2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Whether a call may destroy or overwrite data (`true`) or only reads or adds (`false`);
    /// `None`: the operator did not say. Version 2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destructive: Option<bool>,
    /// Whether a call carries a body; `None`: [`BodyMode::default_for`] the method. Version 2
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyMode>,
    /// A JSON Schema for the body: the text of a JSON object (see [`check_body_schema`]).
    /// Version 2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_schema: Option<String>,
}

impl Operation {
    /// Whether a call carries a body: the operator's choice, else the method's default.
    pub fn body_mode(&self) -> BodyMode {
        self.body
            .unwrap_or_else(|| BodyMode::default_for(&self.method))
    }

    /// Whether any version 2 field is present.
    fn has_v2_fields(&self) -> bool {
        self.title.is_some()
            || self.destructive.is_some()
            || self.body.is_some()
            || self.body_schema.is_some()
    }

    /// This operation without its version 2 fields (what a version 1 Catalog carries).
    pub fn without_v2_fields(self) -> Self {
        Self {
            title: None,
            destructive: None,
            body: None,
            body_schema: None,
            ..self
        }
    }
}

/// Whether a call of an operation carries a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyMode {
    /// Every call has a body.
    Required,
    /// A call may have a body.
    Optional,
    /// No call has a body.
    None,
}

impl BodyMode {
    /// The default of a method: `POST`, `PUT` and `PATCH` require a body; `GET`, `HEAD`,
    /// `DELETE`, `OPTIONS`, `TRACE` and `CONNECT` have none; any other method may have one.
    pub fn default_for(method: &str) -> Self {
        match method {
            "POST" | "PUT" | "PATCH" => Self::Required,
            "GET" | "HEAD" | "DELETE" | "OPTIONS" | "TRACE" | "CONNECT" => Self::None,
            _ => Self::Optional,
        }
    }

    /// Its name in `gateway.toml` and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Optional => "optional",
            Self::None => "none",
        }
    }
}

/// Longest title accepted, bytes.
pub const MAX_TITLE: usize = 128;

/// Longest body schema accepted (its JSON text), bytes: with a description of
/// [`MAX_DESCRIPTION`] bytes, an operation stays well inside one frame.
pub const MAX_BODY_SCHEMA: usize = 16 * 1024;

/// Longest description accepted, bytes.
pub const MAX_DESCRIPTION: usize = 2048;

/// Checks a title: 1 to [`MAX_TITLE`] bytes, no control characters (one line).
pub fn check_title(title: &str) -> Result<(), TemplateError> {
    if title.trim().is_empty() || title.len() > MAX_TITLE || title.chars().any(char::is_control) {
        return Err(TemplateError::Title);
    }
    Ok(())
}

/// Checks a body schema: the text of a JSON object of at most [`MAX_BODY_SCHEMA`] bytes (a
/// JSON Schema; its keywords are the client's to read).
pub fn check_body_schema(text: &str) -> Result<(), TemplateError> {
    if text.len() > MAX_BODY_SCHEMA {
        return Err(TemplateError::BodySchema("longer than 16384 bytes"));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(TemplateError::BodySchema("not a JSON object")),
        Err(_) => Err(TemplateError::BodySchema("not JSON")),
    }
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

    /// Version 1 is frozen: its operations have no version 2 field. In version 2, a title and
    /// a body schema must be well formed.
    fn check_version(&self) -> Result<(), DecodeError> {
        for op in &self.operations {
            if self.v == Version::V1.as_u64() && op.has_v2_fields() {
                return Err(DecodeError::Field("operations"));
            }
            if op.title.as_deref().is_some_and(|t| check_title(t).is_err()) {
                return Err(DecodeError::Field("title"));
            }
            if op
                .body_schema
                .as_deref()
                .is_some_and(|s| check_body_schema(s).is_err())
            {
                return Err(DecodeError::Field("body_schema"));
            }
        }
        Ok(())
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
    /// A title is empty, too long or not one line.
    #[error("title must be 1 to 128 bytes on one line")]
    Title,
    /// A body schema is not the JSON text of an object, or too long.
    #[error("body_schema must be a JSON object (a JSON Schema): {0}")]
    BodySchema(&'static str),
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
                ..Operation::default()
            }],
        };
        assert_eq!(Catalog::decode(&cat.encode()), Ok(cat.clone()));
        // without version 2 fields, a Catalog encodes exactly as version 1 defined it
        assert_eq!(hex::encode(cat.encode()), V1_CATALOG);
        let mut bytes = cat.encode();
        bytes.push(0);
        assert!(Catalog::decode(&bytes).is_err(), "trailing bytes");
        assert!(Catalog::decode(&Catalog { v: 3, ..cat }.encode()).is_err());
    }

    /// A version 1 Catalog: one operation, the five fields of version 1.
    const V1_CATALOG: &str = "a26176016a6f7065726174696f6e7381a568757073747265616d687061796d656e7473646e616d656a6765745f636861726765666d6574686f64634745546470617468702f76312f636861726765732f7b69647d6b6465736372697074696f6e6a4f6e6520636861726765";

    /// A version 2 Catalog whose operation has every field of amendment 2.5.
    const V2_CATALOG: &str = "a26176026a6f7065726174696f6e7381a968757073747265616d687061796d656e7473646e616d656d6372656174655f636861726765666d6574686f6464504f535464706174686b2f76312f636861726765736b6465736372697074696f6e6f437265617465206120636861726765657469746c656f4372656174652061206368617267656b6465737472756374697665f464626f64796872657175697265646b626f64795f736368656d61717b2274797065223a226f626a656374227d";

    fn create_charge() -> Operation {
        Operation {
            upstream: "payments".into(),
            name: "create_charge".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            description: "Create a charge".into(),
            title: Some("Create a charge".into()),
            destructive: Some(false),
            body: Some(BodyMode::Required),
            body_schema: Some(r#"{"type":"object"}"#.into()),
        }
    }

    #[test]
    fn version_2_fields_only_in_version_2() {
        let v2 = Catalog {
            v: 2,
            operations: vec![create_charge()],
        };
        assert_eq!(hex::encode(v2.encode()), V2_CATALOG);
        let bytes = hex::decode(V2_CATALOG).expect("hex");
        assert_eq!(Catalog::decode(&bytes), Ok(v2.clone()));
        // the same operation in a version 1 Catalog: refused, field by field
        let v1 = |op: Operation| Catalog {
            v: 1,
            operations: vec![op],
        };
        let bare = create_charge().without_v2_fields();
        assert!(Catalog::decode(&v1(bare.clone()).encode()).is_ok());
        for op in [
            Operation {
                title: Some("t".into()),
                ..bare.clone()
            },
            Operation {
                destructive: Some(true),
                ..bare.clone()
            },
            Operation {
                body: Some(BodyMode::None),
                ..bare.clone()
            },
            Operation {
                body_schema: Some("{}".into()),
                ..bare.clone()
            },
        ] {
            assert_eq!(
                Catalog::decode(&v1(op).encode()),
                Err(DecodeError::Field("operations"))
            );
        }
        // version 2 values out of range
        let v2_with = |op: Operation| {
            Catalog::decode(
                &Catalog {
                    v: 2,
                    operations: vec![op],
                }
                .encode(),
            )
        };
        for schema in ["[1]", "{", "\"x\""] {
            let op = Operation {
                body_schema: Some(schema.into()),
                ..bare.clone()
            };
            assert_eq!(
                v2_with(op),
                Err(DecodeError::Field("body_schema")),
                "{schema}"
            );
        }
        for title in ["", "a\nb", &"t".repeat(MAX_TITLE + 1)] {
            let op = Operation {
                title: Some(title.into()),
                ..bare.clone()
            };
            assert_eq!(v2_with(op), Err(DecodeError::Field("title")), "{title:?}");
        }
        // a body mode the table does not name
        let mut text = V2_CATALOG.replace(&hex::encode("required"), &hex::encode("sometime"));
        assert!(Catalog::decode(&hex::decode(&text).expect("hex")).is_err());
        text = V2_CATALOG.replace(&hex::encode("body_schema"), &hex::encode("body_scheme"));
        assert!(
            Catalog::decode(&hex::decode(&text).expect("hex")).is_err(),
            "unknown field"
        );
    }

    #[test]
    fn body_modes() {
        assert_eq!(BodyMode::default_for("POST"), BodyMode::Required);
        assert_eq!(BodyMode::default_for("PATCH"), BodyMode::Required);
        assert_eq!(BodyMode::default_for("GET"), BodyMode::None);
        assert_eq!(BodyMode::default_for("DELETE"), BodyMode::None);
        assert_eq!(BodyMode::default_for("PROPFIND"), BodyMode::Optional);
        let mut op = create_charge();
        assert_eq!(op.body_mode(), BodyMode::Required);
        op.body = Some(BodyMode::Optional);
        assert_eq!(op.body_mode(), BodyMode::Optional);
        assert!(
            check_body_schema(&format!(
                "{{\"description\": \"{}\"}}",
                "x".repeat(MAX_BODY_SCHEMA)
            ))
            .is_err()
        );
        assert!(check_title("Create a charge").is_ok());
        assert!(check_title("  ").is_err());
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
