//! Scalar expressions: the language in which neuron models and element-wise ops are written.
//!
//! An expression is evaluated per element. Backends compile it (CPU bytecode, CUDA C, chip
//! microcode) and the autodiff pass differentiates it symbolically with [`Expr::diff`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnOp {
    Neg,
    Abs,
    Sign,
    Exp,
    Log,
    Log1p,
    Sqrt,
    Tanh,
    Atan,
    Sigmoid,
    /// ln(1 + e^x), and exactly x above 20 (PyTorch's threshold).
    Softplus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    /// 1.0 if a >= b else 0.0.
    Ge,
    /// 1.0 if a > b else 0.0.
    Gt,
}

impl UnOp {
    pub const ALL: [UnOp; 11] = [
        UnOp::Neg,
        UnOp::Abs,
        UnOp::Sign,
        UnOp::Exp,
        UnOp::Log,
        UnOp::Log1p,
        UnOp::Sqrt,
        UnOp::Tanh,
        UnOp::Atan,
        UnOp::Sigmoid,
        UnOp::Softplus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnOp::Neg => "neg",
            UnOp::Abs => "abs",
            UnOp::Sign => "sign",
            UnOp::Exp => "exp",
            UnOp::Log => "log",
            UnOp::Log1p => "log1p",
            UnOp::Sqrt => "sqrt",
            UnOp::Tanh => "tanh",
            UnOp::Atan => "atan",
            UnOp::Sigmoid => "sigmoid",
            UnOp::Softplus => "softplus",
        }
    }

    pub fn from_name(s: &str) -> Option<UnOp> {
        UnOp::ALL.into_iter().find(|u| u.name() == s)
    }

    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnOp::Neg => -x,
            UnOp::Abs => x.abs(),
            UnOp::Sign => sign(x),
            UnOp::Exp => x.exp(),
            UnOp::Log => x.ln(),
            UnOp::Log1p => x.ln_1p(),
            UnOp::Sqrt => x.sqrt(),
            UnOp::Tanh => x.tanh(),
            UnOp::Atan => x.atan(),
            UnOp::Sigmoid => sigmoid(x),
            UnOp::Softplus => softplus(x),
        }
    }
}

