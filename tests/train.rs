//! Training end to end through `sparkc train`: learning, bit-identical resume, checkpoint
//! rotation, and the failure modes (NaN loss, full disk, bad corpora and configs).

use sparkc_frontend::tensors_io::read_tensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sparkc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparkc")).args(args).output().expect("sparkc runs")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparkc-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sparkc failed: {err}\n{}", String::from_utf8_lossy(&out.stdout));
    err + &String::from_utf8_lossy(&out.stdout)
}

fn failed(out: &Output, mention: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(mention), "stderr should mention `{mention}`: {err}");
    err
}

/// Small, fast settings shared by the tests.
const SMALL: &[&str] = &["--quiet", "--batch-size", "2", "--seq-len", "16", "--synthetic-chars", "20000", "--eval-every", "2"];

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "-o", out.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    sparkc(&args)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn the_loss_falls_and_the_model_generates() {
    let run = dir("learn");
    ok(&train(&run, &["--steps", "40", "--lr", "3e-3", "--warmup", "5"]));
    let l = losses(&run);
    assert_eq!(l.len(), 40);
    let (first, last) = (l[..3].iter().sum::<f64>() / 3.0, l[37..].iter().sum::<f64>() / 3.0);
    assert!(last < first - 1.0, "loss did not fall clearly: {first:.3} → {last:.3}");
    for f in ["model.safetensors", "config.json", "metrics.csv", "loss.png", "summary.json"] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let g = sparkc(&[
        "generate", "--config", run.join("config.json").to_str().unwrap(),
        "--weights", run.join("model.safetensors").to_str().unwrap(),
        "--tokenizer", "bytes", "--prompt", "The ", "--max-new-tokens", "20", "--temperature", "0",
    ]);
    let text = ok(&g);
    assert!(text.contains("[0] The "), "{text}");
}

#[test]
fn resume_is_bit_identical_and_rotation_keeps_the_last_n() {
    let whole = dir("whole");
    ok(&train(&whole, &["--steps", "6", "--checkpoint-every", "1", "--keep-checkpoints", "2"]));
    let kept: Vec<_> = std::fs::read_dir(whole.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.contains(&"step-00000005".to_string()) && kept.contains(&"step-00000006".to_string()), "{kept:?}");

    let parts = dir("parts");
    ok(&train(&parts, &["--steps", "6", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--stop-after", "3"]));
    assert_eq!(losses(&parts).len(), 3);
    let out = ok(&train(&parts, &["--steps", "6", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--resume"]));
    assert!(out.contains("resumed from"), "{out}");
    let a = std::fs::read(whole.join("model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from an uninterrupted run");
    assert_eq!(losses(&whole), losses(&parts));
    let opt_a = read_tensors(&whole.join("checkpoints/step-00000006/optimizer.safetensors")).unwrap();
    let opt_b = read_tensors(&parts.join("checkpoints/step-00000006/optimizer.safetensors")).unwrap();
    assert!(opt_a == opt_b);
}

#[test]
fn a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let run = dir("nan");
    // An absurd learning rate turns the weights to garbage after the first update.
    let out = train(&run, &["--steps", "10", "--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1", "--no-compensate"]);
    let err = failed(&out, "at step");
    assert!(err.contains("last good checkpoint"), "{err}");
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().collect();
    assert!(!ckpts.is_empty());
    let last = sparkc_runtime::train::checkpoint::latest(&run.join("checkpoints")).unwrap();
    let w = read_tensors(&last.join("model.safetensors")).unwrap();
    assert!(w.values().all(|t| t.to_f32_vec().iter().all(|v| v.is_finite())), "the kept checkpoint must be finite");
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint() {
    let run = dir("full");
    std::fs::create_dir_all(&run).unwrap();
    // A 6 MiB tmpfs holds one checkpoint of the tiny model (~3.4 MB) but not two.
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=6m", "tmpfs", run.to_str().unwrap()]).output();
    if !mounted.map(|o| o.status.success()).unwrap_or(false) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP a_full_disk_keeps_the_previous_checkpoint: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let out = train(&run, &["--steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "5"]);
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let ckpts = sparkc_runtime::train::checkpoint::list(&run.join("checkpoints"));
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    let _ = Command::new("umount").arg(&run).output();
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("No space left") || text.contains("os error 28"), "expected a disk-full message: {text}");
    assert!(!ckpts.is_empty(), "the first checkpoint must survive");
    assert!(leftovers.is_empty(), "temporary checkpoint directories were left behind");
}

#[test]
fn bad_corpora_and_configs_are_refused_clearly() {
    let run = dir("bad");
    std::fs::create_dir_all(&run).unwrap();
    let empty = run.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    failed(&train(&run.join("a"), &["--text", empty.to_str().unwrap()]), "empty");
    failed(&train(&run.join("b"), &["--text", "/no/such/corpus.txt"]), "/no/such/corpus.txt");

    // A tokenizer with more tokens than the model's 256.
    let vocab: serde_json::Map<String, serde_json::Value> = (0..300).map(|i| (format!("t{i}"), serde_json::Value::from(i))).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    let tok_path = run.join("big_tokenizer.json");
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let corpus = run.join("c.txt");
    std::fs::write(&corpus, "t1 t2 t3 ".repeat(200)).unwrap();
    failed(&train(&run.join("c"), &["--text", corpus.to_str().unwrap(), "--tokenizer", tok_path.to_str().unwrap()]), "300 tokens");

    // Weights of another config.
    let init = run.join("small");
    ok(&sparkc(&["init", "--config", "small", "-o", init.to_str().unwrap()]));
    failed(&train(&run.join("d"), &["--weights", init.join("model.safetensors").to_str().unwrap()]), "layers.0");

    // A TOML file with a typo.
    let toml = run.join("t.toml");
    std::fs::write(&toml, "model = \"tiny\"\n[train]\nstpes = 3\n").unwrap();
    failed(&train(&run.join("e"), &["--config-file", toml.to_str().unwrap()]), "stpes");

    // Resume with nothing to resume.
    failed(&train(&run.join("f"), &["--resume"]), "no checkpoint");

    // Recompute settings for a backend that does not recompute.
    failed(&train(&run.join("g"), &["--kept-layers", "2"]), "--kept-layers applies to --backend cuda");
}
