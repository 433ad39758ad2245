//! The adjoint of one neuron step, derived from the neuron model.
//!
//! The forward step is flattened into a straight-line tape of named scalars (lets, charges,
//! threshold, spike, reset, outputs). Reverse mode then walks the tape backwards, using
//! [`Expr::diff`] for every expression, the model's surrogate for the spike, and treating the
//! spike inside the reset as a constant when the model detaches it. Backends compile the
//! result; no backend holds a hand-written backward for any neuron type.

use crate::expr::{BinOp, Expr};
use crate::neuron::{FireCmp, NeuronModel, Reset, SPIKE};
use std::collections::BTreeMap;

/// Names under which the adjoint program reads its extra inputs.
pub fn output_grad_name(output: &str) -> String {
    format!("g_{output}")
}

pub fn state_grad_name(state: &str) -> String {
    format!("a_{state}")
}

/// One step's recompute-and-adjoint program.
///
/// It reads the model's inputs, params and (previous) state variables under their own names,
/// `g_<output>` for the upstream gradient of each emitted output at this step, and
/// `a_<state>` for the adjoint of each state variable after the step. It defines, in order,
/// `bindings`; the gradients w.r.t. inputs, params and previous state are the bindings named
/// in `input_grads`, `param_grads` and `state_grads`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdjointStep {
    pub bindings: Vec<(String, Expr)>,
    pub input_grads: Vec<String>,
    pub param_grads: Vec<String>,
    pub state_grads: Vec<String>,
}

enum Kind {
    Plain,
    /// z = cmp(membrane, threshold): differentiated through the surrogate.
    Spike { membrane: String, threshold: String },
    /// The reset: its spike operand is constant when `detach` is set.
    Reset { spike: String, detach: bool },
}

struct Entry {
    name: String,
    expr: Expr,
    kind: Kind,
}

fn rename(e: &Expr, env: &BTreeMap<String, String>) -> Expr {
    e.substitute(&|v| env.get(v).map(|n| Expr::var(n)))
}

fn sum(terms: Vec<Expr>) -> Expr {
    terms.into_iter().reduce(|a, b| Expr::bin(BinOp::Add, a, b)).unwrap_or(Expr::c(0.0)).simplify()
}

