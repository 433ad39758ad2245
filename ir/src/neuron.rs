//! Neuron models as data.
//!
//! A neuron model is its per-channel parameters, per-step inputs, state variables and the
//! expressions of one time step: charge (state updates), a threshold, the fire comparison, the
//! reset, named outputs, and the surrogate that stands in for the fire step's derivative.
//! Backends and the autodiff pass generate their kernels from this description; adding a model
//! never touches a backend.

use crate::expr::{parse_expr, Expr};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// How the membrane compares with the threshold to fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FireCmp {
    /// z = 1 if v >= θ (Heaviside(0) = 1), as in NeuronSpark.
    Ge,
    /// z = 1 if v > θ.
    Gt,
}

/// What happens to the membrane after a spike.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reset {
    /// v ← v − θ·z (soft reset).
    Subtract,
    /// v ← z ? value : v (hard reset).
    ToValue(f64),
    /// No reset (a leaky integrator).
    None,
}

/// Surrogate derivative of the fire step, ∂z/∂x with x = v − θ.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum SurrogateKind {
    /// α·σ(αx)·(1 − σ(αx)) (spikingjelly `Sigmoid`), exponent clamped at 88.
    Sigmoid,
    /// (α/2) / (1 + (π/2·α·x)²) (spikingjelly `ATan`).
    Atan,
    /// max(0, α·(1 − α·|x|)): a triangle of height α and half-width 1/α.
    Triangle,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Surrogate {
    pub kind: SurrogateKind,
    pub alpha: f64,
}

impl Surrogate {
    pub fn sigmoid(alpha: f64) -> Surrogate {
        Surrogate { kind: SurrogateKind::Sigmoid, alpha }
    }

    /// The surrogate derivative as an expression of `x`.
    pub fn derivative_expr(&self, x: Expr) -> Expr {
        let a = self.alpha;
        match self.kind {
            SurrogateKind::Sigmoid => {
                // σ = 1 / (1 + exp(min(−αx, 88)))
                let s = Expr::bin(
                    crate::BinOp::Div,
                    Expr::c(1.0),
                    Expr::bin(
                        crate::BinOp::Add,
                        Expr::c(1.0),
                        Expr::un(
                            crate::UnOp::Exp,
                            Expr::bin(
                                crate::BinOp::Min,
                                Expr::bin(crate::BinOp::Mul, Expr::c(-a), x),
                                Expr::c(88.0),
                            ),
                        ),
                    ),
                );
                Expr::bin(
                    crate::BinOp::Mul,
                    Expr::bin(crate::BinOp::Mul, Expr::c(a), s.clone()),
                    Expr::bin(crate::BinOp::Sub, Expr::c(1.0), s),
                )
            }
            SurrogateKind::Atan => {
                let k = std::f64::consts::FRAC_PI_2 * a;
                let kx = Expr::bin(crate::BinOp::Mul, Expr::c(k), x);
                Expr::bin(
                    crate::BinOp::Div,
                    Expr::c(a / 2.0),
                    Expr::bin(crate::BinOp::Add, Expr::c(1.0), Expr::bin(crate::BinOp::Mul, kx.clone(), kx)),
                )
            }
            SurrogateKind::Triangle => Expr::bin(
                crate::BinOp::Max,
                Expr::c(0.0),
                Expr::bin(
                    crate::BinOp::Mul,
                    Expr::c(a),
                    Expr::bin(
                        crate::BinOp::Sub,
                        Expr::c(1.0),
                        Expr::bin(crate::BinOp::Mul, Expr::c(a), Expr::un(crate::UnOp::Abs, x)),
                    ),
                ),
            ),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            SurrogateKind::Sigmoid => "sigmoid",
            SurrogateKind::Atan => "atan",
            SurrogateKind::Triangle => "triangle",
        }
    }
}

/// A named expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    pub expr: Expr,
}

/// A state variable and the value it starts from at a sequence start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateVar {
    pub name: String,
    pub init: f64,
}

/// The name under which a model's expressions read the spike of the current step.
pub const SPIKE: &str = "z";

