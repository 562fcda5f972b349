//! The checksums a manifest lists for each GGUF file, computed as the file is written and checked
//! as it is read back.
//!
//! A file has two. Its sha256 (hex) names it: people check a download with `sha256sum`, and the
//! inference function's disk cache keeps it as `<sha256>.gguf`. Its CRC-64/NVME (the base64 of the
//! big-endian value, as S3 reports `ChecksumCRC64NVME`) is what a cold start checks the bytes
//! against: like S3's own checks, it catches any accidental change of a transfer or a disk, at
//! tens of GB/s where SHA-256 runs at 1.4 GB/s on one core, and on a Lambda's two vCPUs that core
//! is the download's. Checking the sha256 instead held a 743 MiB download from the local S3 server
//! at 1.42–1.53 s; without it, 0.95–1.12 s (README, *Cold start from S3*). A manifest written
//! before the CRC was listed has the sha256 alone, and that is checked then.

use sha2::{Digest, Sha256};

/// CRC-64/NVME, S3's default full-object checksum.
const CRC: crc_fast::CrcAlgorithm = crc_fast::CrcAlgorithm::Crc64Nvme;

/// A file's checksums as its manifest lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChecksums {
    pub sha256: String,
    pub crc64nvme: String,
}

/// Both checksums of bytes written in pieces.
pub struct Checksummer {
    sha256: Sha256,
    crc: crc_fast::Digest,
}

impl Default for Checksummer {
    fn default() -> Self {
        Self { sha256: Sha256::new(), crc: crc_fast::Digest::new(CRC) }
    }
}

impl Checksummer {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.crc.update(bytes);
    }

    pub fn finish(self) -> FileChecksums {
        FileChecksums { sha256: hex(&self.sha256.finalize()), crc64nvme: crc64nvme_text(self.crc.finalize()) }
    }
}

/// Checks bytes read in order against the cheapest checksum a manifest lists for them.
pub struct Verifier(Check);

enum Check {
    Crc64Nvme { expected: String, crc: crc_fast::Digest },
    Sha256 { expected: String, sha256: Sha256 },
}

/// Bytes that do not have the checksum their manifest lists.
#[derive(Debug, thiserror::Error)]
#[error("{algorithm} {actual} differs from the manifest's {expected}")]
pub struct ChecksumMismatch {
    pub algorithm: &'static str,
    pub actual: String,
    pub expected: String,
}

impl Verifier {
    /// The CRC-64/NVME's when the manifest lists one, else the sha256's.
    pub fn new(sha256: &str, crc64nvme: Option<&str>) -> Self {
        Self(match crc64nvme {
            Some(expected) => Check::Crc64Nvme { expected: expected.into(), crc: crc_fast::Digest::new(CRC) },
            None => Check::Sha256 { expected: sha256.into(), sha256: Sha256::new() },
        })
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Check::Crc64Nvme { crc, .. } => crc.update(bytes),
            Check::Sha256 { sha256, .. } => sha256.update(bytes),
        }
    }

    pub fn finish(self) -> Result<(), ChecksumMismatch> {
        let (algorithm, actual, expected) = match self.0 {
            Check::Crc64Nvme { expected, crc } => ("crc64nvme", crc64nvme_text(crc.finalize()), expected),
            Check::Sha256 { expected, sha256 } => ("sha256", hex(&sha256.finalize()), expected),
        };
        match actual == expected {
            true => Ok(()),
            false => Err(ChecksumMismatch { algorithm, actual, expected }),
        }
    }
}

/// A CRC-64/NVME as S3 writes it: the base64 of its eight big-endian bytes.
fn crc64nvme_text(crc: u64) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksums(bytes: &[u8]) -> FileChecksums {
        let mut sums = Checksummer::default();
        for piece in bytes.chunks(4) {
            sums.update(piece);
        }
        sums.finish()
    }

    /// The catalogue's check values for "123456789": CRC-64/NVME 0xAE8B14860A799888 (whose
    /// base64 is what S3 reports for an object of these bytes) and the sha256 `sha256sum` prints.
    #[test]
    fn checksums_are_the_standard_ones_in_s3s_text() {
        let sums = checksums(b"123456789");
        assert_eq!(sums.crc64nvme, "rosUhgp5mIg=");
        assert_eq!(sums.sha256, "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225");
    }

    #[test]
    fn the_crc_is_checked_when_listed_else_the_sha256() {
        let sums = checksums(b"123456789");
        let verify = |bytes: &[u8], crc: Option<&str>| {
            let mut verifier = Verifier::new(&sums.sha256, crc);
            verifier.update(bytes);
            verifier.finish().map_err(|e| e.to_string())
        };
        assert!(verify(b"123456789", Some(&sums.crc64nvme)).is_ok());
        assert!(verify(b"123456789", None).is_ok());
        let changed = verify(b"123456780", Some(&sums.crc64nvme)).unwrap_err();
        assert!(changed.starts_with("crc64nvme ") && changed.ends_with("the manifest's rosUhgp5mIg="), "{changed}");
        assert!(verify(b"123456780", None).unwrap_err().starts_with("sha256 "));
        // A wrong CRC in the manifest is not excused by a right sha256.
        assert!(verify(b"123456789", Some("AAAAAAAAAAA=")).is_err());
    }
}
