//! Reading and writing ONNX files (onnx-protobuf), external data included.
//!
//! External data is read from the locations written in the model, relative to the model's folder; a location
//! that escapes that folder is refused. Writing can put the weights of several graphs into one shared file,
//! each tensor written once.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf as pb;
use pb::Message;
use protobuf::{EnumOrUnknown, MessageField};

use crate::ir::{Attr, Dim, Function, Graph, Model, Node, ValueInfo, ValueType};
use crate::tensor::{DType, Data, Tensor};

/// Loads an ONNX model; external data is resolved relative to the model's folder.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let proto = pb::ModelProto::parse_from_bytes(&bytes).map_err(|e| {
        anyhow!("{} is not an ONNX model (or is truncated): protobuf decoding failed: {e}", path.display())
    })?;
    let graph = proto.graph.as_ref().ok_or_else(|| {
        anyhow!("{} is not an ONNX model: it decodes but holds no graph (truncated or another format?)", path.display())
    })?;
    // Exporters write the opset imports after the graph, so a file cut short decodes without them.
    if proto.ir_version <= 0 || proto.opset_import.is_empty() {
        bail!(
            "{} is truncated or not an ONNX model: it has no {} (was a copy or download cut short?)",
            path.display(),
            if proto.ir_version <= 0 { "IR version" } else { "opset import" }
        );
    }
    let mut reader = ExternalReader { model_path: path.to_path_buf(), dir, files: HashMap::new() };
    let mut opset = 0;
    let mut other = Vec::new();
    for o in &proto.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            opset = o.version;
        } else {
            other.push((o.domain.clone(), o.version));
        }
    }
    let g = graph_from_proto(graph, &mut reader).with_context(|| format!("reading {}", path.display()))?;
    let functions = proto
        .functions
        .iter()
        .map(|f| function_from_proto(f, &mut reader))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("reading the local functions of {}", path.display()))?;
    Ok(Model {
        graph: g,
        opset,
        other_opsets: other,
        ir_version: proto.ir_version,
        producer_name: proto.producer_name.clone(),
        producer_version: proto.producer_version.clone(),
        functions,
        metadata: proto.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect(),
    })
}

/// The declared output names of a model, in order (reads the protobuf only, not external data).
pub fn output_names(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let proto = pb::ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| anyhow!("{} is not an ONNX model (or is truncated): {e}", path.display()))?;
    Ok(proto.graph.as_ref().map(|g| g.output.iter().map(|o| o.name.clone()).collect()).unwrap_or_default())
}

/// The declared graph inputs of a model, in order, with their types (reads the protobuf only, not external
/// data). Initializers that are also listed as inputs are left out.
pub fn declared_inputs(path: &Path) -> Result<Vec<ValueInfo>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let proto = pb::ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| anyhow!("{} is not an ONNX model (or is truncated): {e}", path.display()))?;
    let Some(g) = proto.graph.as_ref() else { return Ok(vec![]) };
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|v| !inits.contains(v.name.as_str()))
        .map(|v| {
            let what = format!("input '{}' of {}", v.name, path.display());
            Ok(ValueInfo { name: v.name.clone(), ty: value_type_from_proto(&v.type_, &what)? })
        })
        .collect()
}

struct ExternalReader {
    model_path: PathBuf,
    dir: PathBuf,
    files: HashMap<PathBuf, Vec<u8>>,
}

