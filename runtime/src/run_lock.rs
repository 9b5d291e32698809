//! One run at a time per output: `pfxrun train -o DIR` locks DIR and `pfxrun generate --output OUT` locks
//! `OUT.partial.key` for as long as they run, so that a second run started on the same output (a forgotten
//! background job, a second terminal) is refused instead of interleaving its lines or checkpoints with the
//! first's. The lock is `flock`'s: the kernel drops it when the process ends, however it ends, so it never goes
//! stale.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Held while the run lasts.
pub struct RunLock {
    _file: File,
}

/// Locks `file` (a folder or a file, opened as it is) or says which output another process is using.
pub fn lock(file: File, path: &Path, what: &str) -> Result<RunLock> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                bail!(
                    "{what} is in use by another running pfxrun ({} is locked): wait for it to finish, stop it, or \
                     choose another output",
                    path.display()
                );
            }
            // A file system without locks (some network mounts): run unguarded rather than not at all.
            eprintln!("note: cannot lock {} ({e}); two runs on this output would not be told apart", path.display());
        }
    }
    Ok(RunLock { _file: file })
}

/// Locks the folder `dir` (which must exist).
pub fn lock_folder(dir: &Path, what: &str) -> Result<RunLock> {
    let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    lock(f, dir, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_output_is_refused_until_the_first_is_dropped() {
        let d = std::env::temp_dir().join(format!("pfx-run-lock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let first = lock_folder(&d, "the run folder").unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts too.
        let e = lock_folder(&d, "the run folder").err().unwrap().to_string();
        assert!(e.contains("the run folder is in use by another running pfxrun"), "{e}");
        drop(first);
        lock_folder(&d, "the run folder").unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
