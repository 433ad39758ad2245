//! [`H5Group`] tree → HDF5 bytes, through the pure-Rust `hdf5-writer`.
//!
//! Layout as `nir.write` (nir 1.0.8) makes it: strings as scalar variable-length strings,
//! arrays in their own dtype, with `compress` every array of at least 4 KiB chunked as one
//! chunk and deflated at level 4 (nir's default `compression="gzip"` deflates every array). HDF5 groups exist only through
//! their members here, so an empty group is not written (nir omits empty metadata too).

use super::error::NirError;
use super::h5::{H5Entry, H5Group, H5Value, MAX_DEPTH};
use super::model::ArrayData;
use hdf5_writer::{DatasetBuilder, FilterDescription, Hdf5Builder, WriteOptions, FILTER_DEFLATE};

/// nir.write's gzip level (h5py's default for `compression="gzip"`).
const GZIP_LEVEL: u32 = 4;

/// Smallest array worth deflating: a chunked dataset costs about 2 KiB of B-tree in the file,
/// more than deflate saves on small parameter vectors.
const MIN_COMPRESS_BYTES: usize = 4096;

fn invalid(path: &str, msg: impl std::fmt::Display) -> NirError {
    NirError::Invalid(format!("cannot write HDF5 dataset `/{path}`: {msg}"))
}

/// Encode a tree as the bytes of an HDF5 file.
pub fn write_tree(tree: &H5Group, compress: bool) -> Result<Vec<u8>, NirError> {
    let mut datasets = Vec::new();
    collect(tree, "", 0, compress, &mut datasets)?;
    let mut builder = Hdf5Builder::new();
    for d in datasets {
        builder = builder.dataset(d);
    }
    let plan = builder.into_plan().map_err(|e| NirError::Invalid(format!("cannot plan the HDF5 file: {e}")))?;
    plan.encode(WriteOptions::default()).map_err(|e| NirError::Invalid(format!("cannot encode the HDF5 file: {e}")))
}

fn collect(group: &H5Group, path: &str, depth: usize, compress: bool, out: &mut Vec<DatasetBuilder>) -> Result<(), NirError> {
    if depth > MAX_DEPTH {
        return Err(invalid(path, format!("groups nested deeper than {MAX_DEPTH}")));
    }
    for (name, entry) in group {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
            return Err(invalid(path, format!("`{name}` is not a valid HDF5 member name (empty, `.`, `..`, or contains `/` or NUL)")));
        }
        let full = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
        match entry {
            H5Entry::Group(g) => collect(g, &full, depth + 1, compress, out)?,
            H5Entry::Dataset(v) => out.push(dataset(&full, v, compress)?),
        }
    }
    Ok(())
}

fn byte_len(a: &super::model::Array) -> usize {
    a.numel() * if matches!(a.data, ArrayData::F32(_)) { 4 } else { 8 }
}

fn dataset(path: &str, value: &H5Value, compress: bool) -> Result<DatasetBuilder, NirError> {
    let err = |e: hdf5_writer::Error| invalid(path, e);
    match value {
        H5Value::Str(s) => DatasetBuilder::vlen_string_data(path, Vec::<u64>::new(), &[s.as_str()]).map_err(err),
        H5Value::Strings { shape, values } => {
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            DatasetBuilder::vlen_string_data(path, dims, values).map_err(err)
        }
        H5Value::Array(a) => {
            let dims: Vec<u64> = a.shape.iter().map(|&d| d as u64).collect();
            let mut d = match &a.data {
                ArrayData::F32(v) => DatasetBuilder::typed_data(path, dims.clone(), v),
                ArrayData::F64(v) => DatasetBuilder::typed_data(path, dims.clone(), v),
                ArrayData::I64(v) => DatasetBuilder::typed_data(path, dims.clone(), v),
            }
            .map_err(err)?;
            // Scalars cannot be chunked (h5py refuses too); small arrays do not pay for it.
            if compress && !dims.is_empty() && byte_len(a) >= MIN_COMPRESS_BYTES {
                d = d.chunked(dims).filter(FilterDescription { id: FILTER_DEFLATE, name: None, client_data: vec![GZIP_LEVEL] });
            }
            Ok(d)
        }
    }
}