impl ExternalReader {
    /// Resolves `location` inside the model folder, refusing anything that leaves it.
    fn resolve(&self, tensor: &str, location: &str) -> Result<PathBuf> {
        let rel = Path::new(location);
        let escapes = rel.is_absolute()
            || rel.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)));
        if escapes {
            bail!(
                "tensor '{tensor}' of {}: external data location '{location}' is outside the model's folder; \
                 only files inside {} are read (move the data next to the model and fix the location)",
                self.model_path.display(),
                self.dir.display()
            );
        }
        let full = self.dir.join(rel);
        if !full.exists() {
            bail!(
                "tensor '{tensor}' of {}: external data file {} does not exist (the model names '{location}'; \
                 copy it next to the model)",
                self.model_path.display(),
                full.display()
            );
        }
        // Symlinks may still point out of the folder.
        let canon_dir = self.dir.canonicalize().with_context(|| format!("resolving {}", self.dir.display()))?;
        let canon = full.canonicalize().with_context(|| format!("resolving {}", full.display()))?;
        if !canon.starts_with(&canon_dir) {
            bail!(
                "tensor '{tensor}' of {}: external data '{location}' resolves to {}, outside the model's folder {}; refused",
                self.model_path.display(),
                canon.display(),
                canon_dir.display()
            );
        }
        Ok(canon)
    }

    fn read(&mut self, tensor: &str, location: &str, offset: usize, length: Option<usize>) -> Result<Vec<u8>> {
        let path = self.resolve(tensor, location)?;
        if !self.files.contains_key(&path) {
            let bytes = fs::read(&path).with_context(|| format!("cannot read external data {}", path.display()))?;
            self.files.insert(path.clone(), bytes);
        }
        let data = &self.files[&path];
        let end = match length {
            Some(l) => offset + l,
            None => data.len(),
        };
        if end > data.len() || offset > end {
            bail!(
                "tensor '{tensor}' of {}: external data file {} has {} bytes, but the tensor is at bytes {offset}..{end} \
                 (the file is short or truncated)",
                self.model_path.display(),
                path.display(),
                data.len()
            );
        }
        Ok(data[offset..end].to_vec())
    }
}

fn dtype_of(code: i32, what: &str) -> Result<DType> {
    DType::from_onnx(code).ok_or_else(|| anyhow!("{what}: unsupported element type code {code}"))
}

fn tensor_from_proto(t: &pb::TensorProto, reader: &mut ExternalReader) -> Result<Tensor> {
    let what = format!("tensor '{}'", t.name);
    let dtype = dtype_of(t.data_type, &what)?;
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow!("{what}: negative dimension {d}")))
        .collect::<Result<_>>()?;
    let n: usize = shape.iter().product();
    let external = t.data_location.enum_value() == Ok(pb::tensor_proto::DataLocation::EXTERNAL);
    if external {
        let mut location = None;
        let mut offset = 0usize;
        let mut length = None;
        for kv in &t.external_data {
            match kv.key.as_str() {
                "location" => location = Some(kv.value.clone()),
                "offset" => offset = kv.value.parse().with_context(|| format!("{what}: bad external offset"))?,
                "length" => length = Some(kv.value.parse().with_context(|| format!("{what}: bad external length"))?),
                _ => {}
            }
        }
        let location = location.ok_or_else(|| anyhow!("{what}: external data without a location"))?;
        let want = n * dtype.size_of();
        let bytes = reader.read(&t.name, &location, offset, Some(length.unwrap_or(want)))?;
        return Tensor::from_le_bytes(dtype, shape, &bytes).with_context(|| what.clone());
    }
    if !t.raw_data.is_empty() || n == 0 {
        return Tensor::from_le_bytes(dtype, shape, &t.raw_data).with_context(|| what.clone());
    }
    let data = match dtype {
        DType::F32 => Data::F32(t.float_data.clone()),
        DType::F64 => Data::F64(t.double_data.clone()),
        DType::I64 => Data::I64(t.int64_data.clone()),
        DType::I32 => Data::I32(t.int32_data.clone()),
        DType::Bool => Data::Bool(t.int32_data.iter().map(|&x| x != 0).collect()),
        DType::I8 | DType::U8 => Data::Raw(dtype, t.int32_data.iter().map(|&x| x as u8).collect()),
        DType::I16 | DType::U16 | DType::F16 | DType::BF16 => {
            Data::Raw(dtype, t.int32_data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect())
        }
        DType::U32 | DType::U64 => Data::Raw(
            dtype,
            t.uint64_data
                .iter()
                .flat_map(|&x| {
                    if dtype == DType::U32 {
                        (x as u32).to_le_bytes().to_vec()
                    } else {
                        x.to_le_bytes().to_vec()
                    }
                })
                .collect(),
        ),
    };
    let t2 = Tensor::new(shape, data);
    let have = match &*t2.data {
        Data::F32(v) => v.len(),
        Data::F64(v) => v.len(),
        Data::I64(v) => v.len(),
        Data::I32(v) => v.len(),
        Data::Bool(v) => v.len(),
        Data::Raw(dt, b) => b.len() / dt.size_of(),
    };
    if have != n {
        bail!("{what}: holds {have} values, its shape {:?} needs {n}", t2.shape);
    }
    Ok(t2)
}

