//! Whole directories between local disk and S3, for the jobs that read and write Hugging Face
//! directories (training): an S3 prefix (or one object) staged into a local directory, and a
//! local directory uploaded under a prefix, big files as streamed multipart uploads.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Location, Parts, Result, StoreError, S3};

/// Parts of big downloads and uploads.
const PART: u64 = 64 << 20;

/// A local path holding what `location` names: a local path as it is; an S3 prefix (ending in
/// `/`) downloaded into `staging`, or one S3 object downloaded into `staging/<file name>`.
pub fn stage(location: &Location, staging: &Path) -> Result<PathBuf> {
    let (bucket, key) = match location {
        Location::Local(path) => return Ok(path.clone()),
        Location::S3 { bucket, key } => (bucket, key),
    };
    let s3 = S3::connect()?;
    std::fs::create_dir_all(staging)?;
    if key.is_empty() || key.ends_with('/') {
        if !download_prefix(&s3, bucket, key, staging)? {
            return Err(StoreError::S3 { bucket: bucket.clone(), key: key.clone(), message: "no objects under this prefix".into() });
        }
        return Ok(staging.to_path_buf());
    }
    let size = s3.size(bucket, key)?.ok_or_else(|| StoreError::S3 { bucket: bucket.clone(), key: key.clone(), message: "no such object".into() })?;
    let name = key.rsplit('/').next().unwrap_or(key);
    let path = staging.join(name);
    std::fs::write(&path, s3.download(bucket, key, size, Parts::new(PART, 8), |_| {})?)?;
    Ok(path)
}

/// Downloads the files directly under `prefix` (ending in `/`) into `dir`, which exists;
/// false when there are none.
pub fn download_prefix(s3: &S3, bucket: &str, prefix: &str, dir: &Path) -> Result<bool> {
    let mut any = false;
    for object in s3.list(bucket, prefix)? {
        let relative = &object.key[prefix.len()..];
        // Only the prefix's own files: a Hugging Face directory is flat.
        if relative.is_empty() || relative.contains('/') {
            continue;
        }
        let bytes = s3.download(bucket, &object.key, object.size, Parts::new(PART, 8), |_| {})?;
        std::fs::write(dir.join(relative), bytes)?;
        any = true;
    }
    Ok(any)
}

/// Uploads every file directly in `dir` to `<prefix>/<file name>`.
pub fn upload_dir(s3: &S3, dir: &Path, bucket: &str, prefix: &str) -> Result<()> {
    let prefix = if prefix.is_empty() || prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if !path.is_file() {
            continue;
        }
        let key = format!("{prefix}{name}");
        let mut file = std::fs::File::open(&path)?;
        let mut upload = s3.multipart(bucket, &key, PART as usize)?;
        std::io::copy(&mut file, &mut upload)?;
        upload.flush()?;
        upload.finish()?;
    }
    Ok(())
}

/// A job's local working copies of `s3://` inputs and outputs, in a directory of its own that
/// is removed when the staging is dropped. Local locations are used in place.
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// `purpose` names the directory (`llm-<purpose>-<pid>` under the system's temp dir).
    pub fn new(purpose: &str) -> Self {
        Self { dir: std::env::temp_dir().join(format!("llm-{purpose}-{}", std::process::id())) }
    }

    /// A local path for `location` (see [`stage`]); S3 copies go under `name`.
    pub fn input(&self, location: &Location, name: &str) -> Result<PathBuf> {
        stage(location, &self.dir.join(name))
    }

    /// Where to write an output meant for `location`: itself, or a directory to [`publish`](Self::publish).
    pub fn output(&self, location: &Location) -> PathBuf {
        match location {
            Location::Local(path) => path.clone(),
            Location::S3 { .. } => self.dir.join("output"),
        }
    }

    /// Uploads the staged output `local` to `location` when that is on S3.
    pub fn publish(&self, local: &Path, location: &Location) -> Result<()> {
        if let Location::S3 { bucket, key } = location {
            upload_dir(&S3::connect()?, local, bucket, key)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
