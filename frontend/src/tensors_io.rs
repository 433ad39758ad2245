//! Reading and writing safetensors files of arbitrary tensors.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {..}}`), then
//! the data block; offsets are relative to the start of the data block.
//!
//! The parser is our own rather than the `safetensors` crate's so that every failure can name the
//! file and the tensor, and so that input which is merely unusual (unaligned data, gaps between
//! tensors) is still accepted. Corrupt input always gives an [`IoError`], never a panic.
//!
//! On reading, floats (F32, BF16, F16, F64) become F32 and integers/booleans become I64, the two
//! dtypes of [`Tensor`]. Writing emits F32 and I64.

use sparkc_ir::tensor::{Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::Path;

/// The largest header we accept: the `safetensors` crate's own limit.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

const METADATA_KEY: &str = "__metadata__";

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    /// The file as a whole is malformed (size, header length, header JSON).
    #[error("{origin}: not a valid safetensors file: {msg}")]
    Format { origin: String, msg: String },
    /// One tensor's entry is malformed or cannot be stored.
    #[error("{origin}: tensor `{name}`: {msg}")]
    Tensor { origin: String, name: String, msg: String },
}

/// The element types of the safetensors format that we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U32,
    U16,
    U8,
    Bool,
}

impl StDtype {
    pub fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "F64" => StDtype::F64,
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "I64" => StDtype::I64,
            "I32" => StDtype::I32,
            "I16" => StDtype::I16,
            "I8" => StDtype::I8,
            "U32" => StDtype::U32,
            "U16" => StDtype::U16,
            "U8" => StDtype::U8,
            "BOOL" => StDtype::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::F64 => "F64",
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::I64 => "I64",
            StDtype::I32 => "I32",
            StDtype::I16 => "I16",
            StDtype::I8 => "I8",
            StDtype::U32 => "U32",
            StDtype::U16 => "U16",
            StDtype::U8 => "U8",
            StDtype::Bool => "BOOL",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StDtype::F64 | StDtype::I64 => 8,
            StDtype::F32 | StDtype::I32 | StDtype::U32 => 4,
            StDtype::F16 | StDtype::BF16 | StDtype::I16 | StDtype::U16 => 2,
            StDtype::I8 | StDtype::U8 | StDtype::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, StDtype::F64 | StDtype::F32 | StDtype::F16 | StDtype::BF16)
    }
}

impl fmt::Display for StDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a safetensors file holds, with the dtype each tensor had on disk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SafetensorsContents {
    pub tensors: BTreeMap<String, Tensor>,
    /// The on-disk dtype of each tensor (the values were converted to F32 or I64).
    pub source_dtypes: BTreeMap<String, StDtype>,
    pub metadata: HashMap<String, String>,
}

/// Read every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, IoError> {
    Ok(read_safetensors(path)?.tensors)
}

