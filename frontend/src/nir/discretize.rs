//! From NIR's continuous-time neurons to discrete IR neuron models.
//!
//! NIR states ODEs and leaves the discretisation to the reader, and frameworks read their own
//! files differently (see `shared/ref/nir-framework-conventions.md`). So the step size `dt`,
//! the scheme and the framework convention are explicit choices here, and they appear in the
//! IR itself: `dt` is a constant inside each model's expressions.
//!
//! Convention `nir` (NIR's documented semantics, input x held constant over a step):
//! - LI / LIF: τ v̇ = (v_leak − v) + R·x. Exact: v ← β v + (1 − β)(v_leak + R x) with
//!   β = exp(−dt/τ); forward Euler: the same form with β = 1 − dt/τ.
//! - I / IF: v̇ = R·x, so v ← v + dt·R·x (both schemes agree).
//! - CubaLI / CubaLIF: τ_syn İ = −I + w_in·x, τ_mem v̇ = (v_leak − v) + R·I. Euler evaluates
//!   both derivatives at the start of the step; exact solves the linear system over the step.
//! - Spiking types fire when v > v_threshold (strict) and then set v to v_reset in the same
//!   step. A per-channel v_reset is handled by integrating u = v − v_reset (reset to 0).
//!
//! Convention `spyx` (Spyx 1.0 `to_nir` / `from_nir`, dt = 1 by default): β = clip(1 − dt/τ);
//! the input enters unscaled (Spyx writes `r = β`, which its reader ignores); the spike of a
//! step is the previous membrane's `v > θ`, and θ is subtracted from the membrane, unscaled.
//!
//! Convention `snntorch` (snnTorch 1.0 `Leaky`, exported with dt = 1e-4): Euler as `nir`, but
//! the default subtractive reset with one step of delay: v[t] = β v[t−1] + I[t] − θ·s[t−1],
//! s[t] = v[t] > θ. (For snnTorch's `reset_mechanism="zero"`, use `nir`.)

use sparkc_ir::neuron::{Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate};
use sparkc_ir::parse_expr;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Exact solution of the linear ODE over one step with the input held constant.
    Exact,
    /// Forward Euler.
    Euler,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Exact => "exact",
            Scheme::Euler => "euler",
        }
    }

    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "exact" | "exp" | "exponential" => Some(Scheme::Exact),
            "euler" | "forward-euler" => Some(Scheme::Euler),
            _ => None,
        }
    }
}

/// Whose reading of the file to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    Nir,
    Spyx,
    Snntorch,
}

impl Convention {
    pub fn name(self) -> &'static str {
        match self {
            Convention::Nir => "nir",
            Convention::Spyx => "spyx",
            Convention::Snntorch => "snntorch",
        }
    }

    pub fn parse(s: &str) -> Option<Convention> {
        match s {
            "nir" => Some(Convention::Nir),
            "spyx" => Some(Convention::Spyx),
            "snntorch" => Some(Convention::Snntorch),
            _ => None,
        }
    }

    /// The step size the convention's framework uses when none is given.
    pub fn default_dt(self) -> f64 {
        match self {
            // snnTorch and the NIR → Lava bridge hard-code 1e-4.
            Convention::Nir | Convention::Snntorch => 1e-4,
            Convention::Spyx => 1.0,
        }
    }

    pub fn default_scheme(self) -> Scheme {
        Scheme::Euler
    }
}

/// The full discretisation of an import or export.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Discretisation {
    pub dt: f64,
    pub scheme: Scheme,
    pub convention: Convention,
}

impl Discretisation {
    /// `dt` and `scheme` where given, else the convention's defaults.
    pub fn new(convention: Convention, dt: Option<f64>, scheme: Option<Scheme>) -> Result<Discretisation, String> {
        let dt = dt.unwrap_or(convention.default_dt());
        if !(dt.is_finite() && dt > 0.0) {
            return Err(format!("dt must be a positive number, got {dt}"));
        }
        let scheme = scheme.unwrap_or(convention.default_scheme());
        if convention != Convention::Nir && scheme != Scheme::Euler {
            return Err(format!("the {} convention is defined for forward Euler only", convention.name()));
        }
        Ok(Discretisation { dt, scheme, convention })
    }
}

