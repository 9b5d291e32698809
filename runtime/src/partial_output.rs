//! Generations written as they are made, so that a crash or Ctrl-C loses at most the batch in flight.
//!
//! `pfxrun generate --output OUT` appends each finished batch's lines to `OUT.partial` (flushed), and renames it to
//! `OUT` once every source is done. `OUT.partial.key` holds a fingerprint of what is being generated (sources,
//! settings, bundle, prefix); `--resume` continues an `OUT.partial` whose fingerprint matches and refuses one
//! written for other inputs or settings.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// An output file being written line by line through its `.partial` twin.
pub struct PartialOutput {
    out: PathBuf,
    partial: PathBuf,
    key_file: PathBuf,
    file: File,
    /// Lines in the file, and how many the output must have.
    written: usize,
    total: usize,
    /// On the key file, for the whole run.
    _lock: crate::run_lock::RunLock,
}

impl PartialOutput {
    /// Opens `out`'s partial file for `total` lines of work identified by `key`, and returns the lines already
    /// done: with `resume`, those of a matching earlier partial file; without it, none, and an earlier partial
    /// file that holds lines is refused (starting over would lose them).
    pub fn open(out: &Path, key: &str, resume: bool, total: usize) -> Result<(PartialOutput, Vec<String>)> {
        let partial = with_suffix(out, ".partial");
        let key_file = with_suffix(out, ".partial.key");
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Locked before anything is read: a run still writing this output must not be joined or restarted.
        let mut key_handle = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&key_file)
            .with_context(|| format!("cannot write {}", key_file.display()))?;
        let lock = crate::run_lock::lock(
            key_handle.try_clone().with_context(|| format!("cannot lock {}", key_file.display()))?,
            &key_file,
            &format!("--output {}", out.display()),
        )?;
        let mut old_key = String::new();
        key_handle.read_to_string(&mut old_key).with_context(|| format!("cannot read {}", key_file.display()))?;
        let mut lines = Vec::new();
        if resume && partial.exists() {
            if old_key.trim() != key {
                bail!(
                    "{} was written for {}: delete it to start over, or write to another --output",
                    partial.display(),
                    what_differs(old_key.trim(), key, &key_file)
                );
            }
            let text =
                std::fs::read_to_string(&partial).with_context(|| format!("cannot read {}", partial.display()))?;
            lines = text.lines().map(String::from).collect();
            if lines.len() > total || (!text.is_empty() && !text.ends_with('\n')) {
                bail!(
                    "{} has {} line(s){} for {total} source(s): it is not this run's; delete it to start over",
                    partial.display(),
                    lines.len(),
                    if text.ends_with('\n') || text.is_empty() { "" } else { " and an unfinished last line" }
                );
            }
        }
        if !resume && partial.metadata().is_ok_and(|m| m.len() > 0) {
            if old_key.trim() == key {
                // The same run, interrupted: starting over would throw its work away.
                bail!(
                    "{} holds the finished generations of an interrupted run of this same command: add --resume to \
                     continue it, or delete it to start over",
                    partial.display()
                );
            }
            bail!(
                "{} holds the finished generations of another run (other inputs or settings): delete it to start \
                 over, or write to another --output",
                partial.display()
            );
        }
        key_handle
            .set_len(0)
            .and_then(|_| key_handle.seek(SeekFrom::Start(0)))
            .and_then(|_| key_handle.write_all(format!("{key}\n").as_bytes()))
            .with_context(|| format!("cannot write {}", key_file.display()))?;
        let file =
            if lines.is_empty() { File::create(&partial) } else { OpenOptions::new().append(true).open(&partial) }
                .with_context(|| format!("cannot write {}", partial.display()))?;
        let written = lines.len();
        Ok((PartialOutput { out: out.to_path_buf(), partial, key_file, file, written, total, _lock: lock }, lines))
    }

    /// The partial file, for messages.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Appends lines (each must be a single line) and flushes them to disk.
    pub fn push(&mut self, new: &[String]) -> Result<()> {
        let mut text = String::new();
        for line in new {
            debug_assert!(!line.contains('\n'), "one line per generation");
            text.push_str(line);
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("cannot write {}", self.partial.display()))?;
        self.written += new.len();
        Ok(())
    }

    /// Every line is in: the partial file becomes the output, and its key goes (the lock last).
    pub fn finish(self) -> Result<()> {
        if self.written != self.total {
            bail!(
                "{} has {} line(s) for {} source(s): left as it is, not moved to {}",
                self.partial.display(),
                self.written,
                self.total,
                self.out.display()
            );
        }
        drop(self.file);
        std::fs::rename(&self.partial, &self.out)
            .with_context(|| format!("cannot move {} to {}", self.partial.display(), self.out.display()))?;
        let _ = std::fs::remove_file(&self.key_file);
        Ok(())
    }
}

