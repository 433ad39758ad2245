//! End-to-end tests through the `sparkc` binary and the public APIs: the goldens of the original
//! implementation, incremental generation, and bad input.

use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::tensors_io::{read_tensors, write_tensors};
use sparkc_frontend::{init::init_params, NeuronSparkConfig};
use sparkc_ir::Tensor;
use sparkc_runtime::{Sampler, Session};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/neuronspark-tiny");

fn sparkc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparkc")).args(args).output().expect("sparkc runs")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparkc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn assert_failed_cleanly(out: &Output, must_mention: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.contains(must_mention), "stderr should mention `{must_mention}`: {stderr}");
}

#[test]
fn goldens_match_through_sparkc_run() {
    for variant in ["leak", "vpost"] {
        let out = tmp(&format!("out_{variant}.safetensors"));
        let r = sparkc(&[
            "run",
            "--config", &format!("{GOLDEN}/config_{variant}.json"),
            "--weights", &format!("{GOLDEN}/model.safetensors"),
            "--inputs", &format!("{GOLDEN}/io_{variant}.safetensors"),
            "--out", out.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let ours = read_tensors(&out).unwrap();
        let gold = read_tensors(Path::new(&format!("{GOLDEN}/io_{variant}.safetensors"))).unwrap();
        let logits_err = rel_l2(&ours["logits"].to_f32_vec(), &gold["logits"].to_f32_vec());
        assert!(logits_err < 1e-5, "{variant}: logits relative L2 {logits_err:e}");
        assert_eq!(ours["logits"].shape, vec![2, 8, 256]);
        for key in ["lm_loss", "total_loss", "ponder_cost"] {
            let (a, b) = (ours[key].to_f32_vec()[0] as f64, gold[key].to_f32_vec()[0] as f64);
            assert_eq!(ours[key].shape, vec![1]);
            assert!(((a - b) / b).abs() < 1e-5, "{variant}: {key} {a} vs {b}");
        }
        let ce_err = rel_l2(&ours["ce_per_token"].to_f32_vec(), &gold["ce_per_token"].to_f32_vec());
        assert!(ce_err < 1e-5, "{variant}: ce_per_token {ce_err:e}");
        assert_eq!(ours["ce_per_token"].shape, vec![16]);
    }
}

/// d total_loss / d parameter through `sparkc run --grads-out` matches the original's gradients.
#[test]
fn golden_gradients_match_through_sparkc_run() {
    for variant in ["leak", "vpost"] {
        let out = tmp(&format!("gout_{variant}.safetensors"));
        let grads = tmp(&format!("grads_{variant}.safetensors"));
        let r = sparkc(&[
            "run",
            "--config", &format!("{GOLDEN}/config_{variant}.json"),
            "--weights", &format!("{GOLDEN}/model.safetensors"),
            "--inputs", &format!("{GOLDEN}/io_{variant}.safetensors"),
            "--out", out.to_str().unwrap(),
            "--grads-out", grads.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let ours = read_tensors(&grads).unwrap();
        let gold = read_tensors(Path::new(&format!("{GOLDEN}/grads_{variant}.safetensors"))).unwrap();
        assert_eq!(ours.len(), 67);
        assert_eq!(ours.keys().collect::<Vec<_>>(), gold.keys().collect::<Vec<_>>());
        for (k, g) in &gold {
            assert_eq!(ours[k].shape, g.shape, "{k}");
            let err = rel_l2(&ours[k].to_f32_vec(), &g.to_f32_vec());
            assert!(err < 1e-4, "{variant}: gradient of {k} off by {err:e} relative L2");
        }
        // With compensation every b_β / b_α / b_θ gradient changes and nothing else does.
        let comp = tmp(&format!("grads_comp_{variant}.safetensors"));
        let r = sparkc(&[
            "run", "--config", &format!("{GOLDEN}/config_{variant}.json"), "--weights", &format!("{GOLDEN}/model.safetensors"),
            "--inputs", &format!("{GOLDEN}/io_{variant}.safetensors"), "--out", out.to_str().unwrap(),
            "--grads-out", comp.to_str().unwrap(), "--compensate",
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let comp = read_tensors(&comp).unwrap();
        for (k, g) in &ours {
            let modulated = k.ends_with("b_beta") || k.ends_with("b_alpha") || k.ends_with("b_th");
            assert_eq!(comp[k] != *g, modulated, "{k}");
        }
    }
}

#[test]
fn vpost_override_from_the_command_line_equals_the_vpost_config() {
    let a = tmp("override.safetensors");
    let r = sparkc(&[
        "run", "--config", &format!("{GOLDEN}/config_leak.json"), "--boundary", "vpost",
        "--weights", &format!("{GOLDEN}/model.safetensors"),
        "--inputs", &format!("{GOLDEN}/io_vpost.safetensors"), "--out", a.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ours = read_tensors(&a).unwrap();
    let gold = read_tensors(Path::new(&format!("{GOLDEN}/io_vpost.safetensors"))).unwrap();
    assert!(rel_l2(&ours["logits"].to_f32_vec(), &gold["logits"].to_f32_vec()) < 1e-5);
}

/// Prefill followed by one token per call gives the logits of recomputing the whole sequence.
#[test]
fn incremental_generation_equals_full_recompute() {
    let cfg = NeuronSparkConfig::tiny();
    let params = init_params(&cfg, 3);
    let graph = build_graph(&cfg, &GraphOptions::default()).unwrap();
    let program = || sparkc_backend_cpu::CpuProgram::compile(&graph).unwrap();
    let (b, prompt_len, new) = (2, 5, 6);
    let ids: Vec<i64> = (0..b * (prompt_len + new)).map(|i| ((i * 37 + 11) % 256) as i64).collect();
    let row = |r: usize, range: std::ops::Range<usize>| ids[r * (prompt_len + new)..][range].to_vec();

    let mut full = Session::new(program(), params.clone());
    full.reset(b);
    let all: Vec<i64> = (0..b).flat_map(|r| row(r, 0..prompt_len + new)).collect();
    let full_out = full.step(BTreeMap::from([("input_ids".into(), Tensor::i64(vec![b, prompt_len + new], all))])).unwrap();
    let full_logits = full_out["logits"].to_f32_vec();

    let mut inc = Session::new(program(), params);
    inc.reset(b);
    let prompt: Vec<i64> = (0..b).flat_map(|r| row(r, 0..prompt_len)).collect();
    let mut pieces = vec![inc.step(BTreeMap::from([("input_ids".into(), Tensor::i64(vec![b, prompt_len], prompt))])).unwrap()["logits"].clone()];
    for t in prompt_len..prompt_len + new {
        let tok: Vec<i64> = (0..b).flat_map(|r| row(r, t..t + 1)).collect();
        pieces.push(inc.step(BTreeMap::from([("input_ids".into(), Tensor::i64(vec![b, 1], tok))])).unwrap()["logits"].clone());
    }
    let v = cfg.vocab_size;
    let total = prompt_len + new;
    let mut max_diff = 0f32;
    for r in 0..b {
        let mut t0 = 0;
        for p in &pieces {
            let tp = p.shape[1];
            let data = p.as_f32().unwrap();
            for t in 0..tp {
                for j in 0..v {
                    let a = data[(r * tp + t) * v + j];
                    let f = full_logits[(r * total + t0 + t) * v + j];
                    max_diff = max_diff.max((a - f).abs());
                }
            }
            t0 += tp;
        }
    }
    assert!(max_diff < 1e-5, "incremental vs full: max |Δ| = {max_diff}");
}

/// `sparkc generate` greedy tokens are the argmax of full recomputation at each step.
#[test]
fn greedy_generate_matches_recompute_and_writes_tokens() {
    let dir = tmp("gen");
    let r = sparkc(&["init", "--config", "tiny", "--seed", "5", "-o", dir.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let prompt = tmp("prompt.safetensors");
    let p = Tensor::i64(vec![2, 3], vec![3, 17, 99, 3, 42, 7]);
    write_tensors(&prompt, &BTreeMap::from([("ids".into(), p)]), None).unwrap();
    let out = tmp("tokens.safetensors");
    let r = sparkc(&[
        "generate", "--config", dir.join("config.json").to_str().unwrap(),
        "--weights", dir.join("model.safetensors").to_str().unwrap(),
        "--prompt-tensor", &format!("{}:ids", prompt.display()),
        "--max-new-tokens", "5", "--temperature", "0", "--out", out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let tokens = read_tensors(&out).unwrap()["tokens"].clone();
    assert_eq!(tokens.shape, vec![2, 8]);
    let toks = tokens.as_i64().unwrap();

    let cfg = NeuronSparkConfig::tiny();
    let params = init_params(&cfg, 5);
    let graph = build_graph(&cfg, &GraphOptions::default()).unwrap();
    let mut s = Session::new(sparkc_backend_cpu::CpuProgram::compile(&graph).unwrap(), params);
    for len in 3..8 {
        s.reset(2);
        let ids: Vec<i64> = (0..2).flat_map(|r| toks[r * 8..r * 8 + len].to_vec()).collect();
        let logits = s.step(BTreeMap::from([("input_ids".into(), Tensor::i64(vec![2, len], ids))])).unwrap()["logits"].clone();
        let l = logits.as_f32().unwrap();
        for r in 0..2 {
            let last = &l[(r * len + len - 1) * 256..(r * len + len) * 256];
            assert_eq!(Sampler::greedy().sample(last) as i64, toks[r * 8 + len], "row {r}, position {len}");
        }
    }
}

#[test]
fn text_generation_with_a_tokenizer_is_seeded() {
    let args = ["generate", "--config", "tiny", "--init-seed", "1", "--prompt", "hello", "--tokenizer", "bytes", "--max-new-tokens", "8", "--seed", "9"];
    let a = sparkc(&args);
    let b = sparkc(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("[0] hello"));
}

#[test]
fn inspect_reports_the_09b_parameter_count() {
    let r = sparkc(&["inspect", "--config", "neuronspark-0.9b"]);
    assert!(r.status.success());
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("874,142,120"), "{text}");
    assert!(text.contains("13.40 GMAC"), "{text}");
    assert!(text.contains("287,616 floats"), "{text}");
    let r = sparkc(&["inspect", "--config", "tiny", "--emit", "ir"]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("neuron plif {") && text.contains("scan{neuron=selective_plif"), "{text}");
    // What the CUDA backend runs: the modulation maps folded into the hidden neurons' scans.
    let r = sparkc(&["inspect", "--config", "tiny", "--emit", "fused-ir"]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("6 prologue maps") && text.contains("scan{neuron=selective_plif_fused_0"), "{text}");
    assert!(!text.contains("map{f=`sigmoid(x0 + x1)`}"), "{text}");
}

#[test]
fn bad_inputs_fail_with_a_message_and_no_panic() {
    let weights = format!("{GOLDEN}/model.safetensors");
    let config = format!("{GOLDEN}/config_leak.json");
    let io = format!("{GOLDEN}/io_leak.safetensors");
    let out = tmp("bad_out.safetensors");
    let out = out.to_str().unwrap();

    // Truncated checkpoint.
    let bytes = std::fs::read(&weights).unwrap();
    let truncated = tmp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let r = sparkc(&["run", "--config", &config, "--weights", truncated.to_str().unwrap(), "--inputs", &io, "--out", out]);
    assert_failed_cleanly(&r, "truncated.safetensors");

    // A checkpoint for another config: every mis-shaped key is named.
    let r = sparkc(&["run", "--config", "small", "--weights", &weights, "--inputs", &io, "--out", out]);
    assert_failed_cleanly(&r, "layers.0.snn_block.W_in.weight");

    // Bad JSON config.
    let bad_cfg = tmp("bad.json");
    std::fs::write(&bad_cfg, "{\"vocab_size\": 256, \"D\": ").unwrap();
    let r = sparkc(&["run", "--config", bad_cfg.to_str().unwrap(), "--weights", &weights, "--inputs", &io, "--out", out]);
    assert_failed_cleanly(&r, "bad.json");

    // Inputs: missing input_ids, float ids, out-of-range ids.
    let inputs = tmp("bad_inputs.safetensors");
    write_tensors(&inputs, &BTreeMap::from([("x".into(), Tensor::f32(vec![1], vec![0.0]))]), None).unwrap();
    let r = sparkc(&["run", "--config", &config, "--weights", &weights, "--inputs", inputs.to_str().unwrap(), "--out", out]);
    assert_failed_cleanly(&r, "input_ids");
    write_tensors(&inputs, &BTreeMap::from([("input_ids".into(), Tensor::f32(vec![1, 2], vec![0.0, 1.0]))]), None).unwrap();
    let r = sparkc(&["run", "--config", &config, "--weights", &weights, "--inputs", inputs.to_str().unwrap(), "--out", out]);
    assert_failed_cleanly(&r, "input_ids");
    write_tensors(&inputs, &BTreeMap::from([("input_ids".into(), Tensor::i64(vec![1, 2], vec![5, 999]))]), None).unwrap();
    let r = sparkc(&["run", "--config", &config, "--weights", &weights, "--inputs", inputs.to_str().unwrap(), "--out", out]);
    assert_failed_cleanly(&r, "999");

    // Unknown preset / missing file, bad boundary, tokenizer bigger than the vocabulary.
    let r = sparkc(&["inspect", "--config", "no-such-config"]);
    assert_failed_cleanly(&r, "no-such-config");
    let r = sparkc(&["run", "--config", &config, "--boundary", "spiky", "--weights", &weights, "--inputs", &io, "--out", out]);
    assert_failed_cleanly(&r, "spiky");
    let r = sparkc(&["generate", "--config", "tiny", "--init-seed", "0", "--prompt-tensor", &format!("{io}:nope"), "--max-new-tokens", "2"]);
    assert_failed_cleanly(&r, "nope");
    // An unknown benchmark part is refused before any GPU is needed.
    let r = sparkc(&["bench", "--backend", "cuda", "--parts", "scans,nonsense"]);
    assert_failed_cleanly(&r, "nonsense");
}

/// The README's main job, shortened: train, inspect and generate run end to end and leave a
/// checkpoint, a loss curve and text behind (wiring between the commands, not quality).
#[test]
fn demo_runs_end_to_end_in_a_few_steps() {
    let dir = tmp("demo");
    let out = sparkc(&["demo", "--steps", "3", "-o", dir.to_str().unwrap()]);
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("== 3. generate"), "{stdout}");
    for f in ["config.json", "model.safetensors", "loss.png"] {
        assert!(dir.join(f).exists(), "demo did not write {f}");
    }
}
