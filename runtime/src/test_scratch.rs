//! Scratch folders for unit tests. Integration tests have `CARGO_TARGET_TMPDIR`; unit tests only the system's
//! temporary folder, so each folder is removed when its test ends (and kept when the test fails, to look at).

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// An empty folder `pfx-NAME-PID` in the temporary folder, removed on drop unless the thread is panicking.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pfx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