impl BinOp {
    pub const ALL: [BinOp; 8] =
        [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Min, BinOp::Max, BinOp::Ge, BinOp::Gt];

    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Min => a.min(b),
            BinOp::Max => a.max(b),
            BinOp::Ge => (a >= b) as u8 as f64,
            BinOp::Gt => (a > b) as u8 as f64,
        }
    }

    fn infix(self) -> Option<(&'static str, u8)> {
        match self {
            BinOp::Ge => Some((">=", 1)),
            BinOp::Gt => Some((">", 1)),
            BinOp::Add => Some(("+", 2)),
            BinOp::Sub => Some(("-", 2)),
            BinOp::Mul => Some(("*", 3)),
            BinOp::Div => Some(("/", 3)),
            BinOp::Min | BinOp::Max => None,
        }
    }

    pub fn call_name(self) -> Option<&'static str> {
        match self {
            BinOp::Min => Some("min"),
            BinOp::Max => Some("max"),
            _ => None,
        }
    }
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// A scalar expression over named variables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    Var(String),
    Const(f64),
    Un(UnOp, Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn var(name: &str) -> Expr {
        Expr::Var(name.to_string())
    }

    pub fn c(v: f64) -> Expr {
        Expr::Const(v)
    }

    pub fn un(op: UnOp, a: Expr) -> Expr {
        Expr::Un(op, Box::new(a))
    }

    pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }

    /// Evaluate with `lookup` giving each variable's value.
    pub fn eval(&self, lookup: &dyn Fn(&str) -> f64) -> f64 {
        match self {
            Expr::Var(v) => lookup(v),
            Expr::Const(c) => *c,
            Expr::Un(op, a) => op.apply(a.eval(lookup)),
            Expr::Bin(op, a, b) => op.apply(a.eval(lookup), b.eval(lookup)),
        }
    }

    /// Every variable the expression reads.
    pub fn vars(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.collect_vars(&mut out);
        out
    }

    fn collect_vars(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Var(v) => {
                out.insert(v.clone());
            }
            Expr::Const(_) => {}
            Expr::Un(_, a) => a.collect_vars(out),
            Expr::Bin(_, a, b) => {
                a.collect_vars(out);
                b.collect_vars(out);
            }
        }
    }

    /// Replace variables by expressions (`subst` returns `None` to keep a variable).
    pub fn substitute(&self, subst: &dyn Fn(&str) -> Option<Expr>) -> Expr {
        match self {
            Expr::Var(v) => subst(v).unwrap_or_else(|| self.clone()),
            Expr::Const(_) => self.clone(),
            Expr::Un(op, a) => Expr::un(*op, a.substitute(subst)),
            Expr::Bin(op, a, b) => Expr::bin(*op, a.substitute(subst), b.substitute(subst)),
        }
    }

    /// Number of nodes, a cost proxy.
    pub fn size(&self) -> usize {
        match self {
            Expr::Var(_) | Expr::Const(_) => 1,
            Expr::Un(_, a) => 1 + a.size(),
            Expr::Bin(_, a, b) => 1 + a.size() + b.size(),
        }
    }

    /// Symbolic partial derivative with respect to `var`. Comparisons (`>=`, `>`) and `sign`
    /// have derivative zero here; a spike's surrogate derivative is applied by the neuron model.
    pub fn diff(&self, var: &str) -> Expr {
        use BinOp::*;
        use UnOp::*;
        let d = match self {
            Expr::Var(v) => Expr::c(if v == var { 1.0 } else { 0.0 }),
            Expr::Const(_) => Expr::c(0.0),
            Expr::Un(op, a) => {
                let da = a.diff(var);
                if da == Expr::c(0.0) {
                    return Expr::c(0.0);
                }
                let a = (**a).clone();
                let local = match op {
                    Neg => Expr::c(-1.0),
                    Abs => Expr::un(Sign, a),
                    Sign => Expr::c(0.0),
                    Exp => Expr::un(Exp, a),
                    Log => Expr::bin(Div, Expr::c(1.0), a),
                    Log1p => Expr::bin(Div, Expr::c(1.0), Expr::bin(Add, Expr::c(1.0), a)),
                    Sqrt => Expr::bin(Div, Expr::c(0.5), Expr::un(Sqrt, a)),
                    Tanh => {
                        let t = Expr::un(Tanh, a);
                        Expr::bin(Sub, Expr::c(1.0), Expr::bin(Mul, t.clone(), t))
                    }
                    Atan => Expr::bin(
                        Div,
                        Expr::c(1.0),
                        Expr::bin(Add, Expr::c(1.0), Expr::bin(Mul, a.clone(), a)),
                    ),
                    Sigmoid => {
                        let s = Expr::un(Sigmoid, a);
                        Expr::bin(Mul, s.clone(), Expr::bin(Sub, Expr::c(1.0), s))
                    }
                    // d softplus = sigmoid below the threshold, exactly 1 above it.
                    Softplus => Expr::bin(
                        Add,
                        Expr::bin(Mul, Expr::bin(Gt, a.clone(), Expr::c(20.0)), Expr::c(1.0)),
                        Expr::bin(
                            Mul,
                            Expr::bin(Sub, Expr::c(1.0), Expr::bin(Gt, a.clone(), Expr::c(20.0))),
                            Expr::un(Sigmoid, a),
                        ),
                    ),
                };
                Expr::bin(Mul, local, da)
            }
            Expr::Bin(op, a, b) => {
                let (da, db) = (a.diff(var), b.diff(var));
                let (a, b) = ((**a).clone(), (**b).clone());
                match op {
                    Add => Expr::bin(Add, da, db),
                    Sub => Expr::bin(Sub, da, db),
                    Mul => Expr::bin(Add, Expr::bin(Mul, da, b.clone()), Expr::bin(Mul, a, db)),
                    Div => Expr::bin(
                        Sub,
                        Expr::bin(Div, da, b.clone()),
                        Expr::bin(Div, Expr::bin(Mul, a, db), Expr::bin(Mul, b.clone(), b)),
                    ),
                    Max | Min => {
                        let pick_a = if *op == Max {
                            Expr::bin(Ge, a, b)
                        } else {
                            Expr::bin(Ge, b, a)
                        };
                        Expr::bin(
                            Add,
                            Expr::bin(Mul, pick_a.clone(), da),
                            Expr::bin(Mul, Expr::bin(Sub, Expr::c(1.0), pick_a), db),
                        )
                    }
                    Ge | Gt => Expr::c(0.0),
                }
            }
        };
        d.simplify()
    }

    /// Constant folding and the identities x+0, x*1, x*0, x-0, x/1, --x.
    pub fn simplify(&self) -> Expr {
        use BinOp::*;
        match self {
            Expr::Var(_) | Expr::Const(_) => self.clone(),
            Expr::Un(op, a) => {
                let a = a.simplify();
                match (op, &a) {
                    (_, Expr::Const(c)) => Expr::c(op.apply(*c)),
                    (UnOp::Neg, Expr::Un(UnOp::Neg, inner)) => (**inner).clone(),
                    _ => Expr::un(*op, a),
                }
            }
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.simplify(), b.simplify());
                let zero = |e: &Expr| *e == Expr::c(0.0);
                let one = |e: &Expr| *e == Expr::c(1.0);
                match (op, &a, &b) {
                    (_, Expr::Const(x), Expr::Const(y)) => Expr::c(op.apply(*x, *y)),
                    (Add, _, _) if zero(&a) => b,
                    (Add | Sub, _, _) if zero(&b) => a,
                    (Sub, _, _) if zero(&a) => Expr::un(UnOp::Neg, b).simplify(),
                    (Mul, _, _) if zero(&a) || zero(&b) => Expr::c(0.0),
                    (Mul, _, _) if one(&a) => b,
                    (Mul | Div, _, _) if one(&b) => a,
                    (Div, _, _) if zero(&a) => Expr::c(0.0),
                    _ => Expr::bin(*op, a, b),
                }
            }
        }
    }
}