impl Default for Discretisation {
    fn default() -> Self {
        Discretisation { dt: Convention::Nir.default_dt(), scheme: Scheme::Euler, convention: Convention::Nir }
    }
}

impl fmt::Display for Discretisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Exact => "exact exponential",
            Scheme::Euler => "forward Euler",
        };
        write!(f, "{scheme}, dt = {:?}, convention {}", self.dt, self.convention.name())
    }
}

/// The NIR neuron types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeuronKind {
    I,
    IF,
    LI,
    LIF,
    CubaLI,
    CubaLIF,
}

impl NeuronKind {
    pub fn name(self) -> &'static str {
        match self {
            NeuronKind::I => "I",
            NeuronKind::IF => "IF",
            NeuronKind::LI => "LI",
            NeuronKind::LIF => "LIF",
            NeuronKind::CubaLI => "CubaLI",
            NeuronKind::CubaLIF => "CubaLIF",
        }
    }

    pub fn spiking(self) -> bool {
        matches!(self, NeuronKind::IF | NeuronKind::LIF | NeuronKind::CubaLIF)
    }
}

/// How the reset potential enters the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResetForm {
    /// Every channel resets to this value.
    Uniform(f64),
    /// Channels reset to different values: integrate u = v − v_reset, reset u to 0.
    PerChannel,
}

/// A discrete neuron model and how to wire it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteNeuron {
    pub model: NeuronModel,
    /// NIR field of each model parameter, in operand order.
    pub fields: Vec<&'static str>,
    /// The output the scan emits: `spike` for spiking types, the membrane `v` otherwise.
    pub emit: &'static str,
}

/// A membrane that never fires: for the non-spiking types, whose model still needs a fire step.
const NEVER: &str = "3.0e38";

fn bind(name: &str, src: &str) -> Result<Binding, String> {
    Ok(Binding { name: name.to_string(), expr: parse_expr(src).map_err(|e| format!("internal expression `{src}`: {e}"))? })
}

fn c(x: f64) -> String {
    // `{:?}` keeps full precision and always reads back as a float.
    format!("({x:?})")
}

