//! Stage lines for long compilations (a gpt2-large export is ~3 GB to read, rewrite and write back): `pfxc`
//! turns them on when its standard error is a terminal; tests and library users see nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Prints stages from now on (or stops).
pub fn enable(on: bool) {
    START.get_or_init(Instant::now);
    ON.store(on, Ordering::Relaxed);
}

/// Reports that `what` starts, with the time since [`enable`].
pub fn stage(what: impl std::fmt::Display) {
    if ON.load(Ordering::Relaxed) {
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[{t:6.1}s] {what}");
    }
}