fn value_type_from_proto(tp: &pb::TypeProto, what: &str) -> Result<ValueType> {
    match &tp.value {
        Some(pb::type_proto::Value::TensorType(tt)) => {
            let dtype = dtype_of(tt.elem_type, what)?;
            let shape = tt.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match &d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                            Dim::Known(*v as usize)
                        }
                        Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                            Dim::Sym(p.clone())
                        }
                        _ => Dim::Sym(format!("?{i}")),
                    })
                    .collect()
            });
            Ok(ValueType { dtype, shape })
        }
        _ => bail!("{what}: only tensor values are supported (found a sequence, map or optional)"),
    }
}

fn graph_from_proto(g: &pb::GraphProto, reader: &mut ExternalReader) -> Result<Graph> {
    let mut graph = Graph::default();
    graph.name = g.name.clone();
    for t in &g.initializer {
        let tensor = tensor_from_proto(t, reader)?;
        graph.initializers.insert(t.name.clone(), tensor);
    }
    if !g.sparse_initializer.is_empty() {
        bail!("graph '{}' has sparse initializers, which pfx does not read", g.name);
    }
    for v in &g.input {
        // Old exports (IR < 4) also list initializers as inputs: they are constants, not inputs.
        if graph.initializers.contains_key(&v.name) {
            continue;
        }
        let ty = value_type_from_proto(&v.type_, &format!("graph input '{}'", v.name))?;
        graph.inputs.push(ValueInfo { name: v.name.clone(), ty });
    }
    for v in &g.output {
        let ty = value_type_from_proto(&v.type_, &format!("graph output '{}'", v.name))?;
        graph.outputs.push(ValueInfo { name: v.name.clone(), ty });
    }
    for v in &g.value_info {
        if let Ok(ty) = value_type_from_proto(&v.type_, &v.name) {
            graph.types.insert(v.name.clone(), ty);
        }
    }
    for (i, n) in g.node.iter().enumerate() {
        graph.nodes.push(node_from_proto(n, i, reader)?);
    }
    Ok(graph)
}

fn node_from_proto(n: &pb::NodeProto, index: usize, reader: &mut ExternalReader) -> Result<Node> {
    let name = if n.name.is_empty() { format!("{}_{index}", n.op_type) } else { n.name.clone() };
    let domain = if n.domain == "ai.onnx" { String::new() } else { n.domain.clone() };
    let mut node = Node::new(name, n.op_type.clone(), n.input.clone(), n.output.clone());
    node.domain = domain;
    for a in &n.attribute {
        let attr = attr_from_proto(a, reader).with_context(|| format!("attribute '{}' of {}", a.name, node.label()))?;
        node.attrs.insert(a.name.clone(), attr);
    }
    Ok(node)
}

fn attr_from_proto(a: &pb::AttributeProto, reader: &mut ExternalReader) -> Result<Attr> {
    use pb::attribute_proto::AttributeType as T;
    if !a.ref_attr_name.is_empty() {
        return Ok(Attr::Ref(a.ref_attr_name.clone()));
    }
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match a.type_.enum_value() {
        Ok(T::FLOAT) => Attr::Float(a.f),
        Ok(T::INT) => Attr::Int(a.i),
        Ok(T::STRING) => Attr::Str(s(&a.s)),
        Ok(T::FLOATS) => Attr::Floats(a.floats.clone()),
        Ok(T::INTS) => Attr::Ints(a.ints.clone()),
        Ok(T::STRINGS) => Attr::Strs(a.strings.iter().map(|x| s(x)).collect()),
        Ok(T::TENSOR) => match a.t.as_ref() {
            Some(t) => Attr::Tensor(tensor_from_proto(t, reader)?),
            None => bail!("tensor attribute without a tensor"),
        },
        Ok(T::GRAPH) => match a.g.as_ref() {
            Some(g) => Attr::Graph(Box::new(graph_from_proto(g, reader)?)),
            None => bail!("graph attribute without a graph"),
        },
        // proto3 writers may leave the type out: infer it from what is set.
        Ok(T::UNDEFINED) => {
            if !a.ints.is_empty() {
                Attr::Ints(a.ints.clone())
            } else if !a.floats.is_empty() {
                Attr::Floats(a.floats.clone())
            } else if a.t.is_some() {
                Attr::Tensor(tensor_from_proto(a.t.as_ref().unwrap(), reader)?)
            } else if a.g.is_some() {
                Attr::Graph(Box::new(graph_from_proto(a.g.as_ref().unwrap(), reader)?))
            } else if !a.s.is_empty() {
                Attr::Str(s(&a.s))
            } else if a.f != 0.0 {
                Attr::Float(a.f)
            } else {
                Attr::Int(a.i)
            }
        }
        other => bail!("attribute type {:?} is not supported", other),
    })
}

