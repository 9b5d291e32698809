//! pfx compiler: reads exported GPT-2/BART ONNX graphs and rewrites them (canonical form, specialized shapes,
//! and, on top, prefix-tuning training and inference graphs).

pub mod autodiff;
pub mod canonicalize;
pub mod cli_output;
pub mod compile;
pub mod eval;
pub mod inspect;
pub mod ir;
pub mod onnx_io;
pub mod progress;
pub mod shape;
pub mod simplify;
pub mod specialize;
pub mod tensor;
pub mod text;

use std::path::Path;

use anyhow::Result;

/// Loads and canonicalizes a model: the common first step of every command.
pub fn load_canonical(path: &Path) -> Result<ir::Model> {
    let mut m = onnx_io::load(path)?;
    canonicalize::canonicalize(&mut m).map_err(|e| e.context(format!("canonicalizing {}", path.display())))?;
    Ok(m)
}
