//! Root package: owns cross-crate tests, benches and examples.