fn function_from_proto(f: &pb::FunctionProto, reader: &mut ExternalReader) -> Result<Function> {
    let mut defaults = BTreeMap::new();
    for a in &f.attribute_proto {
        defaults.insert(a.name.clone(), attr_from_proto(a, reader)?);
    }
    let mut attr_names = f.attribute.clone();
    attr_names.extend(defaults.keys().cloned());
    Ok(Function {
        name: f.name.clone(),
        domain: f.domain.clone(),
        inputs: f.input.clone(),
        outputs: f.output.clone(),
        attr_names,
        attr_defaults: defaults,
        nodes: f.node.iter().enumerate().map(|(i, n)| node_from_proto(n, i, reader)).collect::<Result<_>>()?,
    })
}

// ------------------------------------------------------------------------------------------------ writing

/// A tensor's place in the weights file (offset, length) and the values written there.
type Placed = ((u64, u64), std::sync::Arc<crate::tensor::Data>);

/// A shared external-data file: several graphs can write their weights into it, each tensor once.
pub struct WeightsFile {
    path: PathBuf,
    file: fs::File,
    /// Location written into the models (the file name: models sit in the same folder).
    location: String,
    offset: u64,
    written: HashMap<(String, usize), (u64, u64)>,
    /// What was written, by byte length and a hash of a sample of the bytes: a tensor with the same bytes as one
    /// already there (the weights of the prefill and decode graphs, read from the export again) is not
    /// written twice. A candidate's bytes are compared whole before its place is reused.
    by_content: HashMap<(usize, u64), Vec<Placed>>,
    /// Tensors smaller than this stay inline in the model.
    pub threshold: usize,
}

