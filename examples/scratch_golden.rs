use safetensors::SafeTensors;
use sparkc_ir::Tensor;
use std::collections::BTreeMap;

fn load(path: &str) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m = BTreeMap::new();
    for (k, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let t = match v.dtype() {
            safetensors::Dtype::F32 => Tensor::f32(shape, v.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            safetensors::Dtype::I64 => Tensor::i64(shape, v.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            d => panic!("{d:?}"),
        };
        m.insert(k.to_string(), t);
    }
    m
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn main() {
    let dir = "tests/golden/neuronspark-tiny";
    let params = load(&format!("{dir}/model.safetensors"));
    for variant in ["leak", "vpost"] {
        let cfg = sparkc_frontend::NeuronSparkConfig::load(std::path::Path::new(&format!("{dir}/config_{variant}.json"))).unwrap();
        let g = sparkc_frontend::neuronspark::build_graph(&cfg, &sparkc_frontend::neuronspark::GraphOptions { with_loss: true, debug_outputs: true, ..Default::default() }).unwrap();
        let prog = sparkc_backend_cpu::CpuProgram::compile(&g).unwrap();
        let io = load(&format!("{dir}/io_{variant}.safetensors"));
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".to_string(), io["input_ids"].clone());
        inputs.insert("target_ids".to_string(), io["target_ids"].clone());
        inputs.insert("loss_mask".to_string(), io["loss_mask"].clone());
        let mut sess = sparkc_runtime::Session::new(prog, params.clone());
        sess.reset(2);
        let t = std::time::Instant::now();
        let out = sess.step(inputs).unwrap();
        println!("{variant}: {:?}", t.elapsed());
        for k in ["logits", "ponder_cost", "ce_per_token", "lm_loss", "total_loss"] {
            let a = out[k].to_f32_vec();
            let b = io[k].to_f32_vec();
            println!("  {k}: rel {:.3e}  ours {:?} golden {:?}", rel(&a, &b), &a[..a.len().min(3)], &b[..b.len().min(3)]);
        }
        if variant == "leak" {
            let acts = load(&format!("{dir}/acts_leak.safetensors"));
            for (ours, theirs) in [("h_embed", "h_embed"), ("h_after_layer0", "h_after_layer0"), ("h_after_layer1", "h_after_layer1")] {
                // golden is [S,B,D] time-major; ours [B,T,K,D]
                let g = acts[theirs].to_f32_vec();
                let o = out[ours].to_f32_vec();
                let sh = &acts[theirs].shape; let (s, b, d) = (sh[0], sh[1], sh[2]);
                let mut perm = vec![0f32; g.len()];
                for si in 0..s { for bi in 0..b { for di in 0..d { perm[(bi*s+si)*d+di] = g[(si*b+bi)*d+di]; }}}
                println!("  {ours}: rel {:.3e}", rel(&o, &perm));
            }
            println!("  acts keys: {:?}", acts.keys().collect::<Vec<_>>());
        }
    }
}