// ---------------------------------------------------------------- text form

fn fmt_const(c: f64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if c.is_nan() {
        f.write_str("nan")
    } else if c.is_infinite() {
        f.write_str(if c > 0.0 { "inf" } else { "-inf" })
    } else {
        // `{:?}` is the shortest text that parses back to the same f64.
        write!(f, "{c:?}")
    }
}

impl Expr {
    fn fmt_prec(&self, f: &mut fmt::Formatter<'_>, min_prec: u8) -> fmt::Result {
        match self {
            Expr::Var(v) => f.write_str(v),
            Expr::Const(c) => {
                // A negative literal binds like a prefix minus; bracket it where that matters.
                let wrap = c.is_sign_negative() && min_prec > 2;
                if wrap {
                    f.write_str("(")?;
                }
                fmt_const(*c, f)?;
                if wrap {
                    f.write_str(")")?;
                }
                Ok(())
            }
            Expr::Un(UnOp::Neg, a) => {
                let wrap = min_prec > 4;
                if wrap {
                    f.write_str("(")?;
                }
                f.write_str("-")?;
                // Keep `-(1.0)` distinct from the literal `-1.0`.
                if matches!(**a, Expr::Const(_)) {
                    f.write_str("(")?;
                    a.fmt_prec(f, 0)?;
                    f.write_str(")")?;
                } else {
                    a.fmt_prec(f, 5)?;
                }
                if wrap {
                    f.write_str(")")?;
                }
                Ok(())
            }
            Expr::Un(op, a) => {
                write!(f, "{}(", op.name())?;
                a.fmt_prec(f, 0)?;
                f.write_str(")")
            }
            Expr::Bin(op, a, b) => match op.infix() {
                Some((sym, prec)) => {
                    let wrap = prec < min_prec;
                    if wrap {
                        f.write_str("(")?;
                    }
                    // Left-associative: the right operand needs a strictly higher precedence.
                    a.fmt_prec(f, prec)?;
                    write!(f, " {sym} ")?;
                    b.fmt_prec(f, prec + 1)?;
                    if wrap {
                        f.write_str(")")?;
                    }
                    Ok(())
                }
                None => {
                    write!(f, "{}(", op.call_name().unwrap_or("?"))?;
                    a.fmt_prec(f, 0)?;
                    f.write_str(", ")?;
                    b.fmt_prec(f, 0)?;
                    f.write_str(")")
                }
            },
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_prec(f, 0)
    }
}

/// Error from [`parse_expr`], with the byte offset where parsing failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("expression error at column {pos}: {msg} (in `{src}`)")]
pub struct ExprError {
    pub pos: usize,
    pub msg: String,
    pub src: String,
}

/// Parse the infix text form printed by `Display`.
///
/// Nesting is bounded twice: brackets, calls and prefix minuses may nest [`MAX_DEPTH`] deep,
/// and the resulting tree (which a long flat chain like `a + b + c + ...` also deepens) at most
/// [`MAX_TREE_DEPTH`], so that the recursive walks over the tree cannot exhaust the stack.
pub fn parse_expr(src: &str) -> Result<Expr, ExprError> {
    let mut p = ExprParser { s: src.as_bytes(), pos: 0, src, depth: 0 };
    let (e, _) = p.parse_bin(0)?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(p.err("unexpected trailing text"));
    }
    Ok(e)
}

