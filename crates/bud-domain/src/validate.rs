//! Validated newtypes for outside input. Each has a private field and a `parse` constructor, so
//! a value of the type is proof the invariant holds; errors name the offending field.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Input that does not fit: `field` names what to change and `message` says how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field} {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// An email address, lowercased. Only the shape is checked (one `@`, a dot in the domain, no
/// spaces): deliverability is the identity provider's business.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        let s = s.trim().to_ascii_lowercase();
        let err =
            || ValidationError::new(field, "must be an email address such as ada@example.com");
        if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err());
        }
        let (local, domain) = s.split_once('@').ok_or_else(err)?;
        if local.is_empty() || domain.contains('@') || !domain.contains('.') {
            return Err(err());
        }
        if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
            return Err(err());
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A human-chosen name of a resource (project, model, provider, key, user display name):
/// 1 to 128 characters after trimming, printable, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if s.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(field, "must be at most 128 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new(field, "must not contain control characters"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a model's weights come from: `hf://org/name`, `s3://bucket/path`, `gs://…`,
/// `https://…`, or an absolute local path `/models/…` for clusters that mount one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceUri(String);

impl SourceUri {
    pub const SCHEMES: [&'static str; 5] = ["hf", "s3", "gs", "https", "file"];

    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        let s = s.trim();
        let err = |why: &str| ValidationError::new(field, why);
        if s.is_empty() || s.len() > 2048 || s.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(err("must be a URI without spaces, at most 2048 characters"));
        }
        if s.starts_with('/') {
            return Ok(Self(s.to_owned()));
        }
        let url = url::Url::parse(s).map_err(|_| {
            err("must be a URI such as hf://org/model, s3://bucket/path or an absolute path")
        })?;
        if !Self::SCHEMES.contains(&url.scheme()) {
            return Err(err("must use one of the schemes hf, s3, gs, https, file"));
        }
        if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) {
            return Err(err("must name a host, bucket or organisation after the scheme"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_shapes() {
        assert_eq!(Email::parse("email", " Ada@Example.COM ").unwrap().as_str(), "ada@example.com");
        for bad in ["", "ada", "ada@", "@x.com", "a b@x.com", "a@b", "a@b..c", "a@@b.c"] {
            let e = Email::parse("email", bad).unwrap_err();
            assert_eq!(e.field, "email", "{bad}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(Name::parse("name", "  team a ").unwrap().as_str(), "team a");
        assert!(Name::parse("name", "   ").is_err());
        assert!(Name::parse("name", &"x".repeat(129)).is_err());
        assert!(Name::parse("name", "a\u{0}b").is_err());
    }

    #[test]
    fn source_uris() {
        for ok in
            ["hf://meta-llama/Llama-3.1-8B", "s3://bucket/m", "/models/llama", "https://x.io/m"]
        {
            assert!(SourceUri::parse("source_uri", ok).is_ok(), "{ok}");
        }
        for bad in ["", "llama", "ftp://x/y", "hf://", "hf:// x"] {
            assert!(SourceUri::parse("source_uri", bad).is_err(), "{bad}");
        }
    }
}
