//! The model registry in a bucket: where the quantization function puts each version of a model,
//! and how the inference function finds the newest complete one.
//!
//! ```text
//! incoming/<model>/…                          Hugging Face checkpoint, uploaded by the user
//! incoming/<model>/quantize.json              job file, uploaded last: starts the conversion
//! models/<model>/<version>/<model>-<type>.gguf
//! models/<model>/<version>/manifest.json      written after every GGUF is complete
//! models/<model>/latest                       alias: the newest complete version
//! ```
//!
//! A version is named by a hash of the source objects (keys, ETags, sizes) and the requested
//! types, so the same upload always maps to the same version and a repeated event finds it done.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checksum::{hex, Verifier};
use crate::{Result, StoreError, S3};

pub const INCOMING_PREFIX: &str = "incoming/";
pub const MODELS_PREFIX: &str = "models/";
pub const JOB_FILE: &str = "quantize.json";
pub const ALIAS_NAME: &str = "latest";

/// A model name as it appears in keys: letters, digits, `.`, `_`, `-`; not starting with `.`.
pub fn validate_model_name(name: &str) -> std::result::Result<(), String> {
    let valid = (1..=128).contains(&name.len()) && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!("invalid model name `{name}`: use 1-128 letters, digits, `.`, `_` or `-`, not starting with `.`"))
    }
}

/// The keys of one model in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelKeys {
    pub model: String,
}

impl ModelKeys {
    pub fn new(model: &str) -> std::result::Result<Self, String> {
        validate_model_name(model)?;
        Ok(Self { model: model.to_string() })
    }

    pub fn incoming_prefix(&self) -> String {
        format!("{INCOMING_PREFIX}{}/", self.model)
    }

    pub fn job_key(&self) -> String {
        format!("{}{JOB_FILE}", self.incoming_prefix())
    }

    pub fn version_prefix(&self, version: &str) -> String {
        format!("{MODELS_PREFIX}{}/{version}/", self.model)
    }

    pub fn output_key(&self, version: &str, quant_type: &str) -> String {
        format!("{}{}-{quant_type}.gguf", self.version_prefix(version), self.model)
    }

    pub fn manifest_key(&self, version: &str) -> String {
        format!("{}manifest.json", self.version_prefix(version))
    }

    pub fn alias_key(&self) -> String {
        format!("{MODELS_PREFIX}{}/{ALIAS_NAME}", self.model)
    }
}

/// One object of the checkpoint a version was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceObject {
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub modified_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub bucket: String,
    pub prefix: String,
    pub objects: Vec<SourceObject>,
}

impl Source {
    /// When the newest source object was written: orders versions of the same model.
    pub fn modified_ms(&self) -> i64 {
        self.objects.iter().map(|o| o.modified_ms).max().unwrap_or(0)
    }
}

/// One GGUF file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    #[serde(rename = "type")]
    pub quant_type: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Absent from manifests written before it was listed (see [`crate::checksum`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64nvme: Option<String>,
}

/// `models/<model>/<version>/manifest.json`: what a version was made from and what it holds.
/// Written only once every output is complete, so its presence marks a finished version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub model: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The program that wrote it, with its version.
    pub tool: String,
    pub source: Source,
    pub types: Vec<String>,
    pub outputs: Vec<OutputFile>,
}

/// `models/<model>/latest`: names the newest complete version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub model: String,
    pub version: String,
    pub manifest: String,
    /// The type served when a caller does not ask for one: the first the job listed.
    pub default_type: String,
    /// The newest source object's time; an older upload processed late never replaces a newer one.
    pub source_modified_ms: i64,
}

/// The version name for `objects` converted to `types`.
pub fn version_id(objects: &[SourceObject], types: &[String]) -> String {
    let mut hash = Sha256::new();
    let mut sorted: Vec<&SourceObject> = objects.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    for o in sorted {
        hash.update(format!("{}\t{}\t{}\n", o.key, o.etag, o.size));
    }
    hash.update(format!("types\t{}\n", types.join(",")));
    format!("v{}", &hex(&hash.finalize())[..16])
}

/// The current time as RFC 3339 (UTC), for manifests.
pub fn now_rfc3339() -> String {
    aws_sdk_s3::primitives::DateTime::from(std::time::SystemTime::now()).fmt(aws_sdk_s3::primitives::DateTimeFormat::DateTime).unwrap_or_default()
}

fn parse<T: for<'de> Deserialize<'de>>(bucket: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::S3 { bucket: bucket.into(), key: key.into(), message: format!("invalid JSON: {e}") })
}

/// The registry of one bucket.
pub struct Registry<'a> {
    pub s3: &'a S3,
    pub bucket: &'a str,
}

