//! Where the benches find the Python peers: the interpreter and the scripts under `benches/`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

/// The reference venv made by the project's setup (torch, transformers, peft).
const DEFAULT_PYTHON: &str = "/root/.cache/pfx/ref/bin/python";

/// `PFX_PEFT_PYTHON`, else the reference venv's python when it exists, else `python3`.
pub fn python() -> String {
    std::env::var("PFX_PEFT_PYTHON").unwrap_or_else(|_| {
        if Path::new(DEFAULT_PYTHON).exists() {
            DEFAULT_PYTHON.into()
        } else {
            "python3".into()
        }
    })
}

/// `benches/NAME` from the repository root when run there (a copy of the tree on another machine), else where
/// the bench was built.
pub fn script(name: &str) -> Result<PathBuf> {
    let here = Path::new("benches").join(name);
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join(name);
    [here, built]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("benches/{name} not found (run from the repository root)"))
}
