//! pfx-runtime: runs ONNX graphs (pfx bundles) on tract or ONNX Runtime, with host tensors and
//! safetensors I/O.
//!
//! ```no_run
//! use pfx_runtime::{open, read_safetensors, BackendKind, OrtOptions};
//! let mut backend = open("model.onnx", BackendKind::Tract, &OrtOptions::default())?;
//! let outputs = backend.run(&read_safetensors("inputs.safetensors")?)?;
//! # anyhow::Ok(())
//! ```

pub mod alloc;
pub mod backend;
pub mod bundle;
pub mod commands;
mod cuda_edit;
pub mod data;
pub mod devices;
mod fingerprint;
pub mod generate;
pub mod ort_backend;
pub mod partial_output;
pub mod peft;
pub mod processors;
pub mod run_lock;
pub mod score;
pub mod search;
pub mod seq2seq;
pub mod seq2seq_data;
pub mod tensor;
#[cfg(test)]
mod test_scratch;
pub mod tokenize;
pub mod tract_adamw;
pub mod tract_backend;
pub mod tract_gemv;
pub mod tract_kernels;
pub mod tract_skinny;
pub mod tract_split;
pub mod train;

pub use backend::{
    open, open_stateful_step, select_inputs, state_pairs, Backend, BackendKind, HostStateStep, IoSpec, KeptEdit,
    StatePair, StatefulStep,
};
pub use ort_backend::{
    describe as ort_describe, locate_ort_library, ort_runtime, OrtBackend, OrtDevice, OrtLibSource, OrtOptions,
    OrtRuntime, OrtStatefulStep, Placements, ORT_INSTALL_HINT,
};
pub use tensor::{
    read_safetensors, safetensors_from_bytes, safetensors_to_bytes, worst_norm_rel_error, write_safetensors, DType,
    HostTensor, TensorData,
};
pub use tract_backend::TractBackend;