/// Names the fields (`name value | name value ...`) in which an earlier run's key differs from this one's.
fn what_differs(old: &str, new: &str, key_file: &Path) -> String {
    if old.is_empty() {
        return format!("a run this one cannot be matched with ({} is missing or empty)", key_file.display());
    }
    let fields = |k: &str| -> Vec<(String, String)> {
        k.split(" | ")
            .map(|f| f.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).unwrap_or_default())
            .collect()
    };
    let (old, new) = (fields(old), fields(new));
    let differ: Vec<&str> = new
        .iter()
        .filter(|(name, value)| !old.iter().any(|(n, v)| n == name && v == value))
        .map(|(name, _)| name.as_str())
        .collect();
    if differ.is_empty() {
        "another run".to_string()
    } else {
        format!("another run (not the same {})", differ.join(", "))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> crate::test_scratch::Scratch {
        crate::test_scratch::Scratch::new(&format!("partial-{name}"))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A run that stops after two lines leaves them in OUT.partial; a resumed run with the same key starts from
    /// the third and ends with every line in OUT.
    #[test]
    fn a_resumed_run_continues_where_the_last_one_stopped() {
        let d = dir("resume");
        let out = d.join("hyp.txt");
        let (mut first, done) = PartialOutput::open(&out, "k1", false, 3).unwrap();
        assert!(done.is_empty());
        first.push(&strings(&["one", "two"])).unwrap();
        drop(first); // the crash
        assert!(!out.exists());
        assert_eq!(std::fs::read_to_string(d.join("hyp.txt.partial")).unwrap(), "one\ntwo\n");
        let (mut again, done) = PartialOutput::open(&out, "k1", true, 3).unwrap();
        assert_eq!(done, ["one", "two"]);
        again.push(&strings(&["three"])).unwrap();
        again.finish().unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\ntwo\nthree\n");
        assert!(!d.join("hyp.txt.partial").exists() && !d.join("hyp.txt.partial.key").exists());
    }

    #[test]
    fn a_partial_file_of_other_work_is_refused() {
        let d = dir("refuse");
        let out = d.join("hyp.txt");
        let (mut first, _) = PartialOutput::open(&out, "k1", false, 2).unwrap();
        first.push(&strings(&["one", "two"])).unwrap();
        drop(first);
        let e = PartialOutput::open(&out, "k2", true, 2).err().unwrap().to_string();
        assert!(e.contains("was written for another run") && e.contains("delete it to start over"), "{e}");
        assert!(!e.contains("without --resume"), "that is refused too: {e}");
        let e = PartialOutput::open(&out, "k1", true, 1).err().unwrap().to_string();
        assert!(e.contains("has 2 line(s) for 1 source(s)"), "{e}");
        std::fs::write(d.join("hyp.txt.partial"), "one\ntw").unwrap();
        let e = PartialOutput::open(&out, "k1", true, 2).err().unwrap().to_string();
        assert!(e.contains("unfinished last line"), "{e}");
        // Without --resume, a partial file with lines is refused (starting over would lose them): this same work's
        // with a pointer to --resume. Once emptied, it is started over.
        let e = PartialOutput::open(&out, "k1", false, 2).err().unwrap().to_string();
        assert!(e.contains("add --resume"), "{e}");
        let e = PartialOutput::open(&out, "k2", false, 2).err().unwrap().to_string();
        assert!(e.contains("another run"), "{e}");
        std::fs::write(d.join("hyp.txt.partial"), "").unwrap();
        let (_fresh, done) = PartialOutput::open(&out, "k2", false, 2).unwrap();
        assert!(done.is_empty());
        assert_eq!(std::fs::read_to_string(d.join("hyp.txt.partial")).unwrap(), "");
    }

    /// A refusal names the fields of the key that differ.
    #[test]
    fn a_refusal_says_what_differs() {
        let d = dir("differs");
        let out = d.join("hyp.txt");
        let key = |settings: &str, prefix: &str| format!("sources 3 aa | settings {settings} | prefix {prefix}");
        let (mut first, _) = PartialOutput::open(&out, &key("s1", "p1"), false, 3).unwrap();
        first.push(&strings(&["one"])).unwrap();
        drop(first);
        let e = PartialOutput::open(&out, &key("s2", "p1"), true, 3).err().unwrap().to_string();
        assert!(e.contains("another run (not the same settings)"), "{e}");
        let e = PartialOutput::open(&out, &key("s2", "p2"), true, 3).err().unwrap().to_string();
        assert!(e.contains("another run (not the same settings, prefix)"), "{e}");
    }

    /// While one run writes an output, a second run on it is refused (it would interleave its lines); a run that
    /// ends short of its line count leaves the partial file where it is.
    #[test]
    fn one_run_at_a_time_and_only_whole_outputs_are_moved_in() {
        let d = dir("lock");
        let out = d.join("hyp.txt");
        let (mut first, _) = PartialOutput::open(&out, "k1", false, 2).unwrap();
        for resume in [false, true] {
            let e = PartialOutput::open(&out, "k1", resume, 2).err().unwrap().to_string();
            assert!(e.contains("is in use by another running pfxrun"), "{e}");
        }
        first.push(&strings(&["one"])).unwrap();
        let e = first.finish().err().unwrap().to_string();
        assert!(e.contains("has 1 line(s) for 2 source(s)"), "{e}");
        assert!(!out.exists() && d.join("hyp.txt.partial").exists());
        let (mut again, done) = PartialOutput::open(&out, "k1", true, 2).unwrap();
        assert_eq!(done, ["one"]);
        again.push(&strings(&["two"])).unwrap();
        again.finish().unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\ntwo\n");
    }
}