impl WeightsFile {
    pub fn create(path: &Path) -> Result<WeightsFile> {
        let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let location = path
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?
            .to_string_lossy()
            .into_owned();
        Ok(WeightsFile {
            path: path.to_path_buf(),
            file,
            location,
            offset: 0,
            written: HashMap::new(),
            by_content: HashMap::new(),
            threshold: 1024,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the tensor (once per name and storage, and once per content) and returns its offset and length.
    fn place(&mut self, name: &str, t: &Tensor) -> Result<(u64, u64)> {
        let key = (name.to_string(), std::sync::Arc::as_ptr(&t.data) as usize);
        if let Some(&pos) = self.written.get(&key) {
            return Ok(pos);
        }
        let bytes = t.data.le_bytes();
        let sample = (bytes.len(), sample_hash(&bytes));
        let same = self.by_content.get(&sample).and_then(|seen| seen.iter().find(|(_, data)| data.le_bytes() == bytes));
        if let Some(&(pos, _)) = same {
            self.written.insert(key, pos);
            return Ok(pos);
        }
        // Align each tensor to 64 bytes, so runtimes can map them directly.
        let pad = (64 - self.offset % 64) % 64;
        self.file.write_all(&vec![0u8; pad as usize])?;
        self.offset += pad;
        self.file.write_all(&bytes).with_context(|| format!("writing {}", self.path.display()))?;
        let pos = (self.offset, bytes.len() as u64);
        self.offset += bytes.len() as u64;
        self.written.insert(key, pos);
        self.by_content.entry(sample).or_default().push((pos, t.data.clone()));
        Ok(pos)
    }
}

/// A hash of 64 slices of 64 bytes spread over `bytes` (and of its two ends): cheap on a 150 MB embedding,
/// and tells different weights apart; [`WeightsFile::place`] compares the whole bytes on a match.
fn sample_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let n = bytes.len();
    bytes[..n.min(4096)].hash(&mut h);
    bytes[n.saturating_sub(4096)..].hash(&mut h);
    for i in 0..64 {
        let at = n / 64 * i;
        bytes[at..(at + 64).min(n)].hash(&mut h);
    }
    h.finish()
}

/// Smallest IR version that an opset needs (what onnx.checker expects).
fn ir_version_for(opset: i64) -> i64 {
    match opset {
        ..=12 => 7,
        13..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

/// Writes `model` to `path` (atomically: temporary file, then rename). With `weights`, tensors of at least
/// `weights.threshold` bytes go to that shared file, which must be in the same folder as `path`.
pub fn save(model: &Model, path: &Path, weights: Option<&mut WeightsFile>) -> Result<()> {
    let mut w = weights;
    let proto = model_to_proto(model, &mut w)?;
    let bytes = proto
        .write_to_bytes()
        .map_err(|e| anyhow!("cannot serialise {}: {e} (models over 2 GiB need external weights)", path.display()))?;
    write_atomically(path, &bytes)
}

pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    let written = fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display())).and_then(|()| {
        fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn model_to_proto(model: &Model, weights: &mut Option<&mut WeightsFile>) -> Result<pb::ModelProto> {
    let mut p = pb::ModelProto::new();
    p.ir_version = model.ir_version.max(ir_version_for(model.opset));
    p.producer_name = "pfx".into();
    p.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut o = pb::OperatorSetIdProto::new();
    o.domain = String::new();
    o.version = model.opset;
    p.opset_import.push(o);
    for (d, v) in &model.other_opsets {
        let mut o = pb::OperatorSetIdProto::new();
        o.domain = d.clone();
        o.version = *v;
        p.opset_import.push(o);
    }
    for (k, v) in &model.metadata {
        let mut e = pb::StringStringEntryProto::new();
        e.key = k.clone();
        e.value = v.clone();
        p.metadata_props.push(e);
    }
    p.graph = MessageField::some(graph_to_proto(&model.graph, weights, true)?);
    for f in &model.functions {
        p.functions.push(function_to_proto(f, weights)?);
    }
    Ok(p)
}

fn value_info_to_proto(name: &str, ty: &ValueType) -> pb::ValueInfoProto {
    let mut v = pb::ValueInfoProto::new();
    v.name = name.to_string();
    let mut tt = pb::type_proto::Tensor::new();
    tt.elem_type = ty.dtype.onnx_code();
    if let Some(dims) = &ty.shape {
        let mut sp = pb::TensorShapeProto::new();
        for d in dims {
            let mut dim = pb::tensor_shape_proto::Dimension::new();
            dim.value = Some(match d {
                Dim::Known(n) => pb::tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Sym(s) => pb::tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            });
            sp.dim.push(dim);
        }
        tt.shape = MessageField::some(sp);
    }
    let mut tp = pb::TypeProto::new();
    tp.value = Some(pb::type_proto::Value::TensorType(tt));
    v.type_ = MessageField::some(tp);
    v
}

fn tensor_to_proto(name: &str, t: &Tensor, weights: &mut Option<&mut WeightsFile>) -> Result<pb::TensorProto> {
    let mut p = pb::TensorProto::new();
    p.name = name.to_string();
    p.data_type = t.dtype().onnx_code();
    p.dims = t.shape.iter().map(|&d| d as i64).collect();
    match weights {
        Some(w) if t.byte_len() >= w.threshold => {
            let (off, len) = w.place(name, t)?;
            p.data_location = EnumOrUnknown::new(pb::tensor_proto::DataLocation::EXTERNAL);
            for (k, v) in [("location", w.location.clone()), ("offset", off.to_string()), ("length", len.to_string())] {
                let mut e = pb::StringStringEntryProto::new();
                e.key = k.into();
                e.value = v;
                p.external_data.push(e);
            }
        }
        _ => p.raw_data = t.to_le_bytes(),
    }
    Ok(p)
}

fn graph_to_proto(g: &Graph, weights: &mut Option<&mut WeightsFile>, main: bool) -> Result<pb::GraphProto> {
    let mut p = pb::GraphProto::new();
    p.name = if g.name.is_empty() { "pfx".into() } else { g.name.clone() };
    for v in &g.inputs {
        p.input.push(value_info_to_proto(&v.name, &v.ty));
    }
    for v in &g.outputs {
        let ty = g.type_of(&v.name).filter(|t| t.shape.is_some()).unwrap_or_else(|| v.ty.clone());
        p.output.push(value_info_to_proto(&v.name, &ty));
    }
    for (name, t) in &g.initializers {
        // Subgraph constants stay inline: only the main graph's weights are shared.
        let mut inline = None;
        let t = tensor_to_proto(name, t, if main { &mut *weights } else { &mut inline })?;
        p.initializer.push(t);
    }
    for n in &g.nodes {
        p.node.push(node_to_proto(n, weights)?);
    }
    Ok(p)
}

fn node_to_proto(n: &Node, weights: &mut Option<&mut WeightsFile>) -> Result<pb::NodeProto> {
    let mut p = pb::NodeProto::new();
    p.name = n.name.clone();
    p.op_type = n.op.clone();
    p.domain = n.domain.clone();
    p.input = n.inputs.clone();
    p.output = n.outputs.clone();
    for (k, a) in &n.attrs {
        p.attribute.push(attr_to_proto(k, a, weights)?);
    }
    Ok(p)
}

fn attr_to_proto(name: &str, a: &Attr, weights: &mut Option<&mut WeightsFile>) -> Result<pb::AttributeProto> {
    use pb::attribute_proto::AttributeType as T;
    let mut p = pb::AttributeProto::new();
    p.name = name.to_string();
    let ty = match a {
        Attr::Int(i) => {
            p.i = *i;
            T::INT
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            T::INTS
        }
        Attr::Float(f) => {
            p.f = *f;
            T::FLOAT
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            T::FLOATS
        }
        Attr::Str(s) => {
            p.s = s.as_bytes().to_vec();
            T::STRING
        }
        Attr::Strs(v) => {
            p.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            T::STRINGS
        }
        Attr::Tensor(t) => {
            p.t = MessageField::some(tensor_to_proto("", t, &mut None)?);
            T::TENSOR
        }
        Attr::Graph(g) => {
            p.g = MessageField::some(graph_to_proto(g, weights, false)?);
            T::GRAPH
        }
        Attr::Ref(r) => {
            p.ref_attr_name = r.clone();
            T::UNDEFINED
        }
    };
    p.type_ = EnumOrUnknown::new(ty);
    Ok(p)
}

fn function_to_proto(f: &Function, weights: &mut Option<&mut WeightsFile>) -> Result<pb::FunctionProto> {
    let mut p = pb::FunctionProto::new();
    p.name = f.name.clone();
    p.domain = f.domain.clone();
    p.input = f.inputs.clone();
    p.output = f.outputs.clone();
    p.attribute = f.attr_names.iter().filter(|n| !f.attr_defaults.contains_key(*n)).cloned().collect();
    for (k, a) in &f.attr_defaults {
        p.attribute_proto.push(attr_to_proto(k, a, weights)?);
    }
    for n in &f.nodes {
        p.node.push(node_to_proto(n, weights)?);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal bytes are written once, whatever the name or storage; bytes that differ anywhere (also where the
    /// sample hash does not look, and -0.0 against 0.0, equal as floats) each get their own place, and every
    /// place holds its tensor's bytes.
    #[test]
    fn weights_are_written_once_per_content() {
        let dir = std::env::temp_dir().join(format!("pfx-weights-dedup-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let mut w = WeightsFile::create(&path).unwrap();
        let n = 64 * 1024;
        let base: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        // Byte 4·(n/2 + 100) lies between two sampled slices (every 4096 bytes here) and away from the ends.
        let mut off_sample = base.clone();
        off_sample[n / 2 + 100] += 1.0;
        let mut negative_zero = vec![0.0f32; n];
        negative_zero[n / 2 + 100] = -0.0;
        let tensors = [
            ("a", Tensor::f32(vec![n], base.clone())),
            ("b", Tensor::f32(vec![n], base)),
            ("c", Tensor::f32(vec![n], off_sample)),
            ("z", Tensor::f32(vec![n], vec![0.0; n])),
            ("nz", Tensor::f32(vec![n], negative_zero)),
        ];
        let at: Vec<(u64, u64)> = tensors.iter().map(|(name, t)| w.place(name, t).unwrap()).collect();
        assert_eq!(at[1], at[0], "the same bytes in another tensor: written once");
        assert_eq!(sample_hash(&tensors[2].1.to_le_bytes()), sample_hash(&tensors[0].1.to_le_bytes()));
        assert_ne!(at[2], at[0], "a difference the sample misses still gets its own place");
        assert_ne!(at[4], at[3], "-0.0 is not 0.0 in bytes");
        let file = fs::read(&path).unwrap();
        assert_eq!(file.len() as u64, at[4].0 + at[4].1, "four tensors written");
        for ((name, t), (offset, len)) in tensors.iter().zip(&at) {
            assert_eq!(&file[*offset as usize..(offset + len) as usize], &t.to_le_bytes()[..], "{name}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
