//! Fingerprints that stay the same across builds and machines (std's hasher may not): FNV-1a, 64 bits. A
//! checkpoint or a partial output written by one build of pfxrun is continued by the next.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};

/// FNV-1a over bytes fed in any number of pieces.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> &mut Fnv {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100000001b3);
        }
        self
    }

    /// `bytes` preceded by their length, so that consecutive fields cannot run into each other.
    pub(crate) fn field(&mut self, bytes: &[u8]) -> &mut Fnv {
        self.write(&(bytes.len() as u64).to_le_bytes()).write(bytes)
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> String {
    let mut h = Fnv::new();
    for b in bytes {
        h.write(&[b]);
    }
    h.hex()
}

/// A file's whole contents (prefixes, tokenizers, manifests: MBs at most).
pub(crate) fn file_contents(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(h.hex());
        }
        h.write(&buf[..n]);
    }
}

/// A large file (a bundle's weights, GBs) by its length and 256 blocks of 4 KiB spread over it: a retrained or
/// re-exported model differs in every block.
pub(crate) fn file_sample(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = Fnv::new();
    h.write(&len.to_le_bytes());
    let mut sample = [0u8; 4096];
    for k in 0..256u64 {
        f.seek(SeekFrom::Start(len / 256 * k))?;
        let n = f.read(&mut sample)?;
        h.write(&sample[..n]);
    }
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_values() {
        // From the FNV reference (Fowler, Noll, Vo): FNV-1a 64 of "" and "a" and "foobar".
        assert_eq!(fnv1a(*b""), "cbf29ce484222325");
        assert_eq!(fnv1a(*b"a"), "af63dc4c8601ec8c");
        assert_eq!(fnv1a(*b"foobar"), "85944171f73967e8");
        assert_eq!(Fnv::new().write(b"foo").write(b"bar").hex(), "85944171f73967e8");
        assert_ne!(Fnv::new().field(b"ab").field(b"c").hex(), Fnv::new().field(b"a").field(b"bc").hex());
    }

    #[test]
    fn file_fingerprints_follow_contents() {
        let dir = crate::test_scratch::Scratch::new("fingerprint");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, vec![1u8; 200_000]).unwrap();
        std::fs::write(&b, vec![1u8; 200_000]).unwrap();
        assert_eq!(file_contents(&a).unwrap(), file_contents(&b).unwrap());
        assert_eq!(file_sample(&a).unwrap(), file_sample(&b).unwrap());
        let mut other = vec![1u8; 200_000];
        other[0] = 2; // in the first sampled block
        std::fs::write(&b, &other).unwrap();
        assert_ne!(file_contents(&a).unwrap(), file_contents(&b).unwrap());
        assert_ne!(file_sample(&a).unwrap(), file_sample(&b).unwrap());
        let e = file_contents(&dir.join("missing")).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