struct ExprParser<'a> {
    s: &'a [u8],
    pos: usize,
    src: &'a str,
    depth: usize,
}

/// How deeply brackets, calls and prefix minuses may nest in the text.
pub const MAX_DEPTH: usize = 200;

/// How deep a parsed expression tree may be.
pub const MAX_TREE_DEPTH: usize = 1000;

/// A parsed subexpression and the depth of its tree.
type Parsed = (Expr, usize);

impl ExprParser<'_> {
    fn err(&self, msg: &str) -> ExprError {
        ExprError { pos: self.pos, msg: msg.to_string(), src: self.src.to_string() }
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("expression nested too deeply"));
        }
        Ok(())
    }

    /// A node over children of depth `child_depth`, checked against [`MAX_TREE_DEPTH`].
    fn node(&self, e: Expr, child_depth: usize) -> Result<Parsed, ExprError> {
        let d = child_depth + 1;
        if d > MAX_TREE_DEPTH {
            return Err(self.err("expression tree too deep"));
        }
        Ok((e, d))
    }

    fn peek_op(&mut self) -> Option<(BinOp, usize, u8)> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let table: [(&[u8], BinOp, u8); 6] = [
            (b">=", BinOp::Ge, 1),
            (b">", BinOp::Gt, 1),
            (b"+", BinOp::Add, 2),
            (b"-", BinOp::Sub, 2),
            (b"*", BinOp::Mul, 3),
            (b"/", BinOp::Div, 3),
        ];
        table.iter().find(|(t, _, _)| rest.starts_with(t)).map(|(t, op, p)| (*op, t.len(), *p))
    }

    fn parse_bin(&mut self, min_prec: u8) -> Result<Parsed, ExprError> {
        self.enter()?;
        let (mut lhs, mut lhs_depth) = self.parse_prefix()?;
        while let Some((op, len, prec)) = self.peek_op() {
            if prec < min_prec || prec == 0 {
                break;
            }
            self.pos += len;
            let (rhs, rhs_depth) = self.parse_bin(prec + 1)?;
            (lhs, lhs_depth) = self.node(Expr::bin(op, lhs, rhs), lhs_depth.max(rhs_depth))?;
        }
        self.depth -= 1;
        Ok((lhs, lhs_depth))
    }

    fn parse_prefix(&mut self) -> Result<Parsed, ExprError> {
        self.skip_ws();
        let Some(&c) = self.s.get(self.pos) else {
            return Err(self.err("expected an expression"));
        };
        if c == b'-' {
            self.pos += 1;
            if self.s.get(self.pos).is_some_and(|b| b.is_ascii_digit() || *b == b'.') {
                let v = self.number()?;
                return Ok((Expr::c(-v), 1));
            }
            // `-inf` is a literal, but `-info` negates the variable `info`.
            let rest = &self.s[self.pos..];
            if rest.starts_with(b"inf") && !rest.get(3).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
                self.pos += 3;
                return Ok((Expr::c(f64::NEG_INFINITY), 1));
            }
            self.enter()?;
            let (inner, d) = self.parse_prefix_or_group()?;
            self.depth -= 1;
            return self.node(Expr::un(UnOp::Neg, inner), d);
        }
        self.parse_prefix_or_group()
    }

    fn parse_prefix_or_group(&mut self) -> Result<Parsed, ExprError> {
        self.skip_ws();
        let Some(&c) = self.s.get(self.pos) else {
            return Err(self.err("expected an expression"));
        };
        if c == b'-' {
            return self.parse_prefix();
        }
        if c == b'(' {
            self.pos += 1;
            let e = self.parse_bin(0)?;
            self.expect(b')')?;
            return Ok(e);
        }
        if c.is_ascii_digit() || c == b'.' {
            return Ok((Expr::c(self.number()?), 1));
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let name = self.ident();
            self.skip_ws();
            if self.s.get(self.pos) == Some(&b'(') {
                self.pos += 1;
                let (a, da) = self.parse_bin(0)?;
                self.skip_ws();
                if let Some(op) = UnOp::from_name(&name) {
                    self.expect(b')')?;
                    return self.node(Expr::un(op, a), da);
                }
                let op = match name.as_str() {
                    "min" => BinOp::Min,
                    "max" => BinOp::Max,
                    _ => return Err(self.err(&format!("unknown function `{name}`"))),
                };
                self.expect(b',')?;
                let (b, db) = self.parse_bin(0)?;
                self.expect(b')')?;
                return self.node(Expr::bin(op, a, b), da.max(db));
            }
            return Ok((
                match name.as_str() {
                    "inf" => Expr::c(f64::INFINITY),
                    "nan" => Expr::c(f64::NAN),
                    _ => Expr::Var(name),
                },
                1,
            ));
        }
        Err(self.err(&format!("unexpected character `{}`", c as char)))
    }

    fn expect(&mut self, b: u8) -> Result<(), ExprError> {
        self.skip_ws();
        if self.s.get(self.pos) == Some(&b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected `{}`", b as char)))
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self.pos < self.s.len() && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_') {
            self.pos += 1;
        }
        self.src[start..self.pos].to_string()
    }

    fn number(&mut self) -> Result<f64, ExprError> {
        let start = self.pos;
        while self.pos < self.s.len() {
            let b = self.s[self.pos];
            let exp_sign = (b == b'-' || b == b'+')
                && self.pos > start
                && matches!(self.s[self.pos - 1], b'e' | b'E');
            if b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E' || exp_sign {
                self.pos += 1;
            } else {
                break;
            }
        }
        self.src[start..self.pos].parse::<f64>().map_err(|_| ExprError {
            pos: start,
            msg: format!("bad number `{}`", &self.src[start..self.pos]),
            src: self.src.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses() {
        for src in [
            "(1.0 - sigmoid(w)) * x",
            "beta * v + u",
            "v - theta * z",
            "0.1 + abs(r)",
            "a - (b - c)",
            "-(1.0)",
            "-1.0 * x",
            "max(a, b) >= 2.5e-7",
            "-x / -y",
        ] {
            let e = parse_expr(src).unwrap();
            let again = parse_expr(&e.to_string()).unwrap();
            assert_eq!(e, again, "{src} -> {e}");
        }
    }

    #[test]
    fn derivative_of_leak() {
        let e = parse_expr("(1.0 - sigmoid(w)) * x").unwrap();
        let d = e.diff("x");
        let val = d.eval(&|v| if v == "w" { 0.3 } else { 2.0 });
        assert!((val - (1.0 - sigmoid(0.3))).abs() < 1e-12);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "(", "a +", "foo(1)", "1..2", "a $ b", "min(a)"] {
            assert!(parse_expr(bad).is_err(), "{bad}");
        }
    }
}
