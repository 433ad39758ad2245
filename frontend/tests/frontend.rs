//! Integration tests of the front end's parameter table, initialiser, safetensors I/O and
//! checkpoint loader, against the golden tiny model and against corrupt input.

use proptest::prelude::*;
use proptest::sample::Index;
use sparkc_frontend::checkpoint::{
    load_checkpoint, load_checkpoint_from_bytes, save_checkpoint, CheckpointError, CheckpointReport,
};
use sparkc_frontend::init::init_params;
use sparkc_frontend::params::{param_specs, total_params, SnnInitTables};
use sparkc_frontend::tensors_io::{
    read_safetensors, read_tensors, read_tensors_from_bytes, write_tensors, write_tensors_to_bytes,
};
use sparkc_frontend::NeuronSparkConfig;
use sparkc_ir::tensor::{Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/neuronspark-tiny/model.safetensors")
}

fn golden_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(golden_path()).expect("golden model.safetensors is present"))
}

fn golden_params() -> &'static BTreeMap<String, Tensor> {
    static PARAMS: OnceLock<BTreeMap<String, Tensor>> = OnceLock::new();
    PARAMS.get_or_init(|| load_checkpoint(&golden_path(), &NeuronSparkConfig::tiny()).expect("golden loads"))
}

/// A fresh directory for one test's files.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparkc-frontend-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A safetensors file with arbitrary dtypes: (name, dtype, shape, little-endian bytes).
fn raw_file(entries: &[(String, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// The golden parameters re-encoded with `encode` per value, optionally with the `model.` prefix.
fn golden_as(dtype: &str, prefix: &str, encode: impl Fn(f32) -> Vec<u8>) -> Vec<u8> {
    let entries: Vec<_> = golden_params()
        .iter()
        .map(|(k, t)| {
            let bytes = t.as_f32().expect("f32").iter().flat_map(|&x| encode(x)).collect();
            (format!("{prefix}{k}"), dtype, t.shape.clone(), bytes)
        })
        .collect();
    raw_file(&entries)
}

fn mismatch(err: CheckpointError) -> CheckpointReport {
    match err {
        CheckpointError::Mismatch(r) => *r,
        other => panic!("expected a key/shape report, got: {other}"),
    }
}

fn load_params(params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let bytes = write_tensors_to_bytes(params, None, "test").expect("writes");
    load_checkpoint_from_bytes(&bytes, "test.safetensors", &NeuronSparkConfig::tiny())
}

// ---------------------------------------------------------------------------------------------
// Golden checkpoint

#[test]
fn golden_loads_all_67_keys() {
    let cfg = NeuronSparkConfig::tiny();
    let params = golden_params();
    assert_eq!(params.len(), 67);
    let specs = param_specs(&cfg);
    assert_eq!(specs.len(), 67);
    for s in &specs {
        let t = &params[&s.key];
        assert_eq!(t.shape, s.shape, "{}", s.key);
        assert!(matches!(t.data, TensorData::F32(_)), "{}", s.key);
    }
    let numel: u64 = params.values().map(|t| t.numel() as u64).sum();
    assert_eq!(numel, total_params(&cfg));
    // The file records the tiny config in its metadata.
    let contents = read_safetensors(&golden_path()).expect("reads");
    let meta_cfg = NeuronSparkConfig::from_json_str(&contents.metadata["config"], "metadata").expect("config");
    assert_eq!((meta_cfg.d, meta_cfg.n, meta_cfg.num_layers), (cfg.d, cfg.n, cfg.num_layers));
}

#[test]
fn golden_with_prefix_and_reduced_precision_loads() {
    let cfg = NeuronSparkConfig::tiny();
    let golden = golden_params();
    type Codec = (&'static str, fn(f32) -> Vec<u8>, fn(f32) -> f32);
    let codecs: [Codec; 4] = [
        ("BF16", |x| half::bf16::from_f32(x).to_le_bytes().to_vec(), |x| half::bf16::from_f32(x).to_f32()),
        ("F16", |x| half::f16::from_f32(x).to_le_bytes().to_vec(), |x| half::f16::from_f32(x).to_f32()),
        ("F64", |x| (x as f64).to_le_bytes().to_vec(), |x| x),
        ("F32", |x| x.to_le_bytes().to_vec(), |x| x),
    ];
    let dir = scratch_dir("prefixed");
    for (dtype, encode, round) in codecs {
        let bytes = golden_as(dtype, "model.", encode);
        let path = dir.join(format!("model-{dtype}.safetensors"));
        std::fs::write(&path, &bytes).expect("write");
        let loaded = load_checkpoint(&path, &cfg).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        assert_eq!(loaded.len(), 67);
        for (k, t) in golden {
            let want: Vec<f32> = t.as_f32().expect("f32").iter().map(|&x| round(x)).collect();
            assert_eq!(loaded[k].as_f32(), Some(&want[..]), "{dtype} {k}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn our_init_has_the_golden_distributions() {
    // The golden weights come from the original's init (torch.manual_seed(0)); ours must draw
    // from the same distributions, key by key.
    let cfg = NeuronSparkConfig::tiny();
    let ours = init_params(&cfg, 0);
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    for (k, g) in golden_params() {
        let g = g.as_f32().expect("f32");
        let o = ours[k].as_f32().expect("f32");
        let (gm, gs) = stats(g);
        let (om, os) = stats(o);
        if gs == 0.0 {
            assert_eq!(g, o, "{k}: constant init differs");
            continue;
        }
        let n = g.len() as f64;
        let mean_tol = 6.0 * (gs * gs / n + os * os / n).sqrt();
        assert!((gm - om).abs() <= mean_tol, "{k}: mean {om} vs golden {gm} (tol {mean_tol})");
        let std_tol = 6.0 / n.sqrt() + 0.02;
        assert!((os / gs - 1.0).abs() <= std_tol, "{k}: std {os} vs golden {gs}");
    }
    // The structured biases, per n (N = 4, 64 samples each).
    let tables = SnnInitTables::new(cfg.n, cfg.v_th_min);
    for (key, means, noise) in
        [("layers.0.snn_block.b_beta", &tables.b_beta, 0.1), ("layers.1.snn_block.b_th", &tables.b_th, 0.02)]
    {
        let g = golden_params()[key].as_f32().expect("f32");
        for (n, want) in means.iter().enumerate() {
            let got = g.iter().skip(n).step_by(cfg.n).map(|&x| x as f64).sum::<f64>() / cfg.d as f64;
            assert!((got - want).abs() < 5.0 * noise / 8.0, "{key}[n={n}]: golden {got} vs formula {want}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Saving and safetensors writing

#[test]
fn save_then_load_is_bit_exact_and_atomic() {
    let cfg = NeuronSparkConfig::tiny();
    let params = init_params(&cfg, 1234);
    let dir = scratch_dir("save");
    let path = dir.join("ckpt.safetensors");
    save_checkpoint(&path, &params, &cfg).expect("saves");
    // Overwrite in place: still one file, no temporaries left behind.
    save_checkpoint(&path, &params, &cfg).expect("saves again");
    let names: Vec<_> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt.safetensors")]);
    let back = load_checkpoint(&path, &cfg).expect("loads");
    assert_eq!(back, params);
    let contents = read_safetensors(&path).expect("reads");
    assert_eq!(NeuronSparkConfig::from_json_str(&contents.metadata["config"], "meta").expect("config"), cfg);
    // The reference reader accepts it and sees raw keys.
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors crate reads our file");
    assert_eq!(st.len(), 67);
    assert!(st.tensor("layers.1.snn_block.W_in.weight").is_ok());
    // Invalid parameter sets are refused and nothing is written.
    let mut bad = params.clone();
    bad.remove("norm.gain");
    let bad_path = dir.join("bad.safetensors");
    let err = save_checkpoint(&bad_path, &bad, &cfg).expect_err("missing key");
    assert!(err.to_string().contains("`norm.gain`"), "{err}");
    assert!(!bad_path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_tensors_handles_scalars_ints_and_metadata() {
    let dir = scratch_dir("write");
    let path = dir.join("t.safetensors");
    let mut t = BTreeMap::new();
    t.insert("scalar".to_string(), Tensor::scalar(-1.5));
    t.insert("ids".to_string(), Tensor::i64(vec![2, 2], vec![3, 1, 4, 1]));
    t.insert("x".to_string(), Tensor::f32(vec![3], vec![0.5, f32::NAN, f32::INFINITY]));
    let meta: HashMap<String, String> = [("who".to_string(), "test".to_string())].into();
    write_tensors(&path, &t, Some(meta.clone())).expect("writes");
    let back = read_safetensors(&path).expect("reads");
    assert_eq!(back.metadata, meta);
    assert_eq!(back.tensors["scalar"], t["scalar"]);
    assert_eq!(back.tensors["ids"], t["ids"]);
    let x = back.tensors["x"].as_f32().expect("f32");
    assert_eq!(x[0], 0.5);
    assert!(x[1].is_nan() && x[2] == f32::INFINITY);
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference reader");
    assert_eq!(st.tensor("scalar").expect("scalar").shape(), &[] as &[usize]);
    assert_eq!(st.tensor("ids").expect("ids").dtype(), safetensors::Dtype::I64);
    let again = read_tensors(&path).expect("reads");
    assert_eq!(again.keys().collect::<Vec<_>>(), vec!["ids", "scalar", "x"]);
    assert_eq!(again["ids"], back.tensors["ids"]);
    // Unreadable and unwritable paths are errors that name the path.
    let missing = dir.join("nope.safetensors");
    assert!(read_tensors(&missing).expect_err("missing").to_string().contains("nope.safetensors"));
    let unwritable = dir.join("no-such-dir").join("t.safetensors");
    assert!(write_tensors(&unwritable, &t, None).expect_err("no dir").to_string().contains("no-such-dir"));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Targeted checkpoint errors: each must name the offending keys

#[test]
fn reports_every_problem_at_once() {
    let mut p = golden_params().clone();
    p.remove("layers.0.snn_block.b_alpha");
    p.remove("output_norm.weight");
    p.insert("lm_head.weight".into(), Tensor::zeros(vec![256, 64]));
    p.insert("layers.2.block_norm.weight".into(), Tensor::zeros(vec![64]));
    p.insert("layers.1.snn_block.W_out.weight".into(), Tensor::zeros(vec![256, 64]));
    p.insert("layers.0.input_neuron1.w".into(), Tensor::i64(vec![64], vec![0; 64]));
    let mut nan = p["decode_proj.bias"].clone();
    nan.as_f32_mut().expect("f32")[3] = f32::NAN;
    p.insert("decode_proj.bias".into(), nan);
    let err = load_params(&p).expect_err("many problems");
    let text = err.to_string();
    let r = mismatch(err);
    assert_eq!(r.missing, vec!["output_norm.weight", "layers.0.snn_block.b_alpha"]);
    assert_eq!(r.unexpected, vec!["layers.2.block_norm.weight", "lm_head.weight"]);
    assert_eq!(r.misshaped.len(), 1);
    assert_eq!(r.misshaped[0].key, "layers.1.snn_block.W_out.weight");
    assert_eq!((r.misshaped[0].expected.clone(), r.misshaped[0].found.clone()), (vec![64, 256], vec![256, 64]));
    assert_eq!(r.non_float, vec![("layers.0.input_neuron1.w".to_string(), "I64".to_string())]);
    assert_eq!(r.non_finite, vec![("decode_proj.bias".to_string(), 1)]);
    for needle in [
        "test.safetensors",
        "`output_norm.weight`",
        "`layers.0.snn_block.b_alpha`",
        "`lm_head.weight`",
        "`layers.2.block_norm.weight`",
        "`layers.1.snn_block.W_out.weight`: expected [64, 256], found [256, 64]",
        "`layers.0.input_neuron1.w`: I64",
        "`decode_proj.bias`: 1 non-finite",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn non_float_dtypes_name_the_key_and_dtype() {
    for dtype in ["I32", "U8", "BOOL", "I64"] {
        let size = match dtype {
            "I32" => 4,
            "I64" => 8,
            _ => 1,
        };
        let entries: Vec<_> = golden_params()
            .iter()
            .map(|(k, t)| {
                if k == "layers.1.ffn_halt.bias" {
                    (k.clone(), dtype, t.shape.clone(), vec![0u8; size * t.numel()])
                } else {
                    let b = t.as_f32().expect("f32").iter().flat_map(|x| x.to_le_bytes()).collect();
                    (k.clone(), "F32", t.shape.clone(), b)
                }
            })
            .collect();
        let err = load_checkpoint_from_bytes(&raw_file(&entries), "f", &NeuronSparkConfig::tiny())
            .expect_err("integer parameter");
        let text = err.to_string();
        assert!(text.contains(&format!("`layers.1.ffn_halt.bias`: {dtype}")), "{text}");
    }
}

#[test]
fn mixed_prefix_is_an_error() {
    let mut p: BTreeMap<String, Tensor> =
        golden_params().iter().map(|(k, t)| (format!("model.{k}"), t.clone())).collect();
    let t = p.remove("model.norm.gain").expect("key");
    p.insert("norm.gain".into(), t);
    let err = load_params(&p).expect_err("mixed");
    assert!(matches!(err, CheckpointError::MixedPrefix { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("`norm.gain`") && text.contains("model."), "{text}");
}

#[test]
fn wrong_config_lists_every_key_with_a_cap() {
    // Golden weights against a 4-layer config: layers 2 and 3 (60 keys) are missing.
    let mut cfg = NeuronSparkConfig::tiny();
    cfg.num_layers = 4;
    let err = load_checkpoint(&golden_path(), &cfg).expect_err("too few layers");
    let text = err.to_string();
    let r = mismatch(err);
    assert_eq!(r.missing.len(), 60);
    assert!(r.missing.iter().all(|k| k.starts_with("layers.2.") || k.starts_with("layers.3.")));
    assert!(text.contains("60 missing keys") && text.contains("... and 40 more"), "{text}");
    assert!(text.contains(&golden_path().display().to_string()));
    // A different width: every D-dependent key is mis-shaped.
    let mut cfg = NeuronSparkConfig::tiny();
    cfg.d = 32;
    let r = mismatch(load_checkpoint(&golden_path(), &cfg).expect_err("wrong D"));
    // All but the halt biases ([1]) and the FFN neurons ([D_ff]): 67 − 4 − 8.
    assert_eq!(r.misshaped.len(), 55);
    assert!(r.missing.is_empty() && r.unexpected.is_empty());
}

#[test]
fn truncation_at_every_boundary_class_fails() {
    let bytes = golden_bytes();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let data_start = 8 + header_len;
    let cuts =
        [0, 1, 7, 8, 9, data_start / 2, data_start - 1, data_start, data_start + 1, data_start + 3, bytes.len() - 1];
    for cut in cuts {
        let r = read_tensors_from_bytes(&bytes[..cut], "cut");
        assert!(r.is_err(), "truncated at {cut} of {} parsed", bytes.len());
        assert!(load_checkpoint_from_bytes(&bytes[..cut], "cut", &NeuronSparkConfig::tiny()).is_err());
    }
    // A small file, cut at every single length.
    let mut t = BTreeMap::new();
    t.insert("a".to_string(), Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]));
    t.insert("b".to_string(), Tensor::i64(vec![], vec![7]));
    let small = write_tensors_to_bytes(&t, Some(&[("k".into(), "v".into())].into()), "small").expect("writes");
    for cut in 0..small.len() {
        assert!(read_tensors_from_bytes(&small[..cut], "small").is_err(), "cut at {cut}");
    }
    assert_eq!(read_tensors_from_bytes(&small, "small").expect("whole file"), t);
}

#[test]
fn corrupt_entries_name_file_and_tensor() {
    let cases: [(&str, &str); 6] = [
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#, "`w`"),
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,0]}}"#, "`w`"),
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,99999]}}"#, "`w`"),
        (r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, "unsupported dtype"),
        (r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, "`w`"),
        (r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#, "overflows"),
    ];
    for (header, needle) in cases {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend([0u8; 16]);
        let text = read_tensors_from_bytes(&file, "bad.safetensors").expect_err(header).to_string();
        assert!(text.contains("bad.safetensors") && text.contains(needle), "{header}: {text}");
    }
    for header in ["not json", "[1,2]", r#"{"__metadata__": 3}"#, r#"{"__metadata__": {"a": 1}}"#, "{\"w\": 5}"] {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        assert!(read_tensors_from_bytes(&file, "bad").is_err(), "{header}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: corrupt input gives Err, never a panic

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(read_tensors_from_bytes(&bytes, "fuzz").is_err());
        prop_assert!(load_checkpoint_from_bytes(&bytes, "fuzz", &NeuronSparkConfig::tiny()).is_err());
    }

    #[test]
    fn random_headers_never_panic(header in "\\PC{0,200}", tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(tail);
        let _ = read_tensors_from_bytes(&file, "fuzz");
    }

    #[test]
    fn json_like_headers_never_panic(
        dtype in prop_oneof![
            prop::sample::select(vec!["F32", "BF16", "I64", "BOOL", "F64"]).prop_map(String::from),
            "[A-Z0-9]{1,4}",
        ],
        shape in proptest::collection::vec(0u64..u64::MAX, 0..4),
        begin in prop_oneof![0u64..64, any::<u64>()],
        end in prop_oneof![0u64..64, any::<u64>()],
        data_len in 0usize..64,
    ) {
        let entry = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]});
        let header = serde_json::json!({ "t": entry }).to_string();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(vec![0u8; data_len]);
        if let Err(e) = read_tensors_from_bytes(&file, "fuzz") {
            prop_assert!(e.to_string().contains("fuzz"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_golden_is_rejected(frac in 0.0f64..1.0) {
        let bytes = golden_bytes();
        let cut = ((bytes.len() as f64) * frac) as usize;
        prop_assert!(read_tensors_from_bytes(&bytes[..cut], "cut").is_err());
        prop_assert!(load_checkpoint_from_bytes(&bytes[..cut], "cut", &NeuronSparkConfig::tiny()).is_err());
    }

    #[test]
    fn header_byte_flips_never_panic(flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..6)) {
        let mut bytes = golden_bytes().to_vec();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        for (at, value) in flips {
            let i = at.index(header_end);
            bytes[i] = value;
        }
        // A flip may be harmless (e.g. in padding); then the full model must still be there.
        if let Ok(params) = load_checkpoint_from_bytes(&bytes, "flipped", &NeuronSparkConfig::tiny()) {
            prop_assert_eq!(params.len(), 67);
        }
    }

    #[test]
    fn data_byte_flips_never_panic(flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..16)) {
        let mut bytes = golden_bytes().to_vec();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        let data_len = bytes.len() - header_end;
        for (at, value) in flips {
            bytes[header_end + at.index(data_len)] = value;
        }
        match load_checkpoint_from_bytes(&bytes, "flipped", &NeuronSparkConfig::tiny()) {
            Ok(params) => {
                let finite = |t: &Tensor| t.as_f32().is_some_and(|v| v.iter().all(|x| x.is_finite()));
                prop_assert!(params.values().all(finite));
            }
            Err(e) => prop_assert!(matches!(e, CheckpointError::Mismatch(ref r) if !r.non_finite.is_empty()), "{}", e),
        }
    }

    #[test]
    fn integer_parameter_is_rejected_by_name(key in any::<Index>()) {
        let mut p = golden_params().clone();
        let key = p.keys().nth(key.index(p.len())).cloned().expect("key");
        let shape = p[&key].shape.clone();
        let n = p[&key].numel();
        p.insert(key.clone(), Tensor::i64(shape, vec![1; n]));
        let r = mismatch(load_params(&p).expect_err("integer parameter"));
        prop_assert_eq!(r.non_float, vec![(key, "I64".to_string())]);
    }

    #[test]
    fn wrong_shape_is_rejected_by_name(key in any::<Index>(), kind in 0usize..3, delta in 1usize..3) {
        let mut p = golden_params().clone();
        let key = p.keys().nth(key.index(p.len())).cloned().expect("key");
        let old = p[&key].shape.clone();
        let new: Vec<usize> = match kind {
            0 => { let mut s = old.clone(); s[0] += delta; s }
            1 => { let mut s = old.clone(); s.push(delta); s }
            _ => old.iter().rev().copied().chain([delta + 1]).collect(),
        };
        p.insert(key.clone(), Tensor::zeros(new.clone()));
        let err = load_params(&p).expect_err("wrong shape");
        let text = err.to_string();
        prop_assert!(text.contains(&format!("`{key}`: expected {old:?}, found {new:?}")), "{}", text);
        let r = mismatch(err);
        prop_assert!(r.missing.is_empty() && r.unexpected.is_empty() && r.misshaped.len() == 1);
    }

    #[test]
    fn missing_and_extra_keys_are_all_named(
        drop in proptest::collection::btree_set(0usize..67, 0..8),
        extra in proptest::collection::btree_set("[a-z_][a-z0-9_.]{0,24}", 0..5),
        prefixed in any::<bool>(),
    ) {
        prop_assume!(!drop.is_empty() || !extra.is_empty());
        let specs = param_specs(&NeuronSparkConfig::tiny());
        let mut p = golden_params().clone();
        let dropped: Vec<String> = drop.iter().map(|&i| specs[i].key.clone()).collect();
        for k in &dropped {
            p.remove(k);
        }
        // Extras must not be real keys, nor look prefixed (that would be a mixed-prefix error).
        let extra: Vec<String> =
            extra.into_iter().filter(|k| !golden_params().contains_key(k) && !k.starts_with("model.")).collect();
        prop_assume!(!dropped.is_empty() || !extra.is_empty());
        for k in &extra {
            p.insert(k.clone(), Tensor::zeros(vec![2]));
        }
        if prefixed {
            p = p.into_iter().map(|(k, t)| (format!("model.{k}"), t)).collect();
        }
        let err = load_params(&p).expect_err("missing or extra keys");
        let text = err.to_string();
        let r = mismatch(err);
        let mut want_missing = dropped.clone();
        want_missing.sort_by_key(|k| specs.iter().position(|s| &s.key == k));
        prop_assert_eq!(&r.missing, &want_missing);
        let mut want_extra = extra.clone();
        want_extra.sort();
        prop_assert_eq!(&r.unexpected, &want_extra);
        for k in dropped.iter().chain(&extra) {
            prop_assert!(text.contains(&format!("`{k}`")), "{} not named in {}", k, text);
        }
    }
}
