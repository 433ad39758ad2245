//! HDF5 bytes → [`H5Group`] tree, through the pure-Rust `hdf5-reader`.
//!
//! Numeric datasets are read in their stored type (the reader is type-strict) and widened to
//! f32 / f64 / i64; strings may be variable or fixed length, ASCII or UTF-8. Attributes are
//! ignored: NIR model files have none. Reads are bounded so that a corrupt size field cannot
//! make us allocate without limit.

use super::error::NirError;
use super::h5::{H5Entry, H5Group, H5Value, MAX_DEPTH};
use super::model::{Array, ArrayData};
use hdf5_reader::error::Error as H5Error;
use hdf5_reader::group::Group;
use hdf5_reader::{Dataset, Datatype, Hdf5File, OpenOptions};

/// Largest single read we accept (a NIR file of a large network is still far below).
const MAX_READ_BYTES: usize = 1 << 31;

fn h5err(origin: &str, msg: impl ToString) -> NirError {
    NirError::Hdf5 { origin: origin.to_string(), msg: msg.to_string() }
}

/// Parse `bytes` into a tree of groups and datasets.
pub fn read_tree(bytes: &[u8], origin: &str) -> Result<H5Group, NirError> {
    let options = OpenOptions { max_read_bytes: MAX_READ_BYTES, ..OpenOptions::default() };
    // The reader is hardened against corrupt input, but a panic in a dependency must still
    // surface as an error naming the file, never abort the caller.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<H5Group, NirError> {
        let file = Hdf5File::from_bytes_with_options(bytes, options).map_err(|e| h5err(origin, e))?;
        let root = file.root_group().map_err(|e| h5err(origin, e))?;
        read_group(&root, origin, "", 0)
    }));
    match result {
        Ok(r) => r,
        Err(_) => Err(h5err(origin, "the HDF5 decoder failed on malformed data")),
    }
}

fn read_group(group: &Group, origin: &str, path: &str, depth: usize) -> Result<H5Group, NirError> {
    if depth > MAX_DEPTH {
        return Err(h5err(origin, format!("groups nested deeper than {MAX_DEPTH} at `{path}`")));
    }
    let (groups, datasets) = group.members().map_err(|e| h5err(origin, format!("group `/{path}`: {e}")))?;
    let mut out = H5Group::new();
    for g in groups {
        let child = join(path, g.name());
        let tree = read_group(&g, origin, &child, depth + 1)?;
        out.insert(g.name().to_string(), H5Entry::Group(tree));
    }
    for d in datasets {
        let child = join(path, d.name());
        let value = read_dataset(&d).map_err(|msg| h5err(origin, format!("dataset `/{child}`: {msg}")))?;
        out.insert(d.name().to_string(), H5Entry::Dataset(value));
    }
    Ok(out)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}/{name}")
    }
}

fn read_dataset(d: &Dataset) -> Result<H5Value, String> {
    let shape: Vec<usize> = d
        .shape()
        .iter()
        .map(|&n| usize::try_from(n).map_err(|_| format!("dimension {n} is too large")))
        .collect::<Result<_, _>>()?;
    let e = |err: H5Error| err.to_string();
    let dtype = d.dtype().clone();
    let is_string = match &dtype {
        Datatype::String { .. } => true,
        Datatype::VarLen { base, .. } => base.is_vlen_string_base(),
        _ => false,
    };
    if is_string {
        let values = d.read_strings().map_err(e)?;
        return Ok(if shape.is_empty() && values.len() == 1 {
            H5Value::Str(values.into_iter().next().unwrap_or_default())
        } else {
            H5Value::Strings { shape, values }
        });
    }
    let data = match dtype {
        Datatype::FloatingPoint { size: 4, .. } => ArrayData::F32(d.read_array::<f32>().map_err(e)?.into_iter().collect()),
        Datatype::FloatingPoint { size: 8, .. } => ArrayData::F64(d.read_array::<f64>().map_err(e)?.into_iter().collect()),
        Datatype::FixedPoint { size, signed, .. } => ArrayData::I64(read_ints(d, size, signed)?),
        // numpy booleans are stored as an int8 enum; read them as 0/1.
        Datatype::Enum { base, .. } => match *base {
            Datatype::FixedPoint { size, signed, .. } => ArrayData::I64(read_ints(d, size, signed)?),
            other => return Err(format!("unsupported enum base type {other:?}")),
        },
        other => return Err(format!("unsupported datatype {other:?}")),
    };
    Array::new(shape, data).ok_or_else(|| "data does not fill the dataset's shape".to_string()).map(H5Value::Array)
}

fn read_ints(d: &Dataset, size: u8, signed: bool) -> Result<Vec<i64>, String> {
    let e = |err: H5Error| err.to_string();
    Ok(match (size, signed) {
        (1, true) => d.read_array::<i8>().map_err(e)?.into_iter().map(i64::from).collect(),
        (1, false) => d.read_array::<u8>().map_err(e)?.into_iter().map(i64::from).collect(),
        (2, true) => d.read_array::<i16>().map_err(e)?.into_iter().map(i64::from).collect(),
        (2, false) => d.read_array::<u16>().map_err(e)?.into_iter().map(i64::from).collect(),
        (4, true) => d.read_array::<i32>().map_err(e)?.into_iter().map(i64::from).collect(),
        (4, false) => d.read_array::<u32>().map_err(e)?.into_iter().map(i64::from).collect(),
        (8, true) => d.read_array::<i64>().map_err(e)?.into_iter().collect(),
        (8, false) => d
            .read_array::<u64>()
            .map_err(e)?
            .into_iter()
            .map(|v| i64::try_from(v).map_err(|_| format!("unsigned value {v} does not fit in int64")))
            .collect::<Result<_, _>>()?,
        _ => return Err(format!("unsupported integer size {size}")),
    })
}