/// Read every tensor of a safetensors file, with source dtypes and metadata.
pub fn read_safetensors(path: &Path) -> Result<SafetensorsContents, IoError> {
    let origin = path.display().to_string();
    let read_err = |source| IoError::Read { path: origin.clone(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    // SAFETY: the map is only read, and only for the duration of this call. A concurrent writer
    // truncating the file could fault the process; our own writers replace files by rename, which
    // leaves existing maps intact. Every offset is bounds-checked before use.
    match unsafe { memmap2::Mmap::map(&file) } {
        Ok(map) => read_safetensors_from_bytes(&map, &origin),
        // Empty files and special files cannot be mapped on every platform: read them instead.
        Err(_) => {
            let bytes = std::fs::read(path).map_err(read_err)?;
            read_safetensors_from_bytes(&bytes, &origin)
        }
    }
}

/// Parse an in-memory safetensors file; `origin` names it in errors.
pub fn read_tensors_from_bytes(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, Tensor>, IoError> {
    Ok(read_safetensors_from_bytes(bytes, origin)?.tensors)
}

fn format_err(origin: &str, msg: impl Into<String>) -> IoError {
    IoError::Format { origin: origin.to_string(), msg: msg.into() }
}

fn tensor_err(origin: &str, name: &str, msg: impl Into<String>) -> IoError {
    IoError::Tensor { origin: origin.to_string(), name: name.to_string(), msg: msg.into() }
}

/// Parse an in-memory safetensors file, keeping source dtypes and metadata.
pub fn read_safetensors_from_bytes(bytes: &[u8], origin: &str) -> Result<SafetensorsContents, IoError> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(format_err(
            origin,
            format!("file is {} bytes, shorter than the 8-byte header length", bytes.len()),
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_BYTES as u64 {
        return Err(format_err(origin, format!("header length {header_len} exceeds the limit {MAX_HEADER_BYTES}")));
    }
    let header_len = header_len as usize;
    if header_len > rest.len() {
        return Err(format_err(
            origin,
            format!("header length {header_len} runs past the end of the file ({} bytes after the length)", rest.len()),
        ));
    }
    let (header, data) = rest.split_at(header_len);
    let header = std::str::from_utf8(header).map_err(|e| format_err(origin, format!("header is not UTF-8: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(header).map_err(|e| format_err(origin, format!("header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(format_err(origin, "header is not a JSON object"));
    };

    let mut out = SafetensorsContents::default();
    for (name, entry) in &entries {
        if name == METADATA_KEY {
            out.metadata = parse_metadata(entry, origin)?;
            continue;
        }
        let (dtype, tensor) = parse_tensor(name, entry, data, origin)?;
        out.source_dtypes.insert(name.clone(), dtype);
        out.tensors.insert(name.clone(), tensor);
    }
    Ok(out)
}

fn parse_metadata(entry: &serde_json::Value, origin: &str) -> Result<HashMap<String, String>, IoError> {
    let serde_json::Value::Object(map) = entry else {
        return Err(format_err(origin, "`__metadata__` is not a JSON object"));
    };
    map.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format_err(origin, format!("metadata value `{k}` is not a string"))),
        })
        .collect()
}

fn parse_tensor(
    name: &str,
    entry: &serde_json::Value,
    data: &[u8],
    origin: &str,
) -> Result<(StDtype, Tensor), IoError> {
    let err = |msg: String| tensor_err(origin, name, msg);
    let serde_json::Value::Object(fields) = entry else {
        return Err(err("header entry is not a JSON object".into()));
    };
    let dtype_name =
        fields.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| err("missing string `dtype`".into()))?;
    let dtype = StDtype::parse(dtype_name).ok_or_else(|| err(format!("unsupported dtype `{dtype_name}`")))?;
    let shape_json =
        fields.get("shape").and_then(|v| v.as_array()).ok_or_else(|| err("missing array `shape`".into()))?;
    let shape = shape_json
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            err(format!("shape {} is not a list of non-negative integers", serde_json::Value::from(shape_json.clone())))
        })?;
    let offsets = fields
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| err("`data_offsets` is not a pair of non-negative integers".into()))?;
    let (begin, end) = offsets;
    if begin > end || end > data.len() as u64 {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] are out of range of the {}-byte data block",
            data.len()
        )));
    }
    let bytes = &data[begin as usize..end as usize];
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let expected = numel.checked_mul(dtype.size()).ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    if expected != bytes.len() {
        return Err(err(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets give {}",
            bytes.len()
        )));
    }
    Ok((dtype, Tensor { shape, data: decode(dtype, bytes) }))
}