/// A neuron model. One step, per column:
/// 1. `lets` are evaluated in order (they may read params, inputs and the previous state);
/// 2. `charge` updates the state variables in order (each may read the ones updated before);
/// 3. z = cmp(`membrane`, `threshold`);
/// 4. the reset rewrites `membrane`;
/// 5. `outputs` are evaluated (they may read everything above and `z`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeuronModel {
    pub name: String,
    /// Per-channel parameters, shape [C].
    pub params: Vec<String>,
    /// Per-step inputs, shape [B, T, K, C].
    pub inputs: Vec<String>,
    pub state: Vec<StateVar>,
    pub lets: Vec<Binding>,
    pub charge: Vec<Binding>,
    /// The state variable that fires and is reset.
    pub membrane: String,
    pub threshold: Expr,
    pub fire: FireCmp,
    pub reset: Reset,
    /// The backward treats the spike in the reset as a constant (NeuronSpark: spec §8).
    pub detach_reset: bool,
    pub surrogate: Surrogate,
    pub outputs: Vec<Binding>,
}

/// What is wrong with a neuron model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("neuron model `{model}`: {msg}")]
pub struct NeuronError {
    pub model: String,
    pub msg: String,
}

impl NeuronModel {
    pub fn output(&self, name: &str) -> Option<&Binding> {
        self.outputs.iter().find(|o| o.name == name)
    }

    pub fn state_index(&self, name: &str) -> Option<usize> {
        self.state.iter().position(|s| s.name == name)
    }

    /// Check that every expression reads only names defined before it and that names are unique.
    pub fn validate(&self) -> Result<(), NeuronError> {
        let err = |msg: String| NeuronError { model: self.name.clone(), msg };
        let mut defined: BTreeSet<String> = BTreeSet::new();
        let declare = |n: &str, defined: &mut BTreeSet<String>| -> Result<(), NeuronError> {
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(format!("bad name `{n}`")));
            }
            if !defined.insert(n.to_string()) {
                return Err(err(format!("name `{n}` is defined twice")));
            }
            Ok(())
        };
        for n in self.params.iter().chain(&self.inputs) {
            declare(n, &mut defined)?;
        }
        for s in &self.state {
            declare(&s.name, &mut defined)?;
        }
        if self.state.is_empty() {
            return Err(err("a neuron needs at least one state variable".into()));
        }
        if self.state_index(&self.membrane).is_none() {
            return Err(err(format!("membrane `{}` is not a state variable", self.membrane)));
        }
        let check = |e: &Expr, what: &str, defined: &BTreeSet<String>| -> Result<(), NeuronError> {
            for v in e.vars() {
                if !defined.contains(&v) {
                    return Err(NeuronError {
                        model: self.name.clone(),
                        msg: format!("{what} reads `{v}`, which is not defined before it"),
                    });
                }
            }
            Ok(())
        };
        for b in &self.lets {
            check(&b.expr, &format!("let `{}`", b.name), &defined)?;
            declare(&b.name, &mut defined)?;
        }
        for b in &self.charge {
            check(&b.expr, &format!("charge of `{}`", b.name), &defined)?;
            if self.state_index(&b.name).is_none() {
                return Err(NeuronError {
                    model: self.name.clone(),
                    msg: format!("charge assigns `{}`, which is not a state variable", b.name),
                });
            }
        }
        check(&self.threshold, "threshold", &defined)?;
        if defined.contains(SPIKE) {
            return Err(err(format!("`{SPIKE}` is reserved for the spike")));
        }
        defined.insert(SPIKE.to_string());
        let mut out_names = BTreeSet::new();
        for b in &self.outputs {
            check(&b.expr, &format!("output `{}`", b.name), &defined)?;
            if !out_names.insert(b.name.clone()) {
                return Err(err(format!("output `{}` is defined twice", b.name)));
            }
        }
        if self.outputs.is_empty() {
            return Err(err("a neuron needs at least one output".into()));
        }
        Ok(())
    }
}

fn e(src: &str) -> Expr {
    parse_expr(src).expect("built-in neuron expression parses")
}

fn bind(name: &str, src: &str) -> Binding {
    Binding { name: name.to_string(), expr: e(src) }
}

