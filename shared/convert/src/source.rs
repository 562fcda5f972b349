//! Where a checkpoint is read from: a local directory or an S3 prefix, through positioned reads
//! so that only one tensor is in memory at a time.

use std::os::unix::fs::FileExt;

use llm_store::{Location, S3};

use crate::error::{ConvertError, Result};

pub struct CheckpointSource {
    root: Location,
    s3: Option<S3>,
}

impl CheckpointSource {
    /// Opens `root` (connecting to S3 for an `s3://` prefix).
    pub fn open(root: Location) -> Result<Self> {
        let s3 = match root {
            Location::S3 { .. } => Some(S3::connect()?),
            Location::Local(_) => None,
        };
        Ok(Self { root, s3 })
    }

    /// With an existing client (e.g. the Lambda function's).
    pub fn with_s3(root: Location, s3: S3) -> Self {
        Self { root, s3: Some(s3) }
    }

    pub fn root(&self) -> &Location {
        &self.root
    }

    pub fn describe(&self, name: &str) -> String {
        self.root.join(name).to_string()
    }

    fn err(&self, name: &str, e: impl ToString) -> ConvertError {
        ConvertError::input(self.describe(name), e)
    }

    /// Size of `name`, or `None` when absent.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        match (self.root.join(name), &self.s3) {
            (Location::S3 { bucket, key }, Some(s3)) => Ok(s3.size(&bucket, &key)?),
            (Location::Local(path), _) => match std::fs::metadata(&path) {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.err(name, e)),
            },
            (Location::S3 { .. }, None) => Err(self.err(name, "no S3 client")),
        }
    }

    /// The whole of a small file (JSON), or `None` when absent.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.size(name)? {
            None => Ok(None),
            Some(len) => self.read_range(name, 0, len).map(Some),
        }
    }

    pub fn read_text(&self, name: &str) -> Result<Option<String>> {
        self.read(name)?.map(|bytes| String::from_utf8(bytes).map_err(|e| self.err(name, e))).transpose()
    }

    /// `len` bytes of `name` from `start`.
    pub fn read_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        match (self.root.join(name), &self.s3) {
            (Location::S3 { bucket, key }, Some(s3)) => Ok(s3.get_range(&bucket, &key, start, len)?),
            (Location::Local(path), _) => {
                let file = std::fs::File::open(&path).map_err(|e| self.err(name, e))?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, start).map_err(|e| self.err(name, e))?;
                Ok(buf)
            }
            (Location::S3 { .. }, None) => Err(self.err(name, "no S3 client")),
        }
    }
}