/// Little-endian bytes to tensor data. `bytes.len()` is a multiple of the dtype size; the data may
/// sit at any alignment, so every element is read with `from_le_bytes`.
fn decode(dtype: StDtype, bytes: &[u8]) -> TensorData {
    fn chunks<const W: usize, T>(bytes: &[u8], f: impl Fn([u8; W]) -> T) -> Vec<T> {
        bytes.chunks_exact(W).map(|c| f(c.try_into().unwrap_or([0; W]))).collect()
    }
    match dtype {
        StDtype::F32 => TensorData::F32(chunks(bytes, f32::from_le_bytes)),
        StDtype::F64 => TensorData::F32(chunks(bytes, |b| f64::from_le_bytes(b) as f32)),
        StDtype::BF16 => TensorData::F32(chunks(bytes, |b| half::bf16::from_le_bytes(b).to_f32())),
        StDtype::F16 => TensorData::F32(chunks(bytes, |b| half::f16::from_le_bytes(b).to_f32())),
        StDtype::I64 => TensorData::I64(chunks(bytes, i64::from_le_bytes)),
        StDtype::I32 => TensorData::I64(chunks(bytes, |b| i32::from_le_bytes(b) as i64)),
        StDtype::I16 => TensorData::I64(chunks(bytes, |b| i16::from_le_bytes(b) as i64)),
        StDtype::I8 => TensorData::I64(bytes.iter().map(|&b| b as i8 as i64).collect()),
        StDtype::U32 => TensorData::I64(chunks(bytes, |b| u32::from_le_bytes(b) as i64)),
        StDtype::U16 => TensorData::I64(chunks(bytes, |b| u16::from_le_bytes(b) as i64)),
        StDtype::U8 => TensorData::I64(bytes.iter().map(|&b| b as i64).collect()),
        StDtype::Bool => TensorData::I64(bytes.iter().map(|&b| (b != 0) as i64).collect()),
    }
}

/// The length prefix and padded header of a file holding `tensors` (F32 and I64), keys sorted.
fn encode_header(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<&HashMap<String, String>>,
    origin: &str,
) -> Result<Vec<u8>, IoError> {
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        // Sorted explicitly (serde_json's map keeps insertion order when another crate enables
        // `preserve_order`), so the same input always gives the same bytes.
        let sorted: BTreeMap<&String, &String> = meta.iter().collect();
        let obj = sorted.into_iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert(METADATA_KEY.into(), serde_json::Value::Object(obj));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        if name == METADATA_KEY {
            return Err(tensor_err(origin, name, "`__metadata__` is reserved and cannot name a tensor"));
        }
        let (dtype, len, width) = match &t.data {
            TensorData::F32(v) => ("F32", v.len(), 4),
            TensorData::I64(v) => ("I64", v.len(), 8),
        };
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(len) {
            return Err(tensor_err(origin, name, format!("shape {:?} does not match its {len} values", t.shape)));
        }
        let end = offset + len * width;
        header
            .insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| format_err(origin, format!("cannot encode header: {e}")))?;
    // Pad with spaces so the data block starts 8-byte aligned, as the reference writer does.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header_bytes.len());
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    Ok(out)
}

/// The data block, in key order, little-endian, converted in chunks to bound the extra memory.
fn write_data(w: &mut impl Write, tensors: &BTreeMap<String, Tensor>) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * 8);
    for t in tensors.values() {
        match &t.data {
            TensorData::F32(v) => {
                for c in v.chunks(CHUNK) {
                    buf.clear();
                    c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            }
            TensorData::I64(v) => {
                for c in v.chunks(CHUNK) {
                    buf.clear();
                    c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            }
        }
    }
    Ok(())
}

/// Serialise tensors (F32 and I64) to safetensors bytes, keys in sorted order.
pub fn write_tensors_to_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<&HashMap<String, String>>,
    origin: &str,
) -> Result<Vec<u8>, IoError> {
    let mut out = encode_header(tensors, metadata, origin)?;
    write_data(&mut out, tensors).map_err(|source| IoError::Write { path: origin.to_string(), source })?;
    Ok(out)
}

/// Write tensors (F32 and I64, any shape including scalars) to a safetensors file, atomically:
/// the bytes go to `<path>.tmp-<pid>` in the same directory, are fsynced, then renamed over
/// `path`, so readers see either the old file or the complete new one. The data is streamed, so a
/// multi-GB checkpoint does not need a second copy in memory.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), IoError> {
    let header = encode_header(tensors, metadata.as_ref(), &path.display().to_string())?;
    write_atomically_with(path, |w| {
        w.write_all(&header)?;
        write_data(w, tensors)
    })
}

/// Replace `path` with `bytes` via a fsynced temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    write_atomically_with(path, |w| w.write_all(bytes))
}