/// The fixed-parameter PLIF of NeuronSpark (spec §3): β = sigmoid(w), input scaled by (1−β),
/// soft reset, fire on `>=`, detached reset, sigmoid surrogate α = 4. Outputs: `vpost` (V_post),
/// `leak` ((1−β)·V_post) and `spike`.
pub fn plif() -> NeuronModel {
    NeuronModel {
        name: "plif".into(),
        params: vec!["w".into(), "v_th".into()],
        inputs: vec!["x".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![bind("beta", "sigmoid(w)")],
        charge: vec![bind("v", "beta * v + (1.0 - beta) * x")],
        membrane: "v".into(),
        threshold: e("v_th"),
        fire: FireCmp::Ge,
        reset: Reset::Subtract,
        detach_reset: true,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("vpost", "v"), bind("leak", "(1.0 - beta) * v"), bind("spike", "z")],
    }
}

/// The selective PLIF of the SNNBlock (spec §4): β, u = α·I and θ arrive per step.
pub fn selective_plif() -> NeuronModel {
    NeuronModel {
        name: "selective_plif".into(),
        params: vec![],
        inputs: vec!["beta".into(), "u".into(), "theta".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![],
        charge: vec![bind("v", "beta * v + u")],
        membrane: "v".into(),
        threshold: e("theta"),
        fire: FireCmp::Ge,
        reset: Reset::Subtract,
        detach_reset: true,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("vpost", "v"), bind("spike", "z")],
    }
}

/// A plain leaky integrate-and-fire neuron with constant decay `beta` and threshold `v_th`
/// (not detached: the textbook surrogate flows through the reset).
pub fn lif() -> NeuronModel {
    NeuronModel {
        name: "lif".into(),
        params: vec!["beta".into(), "v_th".into()],
        inputs: vec!["x".into()],
        state: vec![StateVar { name: "v".into(), init: 0.0 }],
        lets: vec![],
        charge: vec![bind("v", "beta * v + x")],
        membrane: "v".into(),
        threshold: e("v_th"),
        fire: FireCmp::Ge,
        reset: Reset::Subtract,
        detach_reset: false,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![bind("spike", "z"), bind("vpost", "v")],
    }
}

/// The built-in models by name.
pub fn builtin(name: &str) -> Option<NeuronModel> {
    match name {
        "plif" => Some(plif()),
        "selective_plif" => Some(selective_plif()),
        "lif" => Some(lif()),
        _ => None,
    }
}

impl fmt::Display for NeuronModel {
    /// The text form used inside a graph (see `text`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "neuron {} {{", self.name)?;
        if !self.params.is_empty() {
            writeln!(f, "    param {}", self.params.join(", "))?;
        }
        if !self.inputs.is_empty() {
            writeln!(f, "    input {}", self.inputs.join(", "))?;
        }
        for s in &self.state {
            writeln!(f, "    state {} = {:?}", s.name, s.init)?;
        }
        for b in &self.lets {
            writeln!(f, "    let {} = {}", b.name, b.expr)?;
        }
        for b in &self.charge {
            writeln!(f, "    charge {} = {}", b.name, b.expr)?;
        }
        let cmp = match self.fire {
            FireCmp::Ge => ">=",
            FireCmp::Gt => ">",
        };
        writeln!(f, "    fire {} {} {}", self.membrane, cmp, self.threshold)?;
        match self.reset {
            Reset::Subtract => write!(f, "    reset subtract")?,
            Reset::ToValue(v) => write!(f, "    reset to {v:?}")?,
            Reset::None => write!(f, "    reset none")?,
        }
        writeln!(f, "{}", if self.detach_reset { " detached" } else { "" })?;
        writeln!(f, "    surrogate {}({:?})", self.surrogate.name(), self.surrogate.alpha)?;
        for b in &self.outputs {
            writeln!(f, "    output {} = {}", b.name, b.expr)?;
        }
        write!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_validate() {
        for m in [plif(), selective_plif(), lif()] {
            m.validate().unwrap();
        }
    }

    #[test]
    fn undefined_names_are_reported() {
        let mut m = plif();
        m.charge[0].expr = e("beta * v + y");
        let err = m.validate().unwrap_err();
        assert!(err.to_string().contains("`y`"), "{err}");
    }
}
