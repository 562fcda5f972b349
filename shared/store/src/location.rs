use std::path::PathBuf;

use crate::{Result, StoreError};

/// Where a file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, key: String },
}

impl Location {
    /// `s3://bucket/key` (the key may be empty or end in `/` for a prefix), or a local path.
    pub fn parse(text: &str) -> Result<Self> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Ok(Self::Local(PathBuf::from(text)));
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len()) && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket || key.split('/').any(|part| part == "..") {
            return Err(StoreError::InvalidLocation(text.to_string()));
        }
        Ok(Self::S3 { bucket: bucket.to_string(), key: key.to_string() })
    }

    /// The location of `name` inside this one, taken as a directory or prefix.
    pub fn join(&self, name: &str) -> Self {
        match self {
            Self::Local(dir) => Self::Local(dir.join(name)),
            Self::S3 { bucket, key } => {
                let prefix = if key.is_empty() || key.ends_with('/') { key.clone() } else { format!("{key}/") };
                Self::S3 { bucket: bucket.clone(), key: format!("{prefix}{name}") }
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_joins() {
        let l = Location::parse("s3://models-1/incoming/llama").unwrap();
        assert_eq!(l.join("config.json"), Location::S3 { bucket: "models-1".into(), key: "incoming/llama/config.json".into() });
        assert_eq!(Location::parse("./dir").unwrap(), Location::Local("./dir".into()));
        assert!(Location::parse("s3://Bad_Bucket/x").is_err());
        assert!(Location::parse("s3://bucket/a/../b").is_err());
    }
}
