//! Whole directories between local disk and S3, for the jobs that read and write Hugging Face
//! directories (training): an S3 prefix (or one object) staged into a local directory, and a
//! local directory uploaded under a prefix, big files as streamed multipart uploads.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Location, Result, StoreError, S3};

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
        let objects = s3.list(bucket, key)?;
        if objects.is_empty() {
            return Err(StoreError::S3 { bucket: bucket.clone(), key: key.clone(), message: "no objects under this prefix".into() });
        }
        for object in objects {
            let relative = &object.key[key.len()..];
            // Only the prefix's own files: a Hugging Face directory is flat.
            if relative.is_empty() || relative.contains('/') {
                continue;
            }
            let bytes = s3.download(bucket, &object.key, object.size, PART, 8)?;
            std::fs::write(staging.join(relative), bytes)?;
        }
        return Ok(staging.to_path_buf());
    }
    let size = s3.size(bucket, key)?.ok_or_else(|| StoreError::S3 { bucket: bucket.clone(), key: key.clone(), message: "no such object".into() })?;
    let name = key.rsplit('/').next().unwrap_or(key);
    let path = staging.join(name);
    std::fs::write(&path, s3.download(bucket, key, size, PART, 8)?)?;
    Ok(path)
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
