//! `sparkc import` (NIR → IR text + parameters), `sparkc export --format nir` (NeuronSpark
//! config + weights, or an IR text file + parameters → NIR) and `sparkc inspect model.nir`.

use crate::model_source::{load_config, load_weights};
use anyhow::{bail, Context, Result};
use sparkc_frontend::neuronspark::{build_graph, GraphOptions};
use sparkc_frontend::nir::{
    self, export_graph, import_graph, Convention, Discretisation, ExportOptions, ImportOptions, Mode, NirError, NodeKind, ReadOptions, Scheme,
    Severity,
};
use sparkc_frontend::tensors_io::{read_tensors, write_tensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The NIR file (.nir, HDF5).
    pub input: PathBuf,
    /// Where to write the IR text; the parameters go next to it as `<stem>.safetensors`.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Whose reading of the file to reproduce: nir (NIR's documented ODEs), spyx, snntorch.
    #[arg(long, default_value = "nir")]
    pub convention: String,
    /// Time step in the file's time unit (default: the convention's, 1e-4 for nir and snntorch,
    /// 1 for spyx).
    #[arg(long)]
    pub dt: Option<f64>,
    /// Discretisation of the neuron ODEs: euler (default) or exact.
    #[arg(long)]
    pub scheme: Option<String>,
    /// Accept what the reference reader refuses (unknown fields, type mismatches), with warnings.
    #[arg(long)]
    pub lenient: bool,
    /// Where to write the parameters (default: next to --out).
    #[arg(long)]
    pub params: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Output format; `nir` is the one there is.
    #[arg(long, default_value = "nir")]
    pub format: String,
    /// A NeuronSpark config.json or preset (tiny, small, neuronspark-0.9b).
    #[arg(long, conflicts_with = "ir")]
    pub config: Option<String>,
    /// NeuronSpark weights (safetensors); or --init-seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long)]
    pub init_seed: Option<u64>,
    /// An IR text file (e.g. from `sparkc import`) to export instead of a NeuronSpark model.
    #[arg(long)]
    pub ir: Option<PathBuf>,
    /// The parameters of --ir (default: the .safetensors next to it).
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// The time one IR frame stands for, written to metadata/dt (default 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub dt: f64,
    /// The discretisation the reader should apply to recover the IR's steps: euler or exact.
    #[arg(long, default_value = "euler")]
    pub scheme: String,
    /// Write what NIR can express even when some nodes cannot be (cut edges become NIR
    /// Inputs/Outputs with metadata/sparkc_omitted).
    #[arg(long)]
    pub partial: bool,
    /// Do not deflate large arrays.
    #[arg(long)]
    pub no_compress: bool,
    #[arg(short, long)]
    pub out: PathBuf,
}

fn scheme(s: &str) -> Result<Scheme> {
    Scheme::parse(s).with_context(|| format!("--scheme must be `euler` or `exact`, got `{s}`"))
}

