//! How `pfxc` and `pfxrun` treat a standard output that cannot take their results, set up first thing in `main`.

/// A closed pipe (`pfxc inspect --json | head`) ends the program quietly, as other command-line tools do (Rust
/// ignores SIGPIPE, and printing then panics); any other failed write (a full disk) is a one-line error with exit
/// status 1 instead of a crash report. Other panics go to the hook that was there.
pub fn quiet_on_output_errors() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let what = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or_default();
        if what.starts_with("failed printing to std") {
            eprintln!("error: {what}");
            std::process::exit(1);
        }
        default_hook(info);
    }));
}
