//! Initial prefix values, as PEFT initializes them: the embedding N(0, 1), each Linear as `nn.Linear` does
//! (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Seeded; not bit-equal to torch's generator.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::prefix::PrefixShape;

/// SplitMix64: small, seedable, good enough for initialization.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub fn init_prefix(shape: &PrefixShape, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    for (name, dims) in shape.trainables("") {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("embedding.weight") {
            (0..n).map(|_| rng.normal() as f32).collect()
        } else {
            // fan_in of transform.K.weight is its second dimension; a bias shares its Linear's fan_in.
            let fan_in = if name.contains("transform.0") { shape.hidden } else { shape.mid.unwrap_or(1) };
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
        };
        out.insert(name, (dims, values));
    }
    out
}

pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (s, v))| (k.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, None).context("serialising the prefix")?;
    crate::onnx_io::write_atomically(path, &data)
}