struct Spec {
    name: String,
    fields: Vec<&'static str>,
    state: Vec<&'static str>,
    lets: Vec<(&'static str, String)>,
    charge: Vec<(&'static str, String)>,
    membrane: &'static str,
    threshold: String,
    reset: Reset,
    outputs: Vec<(&'static str, String)>,
    emit: &'static str,
}

fn build(spec: Spec) -> Result<DiscreteNeuron, String> {
    let model = NeuronModel {
        name: spec.name,
        params: spec.fields.iter().map(|f| f.to_string()).collect(),
        inputs: vec!["x".into()],
        state: spec.state.iter().map(|s| StateVar { name: s.to_string(), init: 0.0 }).collect(),
        lets: spec.lets.iter().map(|(n, e)| bind(n, e)).collect::<Result<_, _>>()?,
        charge: spec.charge.iter().map(|(n, e)| bind(n, e)).collect::<Result<_, _>>()?,
        membrane: spec.membrane.into(),
        threshold: parse_expr(&spec.threshold).map_err(|e| e.to_string())?,
        fire: FireCmp::Gt,
        reset: spec.reset,
        detach_reset: false,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: spec.outputs.iter().map(|(n, e)| bind(n, e)).collect::<Result<_, _>>()?,
    };
    model.validate().map_err(|e| e.to_string())?;
    Ok(DiscreteNeuron { model, fields: spec.fields, emit: spec.emit })
}

/// The IR neuron model of a NIR neuron type under a discretisation.
pub fn neuron_model(kind: NeuronKind, d: &Discretisation, reset: ResetForm) -> Result<DiscreteNeuron, String> {
    match d.convention {
        Convention::Nir => nir_model(kind, d, reset),
        Convention::Spyx => spyx_model(kind, d),
        Convention::Snntorch => snntorch_model(kind, d),
    }
}

fn nir_model(kind: NeuronKind, d: &Discretisation, reset: ResetForm) -> Result<DiscreteNeuron, String> {
    let dt = c(d.dt);
    let decay = |tau: &str| match d.scheme {
        Scheme::Exact => format!("exp(-{dt} / {tau})"),
        Scheme::Euler => format!("1.0 - {dt} / {tau}"),
    };
    let per_channel = reset == ResetForm::PerChannel && kind.spiking();
    // In the per-channel form the state is u = v − v_reset, so v_leak and θ shift by v_reset.
    let (m, leak, theta) = if per_channel { ("u", "(v_leak - v_reset)", "v_threshold - v_reset") } else { ("v", "v_leak", "v_threshold") };
    let reset_mode = match (kind.spiking(), reset, per_channel) {
        (false, _, _) => Reset::None,
        (true, _, true) => Reset::ToValue(0.0),
        (true, ResetForm::Uniform(c), false) => Reset::ToValue(c),
        (true, ResetForm::PerChannel, false) => Reset::ToValue(0.0),
    };
    let mut fields: Vec<&'static str> = match kind {
        NeuronKind::I => vec!["r"],
        NeuronKind::IF => vec!["r", "v_threshold"],
        NeuronKind::LI => vec!["tau", "r", "v_leak"],
        NeuronKind::LIF => vec!["tau", "r", "v_leak", "v_threshold"],
        NeuronKind::CubaLI => vec!["tau_syn", "tau_mem", "r", "v_leak", "w_in"],
        NeuronKind::CubaLIF => vec!["tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "w_in"],
    };
    if per_channel {
        fields.push("v_reset");
    }
    let mut lets: Vec<(&'static str, String)> = Vec::new();
    let mut charge: Vec<(&'static str, String)> = Vec::new();
    let state: Vec<&'static str>;
    match kind {
        NeuronKind::I | NeuronKind::IF => {
            state = vec![m];
            charge.push((m, format!("{m} + {dt} * r * x")));
        }
        NeuronKind::LI | NeuronKind::LIF => {
            state = vec![m];
            lets.push(("beta", decay("tau")));
            charge.push((m, format!("beta * {m} + (1.0 - beta) * ({leak} + r * x)")));
        }
        NeuronKind::CubaLI | NeuronKind::CubaLIF => {
            state = vec![m, "i"];
            // The membrane is updated first so that it reads the current of the step's start.
            match d.scheme {
                Scheme::Euler => {
                    lets.push(("a_mem", format!("{dt} / tau_mem")));
                    lets.push(("a_syn", format!("{dt} / tau_syn")));
                    charge.push((m, format!("{m} + a_mem * ({leak} - {m} + r * i)")));
                    charge.push(("i", "i + a_syn * (w_in * x - i)".into()));
                }
                Scheme::Exact => {
                    lets.push(("e_syn", decay("tau_syn")));
                    lets.push(("e_mem", decay("tau_mem")));
                    lets.push(("i_inf", "w_in * x".into()));
                    lets.push(("v_inf", format!("{leak} + r * i_inf")));
                    // κ = τs (e_syn − e_mem) / (τs − τm), with its limit (dt/τ) e^(−dt/τ) when
                    // the two time constants (nearly) coincide.
                    lets.push(("near", "1.0e-4 * tau_mem >= abs(tau_syn - tau_mem)".into()));
                    lets.push((
                        "kappa",
                        format!("(1.0 - near) * tau_syn * (e_syn - e_mem) / (tau_syn - tau_mem + near) + near * ({dt} / tau_mem) * e_mem"),
                    ));
                    charge.push((m, format!("v_inf + ({m} - v_inf) * e_mem + r * (i - i_inf) * kappa")));
                    charge.push(("i", "i_inf + (i - i_inf) * e_syn".into()));
                }
            }
        }
    }
    let v_out = if per_channel { "u + v_reset".to_string() } else { m.to_string() };
    let (threshold, outputs, emit) = if kind.spiking() {
        (theta.to_string(), vec![("spike", "z".to_string()), ("v", v_out)], "spike")
    } else {
        (NEVER.to_string(), vec![("v", v_out)], "v")
    };
    let suffix = if per_channel { "_vreset" } else { "" };
    build(Spec {
        name: format!("nir_{}_{}{suffix}", kind.name().to_lowercase(), d.scheme.name()),
        fields,
        state,
        lets,
        charge,
        membrane: m,
        threshold,
        reset: reset_mode,
        outputs,
        emit,
    })
}

/// Fields, state, lets, charge and emitted output of a Spyx neuron.
type SpyxParts = (Vec<&'static str>, Vec<&'static str>, Vec<(&'static str, String)>, Vec<(&'static str, String)>, &'static str);

fn spyx_model(kind: NeuronKind, d: &Discretisation) -> Result<DiscreteNeuron, String> {
    let dt = c(d.dt);
    let clip = |tau: &str| format!("min(max(1.0 - {dt} / {tau}, 0.0), 1.0)");
    let (fields, state, lets, charge, emit): SpyxParts = match kind {
        NeuronKind::LIF => (
            vec!["tau", "v_threshold"],
            vec!["v"],
            vec![("beta", clip("tau")), ("s", "v > v_threshold".into())],
            vec![("v", "beta * v + x - v_threshold * s".into())],
            "spike",
        ),
        NeuronKind::IF => (vec!["v_threshold"], vec!["v"], vec![("s", "v > v_threshold".into())], vec![("v", "v + x - v_threshold * s".into())], "spike"),
        NeuronKind::CubaLIF => (
            vec!["tau_syn", "tau_mem", "v_threshold"],
            vec!["v", "i"],
            vec![("alpha", clip("tau_syn")), ("beta", clip("tau_mem")), ("s", "v > v_threshold".into())],
            vec![("i", "alpha * i + x".into()), ("v", "beta * (v - v_threshold * s) + i".into())],
            "spike",
        ),
        NeuronKind::LI => (vec!["tau"], vec!["v"], vec![("beta", clip("tau"))], vec![("v", "beta * v + x".into())], "v"),
        other => return Err(format!("the spyx convention defines LIF, IF, CubaLIF and LI, not {}", other.name())),
    };
    let (threshold, outputs) = if emit == "spike" {
        // The spike is the previous membrane's comparison `s`; the model's own fire step is
        // unused (no reset), the subtraction happens in the charge.
        ("v_threshold".to_string(), vec![("spike", "s".to_string()), ("v", "v".to_string())])
    } else {
        (NEVER.to_string(), vec![("v", "v".to_string())])
    };
    build(Spec {
        name: format!("spyx_{}", kind.name().to_lowercase()),
        fields,
        state,
        lets,
        charge,
        membrane: "v",
        threshold,
        reset: Reset::None,
        outputs,
        emit,
    })
}

fn snntorch_model(kind: NeuronKind, d: &Discretisation) -> Result<DiscreteNeuron, String> {
    if kind != NeuronKind::LIF {
        return Err(format!("the snntorch convention defines LIF (snn.Leaky) only, not {}; use the nir convention", kind.name()));
    }
    let dt = c(d.dt);
    build(Spec {
        name: "snntorch_lif".into(),
        fields: vec!["tau", "r", "v_leak", "v_threshold"],
        state: vec!["v"],
        lets: vec![("a", format!("{dt} / tau")), ("s", "v > v_threshold".into())],
        charge: vec![("v", "(1.0 - a) * v + a * (v_leak + r * x) - v_threshold * s".into())],
        membrane: "v",
        threshold: "v_threshold".into(),
        reset: Reset::None,
        outputs: vec![("spike", "z".into()), ("v", "v".into())],
        emit: "spike",
    })
}

/// The discrete decay factor β of a membrane with time constant τ (for reports and export).
pub fn decay(scheme: Scheme, dt: f64, tau: f64) -> f64 {
    match scheme {
        Scheme::Exact => (-dt / tau).exp(),
        Scheme::Euler => 1.0 - dt / tau,
    }
}

/// The time constant τ whose decay over dt is β: the inverse of [`decay`].
pub fn tau_from_decay(scheme: Scheme, dt: f64, beta: f64) -> Option<f64> {
    let tau = match scheme {
        Scheme::Exact if beta > 0.0 && beta < 1.0 => -dt / beta.ln(),
        Scheme::Euler if beta < 1.0 => dt / (1.0 - beta),
        _ => return None,
    };
    (tau.is_finite() && tau > 0.0).then_some(tau)
}