pub fn import(a: ImportArgs) -> Result<()> {
    let convention = Convention::parse(&a.convention).with_context(|| format!("--convention must be nir, spyx or snntorch, got `{}`", a.convention))?;
    let sch = a.scheme.as_deref().map(scheme).transpose()?;
    let disc = Discretisation::new(convention, a.dt, sch).map_err(anyhow::Error::msg)?;
    let mode = if a.lenient { Mode::Lenient } else { Mode::Strict };
    let read = nir::read_file(&a.input, ReadOptions { mode })?;
    for w in &read.warnings {
        eprintln!("warning: {w}");
    }
    let name = a.input.file_stem().and_then(|s| s.to_str()).unwrap_or("nir").replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
    let imp = import_graph(&read.file, &read.types, &ImportOptions { disc, mode, name })?;
    let given = if a.dt.is_some() || a.scheme.is_some() { "" } else { " (default; set --dt / --scheme)" };
    println!("read {} (written by nir {}): {} nodes", a.input.display(), read.file.version, read.file.graph.nodes.len());
    println!("discretisation: {}{given}", imp.disc);
    for n in &imp.notes {
        println!("note: {n}");
    }
    let text = sparkc_ir::text::print(&imp.graph)?;
    std::fs::write(&a.out, text).with_context(|| format!("cannot write {}", a.out.display()))?;
    let params = a.params.unwrap_or_else(|| a.out.with_extension("safetensors"));
    let mut meta = HashMap::new();
    meta.insert("sparkc_nir_discretisation".to_string(), imp.disc.to_string());
    write_tensors(&params, &imp.params, Some(meta))?;
    let ports = |v: &[(String, usize)]| v.iter().map(|(n, c)| format!("{n} f32[B,T,1,{c}]")).collect::<Vec<_>>().join(", ");
    println!("inputs: {}", ports(&imp.inputs));
    println!("outputs: {}", ports(&imp.outputs));
    println!("wrote {} and {} ({} parameters)", a.out.display(), params.display(), imp.params.len());
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    if a.format != "nir" {
        bail!("--format must be `nir`, got `{}`", a.format);
    }
    let (graph, params) = match (&a.config, &a.ir) {
        (Some(cfg), None) => {
            let cfg = load_config(cfg, None)?;
            let params = load_weights(&cfg, a.weights.as_deref(), a.init_seed)?;
            (build_graph(&cfg, &GraphOptions::default())?, params)
        }
        (None, Some(ir)) => {
            let text = std::fs::read_to_string(ir).with_context(|| format!("cannot read {}", ir.display()))?;
            let graph = sparkc_ir::text::parse(&text).with_context(|| format!("{}", ir.display()))?;
            let p = a.params.clone().unwrap_or_else(|| ir.with_extension("safetensors"));
            (graph, read_tensors(&p)?)
        }
        _ => bail!("give --config C (with --weights W or --init-seed N) or --ir FILE"),
    };
    let opts = ExportOptions { dt: a.dt, scheme: scheme(&a.scheme)?, partial: a.partial };
    let ex = match export_graph(&graph, &params, &opts) {
        Ok(ex) => ex,
        Err(NirError::Export(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            let n = diags.iter().filter(|d| d.severity == Severity::Unsupported).count();
            bail!("{n} nodes cannot be expressed in NIR; pass --partial to write the rest");
        }
        Err(e) => return Err(e.into()),
    };
    for d in &ex.diagnostics {
        println!("{d}");
    }
    nir::write_file(&a.out, &ex.file, !a.no_compress)?;
    let g = &ex.file.graph;
    println!("wrote {}: {} NIR nodes, {} edges (dt {:?}, {} scheme in metadata/)", a.out.display(), g.nodes.len(), g.edges.len(), a.dt, opts.scheme.name());
    Ok(())
}

fn shape(s: &Option<Vec<i64>>) -> String {
    s.as_ref().map(|s| format!("{s:?}")).unwrap_or_else(|| "?".into())
}

fn print_graph(g: &nir::NirGraph, types: &nir::types::GraphTypes, indent: &str) {
    for (name, n) in &g.nodes {
        let t = types.nodes.get(name).cloned().unwrap_or_default();
        let params = match &n.kind {
            NodeKind::Affine { weight, .. } | NodeKind::Linear { weight } => format!("weight {:?} {}", weight.shape, weight.dtype_name()),
            NodeKind::Graph(sub) => format!("{} nodes, {} edges", sub.nodes.len(), sub.edges.len()),
            _ => String::new(),
        };
        println!("{indent}{name:<24} {:<10} {} -> {}  {params}", n.kind.type_name(), shape(&t.input), shape(&t.output));
        if let (NodeKind::Graph(sub), Some(st)) = (&n.kind, types.subgraphs.get(name)) {
            print_graph(sub, st, &format!("{indent}    "));
        }
        for k in n.metadata.keys() {
            println!("{indent}    metadata/{k}");
        }
    }
    for (a, b) in &g.edges {
        println!("{indent}edge {a} -> {b}");
    }
}

/// `sparkc inspect model.nir`: version, nodes with inferred shapes, edges, metadata, what the
/// strict reader thinks and whether it imports.
pub fn inspect_nir(path: &Path) -> Result<()> {
    let strict = nir::read_file(path, ReadOptions { mode: Mode::Strict });
    let read = match &strict {
        Ok(r) => r.clone(),
        Err(e) => {
            println!("strict read (as nir.read with type_check=True) fails: {e}");
            nir::read_file(path, ReadOptions { mode: Mode::Lenient })?
        }
    };
    println!("{}: written by nir {}, {} nodes, {} edges", path.display(), read.file.version, read.file.graph.nodes.len(), read.file.graph.edges.len());
    for w in &read.warnings {
        println!("warning: {w}");
    }
    print_graph(&read.file.graph, &read.types, "  ");
    for k in read.file.graph.metadata.keys() {
        println!("  metadata/{k}");
    }
    let mode = if strict.is_ok() { Mode::Strict } else { Mode::Lenient };
    match import_graph(&read.file, &read.types, &ImportOptions { mode, ..ImportOptions::default() }) {
        Ok(imp) => println!("imports into the IR: {} ops, {} parameters ({})", imp.graph.len(), imp.params.len(), imp.disc),
        Err(e) => println!("does not import: {e}"),
    }
    Ok(())
}