impl Registry<'_> {
    pub fn manifest(&self, keys: &ModelKeys, version: &str) -> Result<Option<Manifest>> {
        let key = keys.manifest_key(version);
        self.s3.get(self.bucket, &key)?.map(|b| parse(self.bucket, &key, &b)).transpose()
    }

    pub fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let keys = ModelKeys { model: manifest.model.clone() };
        self.s3.put_json(self.bucket, &keys.manifest_key(&manifest.version), manifest)
    }

    pub fn alias(&self, keys: &ModelKeys) -> Result<Option<Alias>> {
        let key = keys.alias_key();
        self.s3.get(self.bucket, &key)?.map(|b| parse(self.bucket, &key, &b)).transpose()
    }

    /// Points `latest` at `manifest` unless it already names a version made from newer sources.
    /// Returns whether the alias now names this version.
    pub fn promote(&self, manifest: &Manifest) -> Result<bool> {
        let keys = ModelKeys { model: manifest.model.clone() };
        let modified = manifest.source.modified_ms();
        match self.alias(&keys)? {
            Some(current) if current.version == manifest.version => return Ok(true),
            Some(current) if current.source_modified_ms > modified => return Ok(false),
            _ => {}
        }
        let alias = Alias {
            model: manifest.model.clone(),
            version: manifest.version.clone(),
            manifest: keys.manifest_key(&manifest.version),
            default_type: manifest.types.first().cloned().unwrap_or_default(),
            source_modified_ms: modified,
        };
        self.s3.put_json(self.bucket, &keys.alias_key(), &alias)?;
        Ok(true)
    }
}

/// A GGUF object ready to load: where it is, and its checksums when a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub crc64nvme: Option<String>,
    pub version: Option<String>,
}

impl ResolvedModel {
    /// What checks the object's bytes, if a manifest lists it.
    pub fn verifier(&self) -> Option<Verifier> {
        self.sha256.as_deref().map(|sha256| Verifier::new(sha256, self.crc64nvme.as_deref()))
    }
}

/// Resolves `key` in `bucket` to a GGUF object: `models/<model>/latest` through the alias (the
/// default type, or `quant_type`), a GGUF key as it is (with its hash when its version's manifest
/// lists it).
pub fn resolve(s3: &S3, bucket: &str, key: &str, quant_type: Option<&str>) -> Result<ResolvedModel> {
    let registry = Registry { s3, bucket };
    let not_found = |message: String| StoreError::S3 { bucket: bucket.into(), key: key.into(), message };
    if let Some(model) = key.strip_prefix(MODELS_PREFIX).and_then(|k| k.strip_suffix(&format!("/{ALIAS_NAME}"))) {
        let keys = ModelKeys::new(model).map_err(not_found)?;
        let alias = registry.alias(&keys)?.ok_or_else(|| not_found("no such alias".into()))?;
        let manifest =
            registry.manifest(&keys, &alias.version)?.ok_or_else(|| not_found(format!("the alias names version {} but it has no manifest", alias.version)))?;
        let wanted = quant_type.unwrap_or(&alias.default_type);
        let output = manifest
            .outputs
            .iter()
            .find(|o| o.quant_type == wanted)
            .ok_or_else(|| not_found(format!("version {} has no `{wanted}` file (it has {})", manifest.version, manifest.types.join(", "))))?;
        return Ok(ResolvedModel {
            bucket: bucket.into(),
            key: output.key.clone(),
            size: output.size,
            sha256: Some(output.sha256.clone()),
            crc64nvme: output.crc64nvme.clone(),
            version: Some(manifest.version),
        });
    }
    let size = s3.size(bucket, key)?.ok_or_else(|| not_found("no such object".into()))?;
    let manifest_key = match key.rsplit_once('/') {
        Some((dir, _)) if key.starts_with(MODELS_PREFIX) => Some(format!("{dir}/manifest.json")),
        _ => None,
    };
    let manifest: Option<Manifest> = match manifest_key {
        Some(mk) => s3.get(bucket, &mk)?.map(|b| parse(bucket, &mk, &b)).transpose()?,
        None => None,
    };
    let listed = manifest.as_ref().and_then(|m| m.outputs.iter().find(|o| o.key == key));
    Ok(ResolvedModel {
        bucket: bucket.into(),
        key: key.into(),
        size,
        sha256: listed.map(|o| o.sha256.clone()),
        crc64nvme: listed.and_then(|o| o.crc64nvme.clone()),
        version: manifest.as_ref().filter(|_| listed.is_some()).map(|m| m.version.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, etag: &str) -> SourceObject {
        SourceObject { key: key.into(), etag: etag.into(), size: 1, modified_ms: 0 }
    }

    #[test]
    fn versions_depend_on_content_not_order() {
        let types = vec!["q8_0".to_string()];
        let a = version_id(&[object("incoming/m/a", "1"), object("incoming/m/b", "2")], &types);
        let b = version_id(&[object("incoming/m/b", "2"), object("incoming/m/a", "1")], &types);
        assert_eq!(a, b);
        assert_ne!(a, version_id(&[object("incoming/m/a", "1"), object("incoming/m/b", "3")], &types));
        assert_ne!(a, version_id(&[object("incoming/m/a", "1"), object("incoming/m/b", "2")], &["q4_0".to_string()]));
        assert!(a.starts_with('v') && a.len() == 17);
    }

    #[test]
    fn model_names_are_validated() {
        assert!(ModelKeys::new("tiny-llama_1.1B").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "é"] {
            assert!(ModelKeys::new(bad).is_err(), "{bad}");
        }
        let keys = ModelKeys::new("m").unwrap();
        assert_eq!(keys.output_key("v1", "q8_0"), "models/m/v1/m-q8_0.gguf");
        assert_eq!(keys.alias_key(), "models/m/latest");
    }
}