/// Replace `path` with what `fill` writes, via a fsynced temporary file and a rename.
fn write_atomically_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let origin = path.display().to_string();
    let write_err = |source| IoError::Write { path: origin.clone(), source };
    let Some(file_name) = path.file_name() else {
        return Err(write_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")));
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: do not leave a half-written temporary behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    // Make the rename itself durable where directories can be fsynced (Unix).
    #[cfg(unix)]
    {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), Tensor::f32(vec![2, 3], vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 0.0, -0.0]));
        m.insert("ids".to_string(), Tensor::i64(vec![4], vec![0, -1, i64::MAX, i64::MIN]));
        m.insert("s".to_string(), Tensor::scalar(7.25));
        m.insert("empty".to_string(), Tensor::f32(vec![0, 5], vec![]));
        m
    }

    #[test]
    fn round_trip_bytes() {
        let t = sample();
        let meta: HashMap<String, String> = [("k".to_string(), "v \"quoted\"".to_string())].into();
        let bytes = write_tensors_to_bytes(&t, Some(&meta), "mem").expect("writes");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        assert_eq!(header_len % 8, 0, "data block must start 8-byte aligned");
        let back = read_safetensors_from_bytes(&bytes, "mem").expect("reads back");
        assert_eq!(back.tensors, t);
        assert_eq!(back.metadata, meta);
        assert_eq!(back.source_dtypes["ids"], StDtype::I64);
    }

    #[test]
    fn decodes_every_dtype_unaligned() {
        // A header of odd length puts the data block at an odd address.
        let mut data = Vec::new();
        let mut entries = Vec::new();
        let mut add = |name: &str, dtype: &str, n: usize, bytes: Vec<u8>| {
            entries.push(format!(
                "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{n}],\"data_offsets\":[{},{}]}}",
                data.len(),
                data.len() + bytes.len()
            ));
            data.extend(bytes);
        };
        add("u8", "U8", 1, vec![200]);
        add(
            "bf16",
            "BF16",
            2,
            [half::bf16::from_f32(1.5), half::bf16::from_f32(-3.0)].iter().flat_map(|x| x.to_le_bytes()).collect(),
        );
        add("f16", "F16", 1, half::f16::from_f32(0.25).to_le_bytes().to_vec());
        add("f64", "F64", 1, 2.5f64.to_le_bytes().to_vec());
        add("i32", "I32", 2, [-5i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect());
        add("b", "BOOL", 3, vec![0, 1, 1]);
        let mut header = format!("{{{}}}", entries.join(","));
        if header.len() % 2 == 0 {
            header.push(' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(&data);
        let t = read_tensors_from_bytes(&file, "mem").expect("reads");
        assert_eq!(t["u8"].as_i64(), Some(&[200i64][..]));
        assert_eq!(t["bf16"].as_f32(), Some(&[1.5f32, -3.0][..]));
        assert_eq!(t["f16"].as_f32(), Some(&[0.25f32][..]));
        assert_eq!(t["f64"].as_f32(), Some(&[2.5f32][..]));
        assert_eq!(t["i32"].as_i64(), Some(&[-5i64, 9][..]));
        assert_eq!(t["b"].as_i64(), Some(&[0i64, 1, 1][..]));
    }

    #[test]
    fn corrupt_headers_name_the_tensor() {
        let header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend([0u8; 16]);
        let e = read_tensors_from_bytes(&file, "x.safetensors").expect_err("corrupt").to_string();
        assert!(e.contains("x.safetensors") && e.contains("`w`") && e.contains("16 bytes"), "{e}");
        assert!(read_tensors_from_bytes(&[1, 2, 3], "short").is_err());
        assert!(read_tensors_from_bytes(&u64::MAX.to_le_bytes(), "huge").is_err());
    }

    #[test]
    fn writer_rejects_inconsistent_tensors() {
        let mut m = BTreeMap::new();
        m.insert("bad".to_string(), Tensor { shape: vec![3], data: TensorData::F32(vec![1.0]) });
        let e = write_tensors_to_bytes(&m, None, "out").expect_err("inconsistent").to_string();
        assert!(e.contains("`bad`"), "{e}");
    }
}