/// Derive the adjoint step of `model` for the emitted outputs `emit`.
pub fn derive(model: &NeuronModel, emit: &[String]) -> Result<AdjointStep, String> {
    model.validate().map_err(|e| e.to_string())?;
    // Forward tape with SSA names `f<i>`; `env` maps a model name to its current SSA name.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for n in model.inputs.iter().chain(&model.params) {
        env.insert(n.clone(), n.clone());
    }
    for s in &model.state {
        env.insert(s.name.clone(), s.name.clone());
    }
    let mut tape: Vec<Entry> = Vec::new();
    let push = |tape: &mut Vec<Entry>, expr: Expr, kind: Kind| -> String {
        let name = format!("f{}", tape.len());
        tape.push(Entry { name: name.clone(), expr, kind });
        name
    };
    for b in model.lets.iter().chain(&model.charge) {
        let e = rename(&b.expr, &env);
        let n = push(&mut tape, e, Kind::Plain);
        env.insert(b.name.clone(), n);
    }
    let thr = push(&mut tape, rename(&model.threshold, &env), Kind::Plain);
    let membrane = env[&model.membrane].clone();
    let cmp = match model.fire {
        FireCmp::Ge => BinOp::Ge,
        FireCmp::Gt => BinOp::Gt,
    };
    let z = push(
        &mut tape,
        Expr::bin(cmp, Expr::var(&membrane), Expr::var(&thr)),
        Kind::Spike { membrane: membrane.clone(), threshold: thr.clone() },
    );
    env.insert(SPIKE.to_string(), z.clone());
    let reset = match model.reset {
        Reset::Subtract => Some(Expr::bin(BinOp::Sub, Expr::var(&membrane), Expr::bin(BinOp::Mul, Expr::var(&thr), Expr::var(&z)))),
        Reset::ToValue(v) => Some(Expr::bin(
            BinOp::Add,
            Expr::bin(BinOp::Mul, Expr::var(&z), Expr::c(v)),
            Expr::bin(BinOp::Mul, Expr::bin(BinOp::Sub, Expr::c(1.0), Expr::var(&z)), Expr::var(&membrane)),
        )),
        Reset::None => None,
    };
    if let Some(e) = reset {
        let n = push(&mut tape, e, Kind::Reset { spike: z.clone(), detach: model.detach_reset });
        env.insert(model.membrane.clone(), n);
    }
    let mut outputs = Vec::new();
    for o in emit {
        let b = model.output(o).ok_or_else(|| format!("neuron `{}` has no output `{o}`", model.name))?;
        let n = push(&mut tape, rename(&b.expr, &env), Kind::Plain);
        outputs.push((o.clone(), n));
    }

    // Reverse sweep: each name's adjoint is the sum of its terms.
    let mut terms: BTreeMap<String, Vec<Expr>> = BTreeMap::new();
    for (o, n) in &outputs {
        terms.entry(n.clone()).or_default().push(Expr::var(&output_grad_name(o)));
    }
    for s in &model.state {
        terms.entry(env[&s.name].clone()).or_default().push(Expr::var(&state_grad_name(&s.name)));
    }
    let mut bindings: Vec<(String, Expr)> = tape.iter().map(|e| (e.name.clone(), e.expr.clone())).collect();
    for entry in tape.iter().rev() {
        let Some(ts) = terms.remove(&entry.name) else { continue };
        let adj = sum(ts);
        if adj == Expr::c(0.0) {
            continue;
        }
        let d = format!("d_{}", entry.name);
        bindings.push((d.clone(), adj));
        let dv = Expr::var(&d);
        match &entry.kind {
            Kind::Spike { membrane, threshold } => {
                let x = Expr::bin(BinOp::Sub, Expr::var(membrane), Expr::var(threshold));
                let sg = Expr::bin(BinOp::Mul, dv, model.surrogate.derivative_expr(x));
                terms.entry(membrane.clone()).or_default().push(sg.clone());
                terms.entry(threshold.clone()).or_default().push(Expr::un(crate::UnOp::Neg, sg));
            }
            kind => {
                for v in entry.expr.vars() {
                    if let Kind::Reset { spike, detach: true } = kind {
                        if &v == spike {
                            continue;
                        }
                    }
                    let local = entry.expr.diff(&v);
                    if local == Expr::c(0.0) {
                        continue;
                    }
                    terms.entry(v).or_default().push(Expr::bin(BinOp::Mul, dv.clone(), local).simplify());
                }
            }
        }
    }
    let mut grad = |name: &str, bindings: &mut Vec<(String, Expr)>| -> String {
        let g = format!("grad_{name}");
        bindings.push((g.clone(), sum(terms.remove(name).unwrap_or_default())));
        g
    };
    let input_grads = model.inputs.iter().map(|n| grad(n, &mut bindings)).collect();
    let param_grads = model.params.iter().map(|n| grad(n, &mut bindings)).collect();
    let state_grads = model.state.iter().map(|s| grad(&s.name, &mut bindings)).collect();
    Ok(AdjointStep { bindings, input_grads, param_grads, state_grads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neuron;

    /// Evaluate the adjoint program with f64 tree evaluation.
    fn run(step: &AdjointStep, vars: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
        let mut env = vars.clone();
        for (n, e) in &step.bindings {
            let v = e.eval(&|k| *env.get(k).unwrap_or_else(|| panic!("unbound {k}")));
            env.insert(n.clone(), v);
        }
        env
    }

    #[test]
    fn plif_adjoint_is_the_detached_linear_recurrence() {
        // Spec §8: with a detached reset and no spike consumer, dV_post/dV_pre = 1.
        let m = neuron::plif();
        let step = derive(&m, &["vpost".to_string()]).unwrap();
        let (w, th, x, v) = (0.3f64, 0.2, 0.9, 0.15);
        let vars: BTreeMap<String, f64> =
            [("w", w), ("v_th", th), ("x", x), ("v", v), ("g_vpost", 1.0), ("a_v", 0.5)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let out = run(&step, &vars);
        let beta = 1.0 / (1.0 + (-w).exp());
        // dL/dV_post = g + a = 1.5; dV_post/dV_pre = 1; dV_pre/dv = β.
        assert!((out["grad_v"] - 1.5 * beta).abs() < 1e-12);
        assert!((out["grad_x"] - 1.5 * (1.0 - beta)).abs() < 1e-12);
        // p = β v + (1−β) x = 0.5 v... fires (p ≥ 0.2): dθ = −G·z = −1.5.
        assert!((out["grad_v_th"] + 1.5).abs() < 1e-12);
    }
}
