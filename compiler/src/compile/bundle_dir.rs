//! Writing a bundle folder so that a failed or interrupted `pfxc compile`/`bake` never leaves a folder that looks
//! like a bundle and is not one: every file goes into a staging folder inside the output first; only when all
//! are written does the old manifest go, the new files move in, files of the old bundle that the new one does
//! not have go, and the new manifest comes last. Until then an old bundle in that folder stays whole.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const STAGING: &str = ".pfx-partial";

pub struct BundleDir {
    out: PathBuf,
    staging: PathBuf,
    finished: bool,
}

impl BundleDir {
    /// Refuses an output that cannot hold a bundle made from `source` (an export's folder, or the bundle being
    /// baked): a file, or the source's own folder, whose files the new ones would replace while they are read.
    /// Nothing is created: callers check before their long work.
    pub fn check(out: &Path, source: &Path, what: &str) -> Result<()> {
        if out.exists() && !out.is_dir() {
            bail!("{} is a file, not a folder: pass a folder to -o (it is created if missing)", out.display());
        }
        let source = if source.as_os_str().is_empty() { Path::new(".") } else { source };
        if let (Ok(a), Ok(b)) = (out.canonicalize(), source.canonicalize()) {
            if a == b {
                bail!(
                    "the output folder {} is the {what}'s own folder: its files would be replaced while they are \
                     read; pass another -o",
                    out.display()
                );
            }
        }
        Ok(())
    }

    /// Prepares `out` for a new bundle made from `source` (see [`BundleDir::check`]).
    pub fn create(out: &Path, source: &Path, what: &str) -> Result<BundleDir> {
        Self::check(out, source, what)?;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create the folder {}", out.display()))?;
        let staging = out.join(STAGING);
        // What an interrupted run left.
        if staging.exists() {
            std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
        }
        std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        Ok(BundleDir { out: out.to_path_buf(), staging, finished: false })
    }

    /// Where to write the bundle's file `name` until [`BundleDir::finish`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    /// Moves the staged files in and writes the manifest last. Files the folder's previous bundle listed
    /// (graphs, weights, initial prefix, its tokenizer copy) that the new one does not have are removed.
    pub fn finish(mut self, manifest_json: &str) -> Result<()> {
        self.finished = true;
        let manifest = self.out.join("manifest.json");
        let old = old_bundle_files(&manifest);
        let mut staged = BTreeSet::new();
        for e in std::fs::read_dir(&self.staging).with_context(|| format!("cannot list {}", self.staging.display()))? {
            staged.insert(e?.file_name().to_string_lossy().into_owned());
        }
        if manifest.exists() {
            std::fs::remove_file(&manifest).with_context(|| format!("cannot remove {}", manifest.display()))?;
        }
        for name in &staged {
            let (from, to) = (self.staging.join(name), self.out.join(name));
            std::fs::rename(&from, &to)
                .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
        }
        for name in old.difference(&staged) {
            let p = self.out.join(name);
            if p.is_file() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("cannot remove {} (left from the previous bundle)", p.display()))?;
            }
        }
        crate::onnx_io::write_atomically(&manifest, manifest_json.as_bytes())?;
        std::fs::remove_dir(&self.staging).with_context(|| format!("cannot remove {}", self.staging.display()))?;
        Ok(())
    }
}

impl Drop for BundleDir {
    /// A run that failed takes its staged files with it (an interrupted one leaves them to the next run).
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// The files a bundle's manifest says it wrote; nothing when there is no readable manifest. Only plain names
/// count (a manifest is not trusted to point outside its folder).
fn old_bundle_files(manifest: &Path) -> BTreeSet<String> {
    let Ok(text) = std::fs::read_to_string(manifest) else { return BTreeSet::new() };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return BTreeSet::new() };
    let mut names = BTreeSet::new();
    if let Some(graphs) = v.get("graphs").and_then(|g| g.as_object()) {
        names.extend(graphs.values().filter_map(|f| f.as_str()).map(String::from));
    }
    for key in ["weights_file", "init", "tokenizer"] {
        if let Some(f) = v.get(key).and_then(|f| f.as_str()) {
            names.insert(f.to_string());
        }
    }
    names.retain(|n| !n.is_empty() && Path::new(n).file_name().is_some_and(|f| f == n.as_str()));
    names
}

/// Copies the tokenizer found next to an export into the staged bundle; its name for the manifest.
pub fn copy_tokenizer(dir: &BundleDir, from: Option<&Path>) -> Result<Option<String>> {
    let Some(tok) = from.filter(|p| p.is_file()) else { return Ok(None) };
    std::fs::copy(tok, dir.path("tokenizer.json")).with_context(|| format!("copying {}", tok.display()))?;
    Ok(Some("tokenizer.json".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pfx-bundle-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_unfinished_bundle_leaves_the_old_one_whole_and_a_finished_one_replaces_it() {
        let d = scratch("replace");
        let out = d.join("bundle");
        std::fs::create_dir_all(&out).unwrap();
        let old = r#"{"graphs": {"decode": "decode.onnx", "train_step": "train_step.onnx"}, "weights_file": "weights.bin",
            "init": "prefix.init.safetensors", "tokenizer": "tokenizer.json"}"#;
        for (f, body) in [
            ("manifest.json", old),
            ("decode.onnx", "old"),
            ("train_step.onnx", "old"),
            ("weights.bin", "old"),
            ("tokenizer.json", "old"),
            ("notes.txt", "user's"),
        ] {
            std::fs::write(out.join(f), body).unwrap();
        }
        // Started and dropped (a failed compile): the old bundle is untouched.
        let w = BundleDir::create(&out, &d.join("export"), "export").unwrap();
        std::fs::write(w.path("weights.bin"), "new").unwrap();
        drop(w);
        assert!(!out.join(STAGING).exists(), "a failed run removes its staged files");
        assert_eq!(std::fs::read_to_string(out.join("weights.bin")).unwrap(), "old");
        assert_eq!(std::fs::read_to_string(out.join("manifest.json")).unwrap(), old);
        // Finished: new files in, the old bundle's other files out, the user's file kept.
        let w = BundleDir::create(&out, &d.join("export"), "export").unwrap();
        assert!(!w.path("weights.bin").exists(), "the staging folder starts empty");
        for f in ["weights.bin", "train_step.onnx"] {
            std::fs::write(w.path(f), "new").unwrap();
        }
        w.finish(r#"{"graphs": {"train_step": "train_step.onnx"}}"#).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["manifest.json", "notes.txt", "train_step.onnx", "weights.bin"]);
        assert_eq!(std::fs::read_to_string(out.join("weights.bin")).unwrap(), "new");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_source_folder_and_a_file_are_refused_as_outputs() {
        let d = scratch("refuse");
        let e = BundleDir::create(&d, &d.join("."), "bundle").err().unwrap().to_string();
        assert!(e.contains("is the bundle's own folder"), "{e}");
        std::fs::write(d.join("afile"), "x").unwrap();
        let e = BundleDir::create(&d.join("afile"), &d.join("elsewhere"), "export").err().unwrap().to_string();
        assert!(e.contains("is a file, not a folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_manifest_cannot_name_files_outside_its_folder() {
        let d = scratch("outside");
        std::fs::write(
            d.join("manifest.json"),
            r#"{"graphs": {"a": "../x.onnx", "b": "/etc/passwd", "c": "ok.onnx"}}"#,
        )
        .unwrap();
        assert_eq!(old_bundle_files(&d.join("manifest.json")), BTreeSet::from(["ok.onnx".to_string()]));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
