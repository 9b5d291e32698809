fn main() { eprintln!("placeholder: see benches/README.md"); }
