//! The compile pipeline: fold centering, calibrate on sample data (the CPU backend runs the
//! float graph), quantize, lower, legalize, place and route.

use crate::legalize::{check, Diagnostic, Severity};
use crate::lower::lower;
use crate::place::place;
use crate::program::SpikeProgram;
use crate::target::{Target, WeightScaleMode};
use crate::NeuroError;
use sparkc_backend_cpu::CpuProgram;
use sparkc_ir::{DType, Dim, Graph, Tensor};
use sparkc_passes::quantize::{self, Calibration, QuantConfig, Quantized, WeightScale};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Payload bits of the leak currents (neuron outputs that travel as events).
    pub leak_bits: u32,
    /// Payload bits of other values that travel as events; default: the target's graded-spike
    /// width, capped at 16 and at least 2.
    pub act_bits: Option<u32>,
    /// Fractional bits of the fixed-point format; default: calibrated.
    pub frac: Option<u32>,
    /// Range headroom of payloads of 6 bits or more (see `QuantConfig::headroom`).
    pub headroom: f64,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { leak_bits: 8, act_bits: None, frac: None, headroom: 2.0 }
    }
}

/// A compiled model: the program, the quantized IR it came from, and what compiling took.
pub struct Compiled {
    pub program: SpikeProgram,
    pub quantized: Quantized,
    /// Notes from legalization (splits); errors abort compilation instead.
    pub notes: Vec<Diagnostic>,
    /// Wall seconds per phase.
    pub timings: Vec<(&'static str, f64)>,
}

/// The quantization settings for a target.
pub fn quant_config(target: &Target, opts: &CompileOptions) -> QuantConfig {
    let n = &target.numerics;
    QuantConfig {
        leak_bits: opts.leak_bits,
        act_bits: opts.act_bits.unwrap_or(n.graded_spike_bits.clamp(2, 16)),
        weight_bits: n.weight_bits,
        weight_scale: match n.weight_scale {
            WeightScaleMode::PerChannel => WeightScale::PerChannel,
            WeightScaleMode::PerLayerPow2 => WeightScale::PerLayerPow2,
        },
        state_bits: n.state_bits,
        decay_bits: n.decay_bits,
        threshold_bits: n.threshold_bits,
        threshold_signed: n.threshold_signed,
        frac: opts.frac,
        headroom: opts.headroom,
        headroom_min_bits: 6,
    }
}

/// Inputs for a graph: the given ones, plus zeros for missing float inputs whose shape the
/// given ones determine (the carried neuron state at a sequence start).
pub fn complete_inputs(graph: &Graph, given: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, NeuroError> {
    let mut env = graph.dims.clone();
    for (_, name, ty) in graph.inputs() {
        if let Some(t) = given.get(name) {
            for (d, &s) in ty.shape.dims().iter().zip(&t.shape) {
                if let Dim::Sym(sym) = d {
                    env.entry(sym.clone()).or_insert(s as u64);
                }
            }
        }
    }
    let mut out = given.clone();
    for (_, name, ty) in graph.inputs() {
        if out.contains_key(name) || ty.dtype != DType::F32 {
            continue;
        }
        let shape = ty.shape.concrete(&env).map_err(|sym| NeuroError::Inputs(format!("the model's input `{name}` is missing (and its dimension {sym} is not fixed by the others)")))?;
        out.insert(name.to_string(), Tensor::zeros(shape));
    }
    Ok(out)
}

/// Run the float graph on sample inputs and collect the statistics quantization needs.
pub fn calibrate(graph: &Graph, params: &BTreeMap<String, Tensor>, inputs: &BTreeMap<String, Tensor>) -> Result<Calibration, NeuroError> {
    let probe = quantize::probe_graph(graph)?;
    let prog = CpuProgram::compile(&probe)?;
    let out = prog.run(&complete_inputs(graph, inputs)?, params)?;
    Ok(quantize::calibrate(graph, out)?)
}

/// Lower, legalize, place and route an already quantized graph.
pub fn compile_quantized(q: &Graph, qparams: &BTreeMap<String, Tensor>, target: &Target) -> Result<(SpikeProgram, Vec<Diagnostic>), NeuroError> {
    let low = lower(q, qparams, target.numerics.state_bits)?;
    let mut diags = check(&low.groups, &low.synapses, low.fx.bits, target);
    let mut stages = low.stages;
    let (placement, routes) = place(&low.groups, &low.synapses, &mut stages, target, &mut diags);
    let (errors, notes): (Vec<Diagnostic>, Vec<Diagnostic>) = diags.into_iter().partition(|d| d.severity == Severity::Error);
    if !errors.is_empty() {
        return Err(NeuroError::Legalize { target: target.name.clone(), diagnostics: errors });
    }
    let program = SpikeProgram {
        target: target.clone(),
        source_ir: sparkc_ir::text::print(q)?,
        fx: low.fx,
        frames_per_token: low.frames_per_token,
        luts: low.luts,
        buffers: low.buffers,
        groups: low.groups,
        synapses: low.synapses,
        stages,
        placement,
        routes,
        inputs: low.inputs,
        outputs: low.outputs,
        host_params: low.host_params,
    };
    Ok((program, notes))
}

/// The whole pipeline from a float graph and its parameters (taken: the centered weights are
/// added to them, and they are dropped as soon as quantization is done).
pub fn compile(graph: &Graph, params: BTreeMap<String, Tensor>, calib_inputs: &BTreeMap<String, Tensor>, target: &Target, opts: &CompileOptions) -> Result<Compiled, NeuroError> {
    let mut timings = Vec::new();
    let mut t = Instant::now();
    let mut lap = |name: &'static str, timings: &mut Vec<(&'static str, f64)>| {
        timings.push((name, t.elapsed().as_secs_f64()));
        t = Instant::now();
    };
    let mut all = params;
    let (folded, _) = sparkc_passes::center_fold::fold_centering(graph, &mut all)?;
    lap("fold", &mut timings);
    let cal = calibrate(&folded, &all, calib_inputs)?;
    lap("calibrate", &mut timings);
    let quantized = quantize::quantize(&folded, all, &cal, &quant_config(target, opts))?;
    lap("quantize", &mut timings);
    let (program, notes) = compile_quantized(&quantized.graph, &quantized.params, target)?;
    lap("lower+legalize+place", &mut timings);
    Ok(Compiled { program, quantized, notes, timings })
}
