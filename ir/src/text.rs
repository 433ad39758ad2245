//! The text form of a graph: a printer and a parser that round-trip.
//!
//! ```text
//! graph tiny {
//!   dim K = 4
//!   neuron plif { ... }
//!   %0 = input{name="input_ids"}() : i64[B,T]
//!   %3, %4 = scan{neuron=plif, emit=[leak], scope=sequence}(%1, %2, %5, %6) : f32[B,T,K,64], f32[B,64] @"layers.0.input_neuron1"
//!   %7 = recompute map{expr=`x0 * 2.0`}(%3) : f32[B,T,K,64] @"layers.0.double.recompute"
//!   output "logits" = %40
//! }
//! ```

use crate::error::IrError;
use crate::expr::parse_expr;
use crate::graph::{Graph, Node, Port, Value};
use crate::neuron::{Binding, FireCmp, NeuronModel, Reset, StateVar, Surrogate, SurrogateKind};
use crate::op::{Attr, Op};
use crate::types::{DType, Dim, Shape, ValueType};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn fmt_attr(a: &Attr) -> String {
    match a {
        Attr::Int(i) => i.to_string(),
        // `{:?}` prints NaN as `NaN`, which would read back as a name.
        Attr::Float(f) if f.is_nan() => "nan".to_string(),
        Attr::Float(f) => {
            let s = format!("{f:?}");
            // Keep floats recognisable as floats.
            if s.contains(['.', 'e', 'i', 'n']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        Attr::Str(s) => quote(s),
        Attr::Ident(s) => s.clone(),
        Attr::List(items) => format!("[{}]", items.iter().map(fmt_attr).collect::<Vec<_>>().join(", ")),
        Attr::Expr(e) => format!("`{e}`"),
    }
}

/// Print a graph in its text form (values numbered in topological order).
pub fn print(graph: &Graph) -> Result<String, IrError> {
    let order = graph.topo_order()?;
    let mut names: HashMap<Value, String> = HashMap::new();
    let mut next = 0usize;
    let mut out = String::new();
    // A name that is not an identifier is quoted, so that the text parses back.
    let is_ident = !graph.name.is_empty() && graph.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    let name = if is_ident { graph.name.clone() } else { quote(&graph.name) };
    writeln!(out, "graph {name} {{").expect("write to String");
    for (sym, size) in &graph.dims {
        writeln!(out, "  dim {sym} = {size}").expect("write to String");
    }
    for model in graph.neurons.values() {
        for line in model.to_string().lines() {
            writeln!(out, "  {line}").expect("write to String");
        }
    }
    for n in order {
        let node = &graph.g[n];
        let results: Vec<String> = (0..node.results.len() as u32)
            .map(|port| {
                let name = format!("%{next}");
                next += 1;
                names.insert(Value { node: n, port }, name.clone());
                name
            })
            .collect();
        let operands: Vec<String> = graph
            .operands(n)
            .iter()
            .map(|v| names.get(v).cloned().ok_or_else(|| IrError::Graph(format!("operand of `{}` not yet defined", node.name))))
            .collect::<Result<_, _>>()?;
        let attrs = node.op.attrs();
        let attr_text = if attrs.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", attrs.iter().map(|(k, a)| format!("{k}={}", fmt_attr(a))).collect::<Vec<_>>().join(", "))
        };
        let types: Vec<String> = node.results.iter().map(|t| t.to_string()).collect();
        let label = match &node.op {
            Op::Input { name } | Op::Param { name } if *name == node.name => String::new(),
            _ if node.name.is_empty() => String::new(),
            _ => format!(" @{}", quote(&node.name)),
        };
        writeln!(
            out,
            "  {} = {}{}{}({}) : {}{}",
            results.join(", "),
            if node.recompute { "recompute " } else { "" },
            node.op.name(),
            attr_text,
            operands.join(", "),
            types.join(", "),
            label
        )
        .expect("write to String");
    }
    for (name, v) in &graph.outputs {
        let val = names.get(v).ok_or_else(|| IrError::Graph(format!("output `{name}` names a missing value")))?;
        writeln!(out, "  output {} = {val}", quote(name)).expect("write to String");
    }
    out.push_str("}\n");
    Ok(out)
}

// ------------------------------------------------------------------- parser

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

/// How deeply attribute lists may nest (`[[...]]`); the parser recurses on them.
const MAX_ATTR_DEPTH: usize = 16;

impl<'a> Cursor<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, IrError> {
        Err(IrError::Parse { line: self.line, msg: msg.into() })
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn ws(&mut self) {
        let t = self.rest().trim_start();
        self.pos = self.s.len() - t.len();
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> Result<(), IrError> {
        if self.eat(tok) {
            Ok(())
        } else {
            let got: String = self.rest().chars().take(20).collect();
            self.err(format!("expected `{tok}`, found `{got}`"))
        }
    }

    fn ident(&mut self) -> Result<String, IrError> {
        self.ws();
        let r = self.rest();
        let len = r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(r.len());
        if len == 0 {
            let got: String = r.chars().take(20).collect();
            return self.err(format!("expected a name, found `{got}`"));
        }
        self.pos += len;
        Ok(r[..len].to_string())
    }

    fn string(&mut self) -> Result<String, IrError> {
        self.ws();
        if !self.rest().starts_with('"') {
            return self.err("expected a quoted string");
        }
        let mut out = String::new();
        let mut chars = self.rest()[1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 2;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }

    fn value_ref(&mut self) -> Result<String, IrError> {
        self.expect("%")?;
        let name = self.ident()?;
        Ok(format!("%{name}"))
    }

    fn number_text(&mut self) -> &'a str {
        self.ws();
        let r = self.rest();
        let len = r
            .char_indices()
            .find(|&(i, c)| {
                !(c.is_ascii_alphanumeric() || c == '.' || ((c == '-' || c == '+') && (i == 0 || r[..i].ends_with(['e', 'E']))))
            })
            .map(|(i, _)| i)
            .unwrap_or(r.len());
        self.pos += len;
        &r[..len]
    }

    fn attr(&mut self) -> Result<Attr, IrError> {
        self.attr_at(0)
    }

    fn attr_at(&mut self, depth: usize) -> Result<Attr, IrError> {
        if depth > MAX_ATTR_DEPTH {
            return self.err("attribute lists nested too deeply");
        }
        self.ws();
        let r = self.rest();
        if r.starts_with('"') {
            return Ok(Attr::Str(self.string()?));
        }
        if let Some(body) = r.strip_prefix('`') {
            let end = body.find('`').ok_or(()).or_else(|_| self.err("unterminated expression"))?;
            let e = parse_expr(&body[..end]).map_err(|e| IrError::Parse { line: self.line, msg: e.to_string() })?;
            self.pos += end + 2;
            return Ok(Attr::Expr(e));
        }
        if r.starts_with('[') {
            self.pos += 1;
            let mut items = Vec::new();
            if !self.eat("]") {
                loop {
                    items.push(self.attr_at(depth + 1)?);
                    if self.eat("]") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            return Ok(Attr::List(items));
        }
        if r.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            let t = self.number_text();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Attr::Int(i));
            }
            return match t.parse::<f64>() {
                Ok(f) => Ok(Attr::Float(f)),
                Err(_) => self.err(format!("bad number `{t}`")),
            };
        }
        // `inf` and `nan` stay names here (a neuron output may be called `nan`); numeric
        // attributes accept them as floats (`Op::from_parts`).
        Ok(Attr::Ident(self.ident()?))
    }

    fn value_type(&mut self) -> Result<ValueType, IrError> {
        let dt = self.ident()?;
        let dtype = DType::from_name(&dt).ok_or(()).or_else(|_| self.err(format!("unknown dtype `{dt}`")))?;
        self.expect("[")?;
        let mut dims = Vec::new();
        if !self.eat("]") {
            loop {
                self.ws();
                if self.rest().starts_with(|c: char| c.is_ascii_digit()) {
                    let t = self.number_text();
                    dims.push(Dim::Const(t.parse().or_else(|_| self.err(format!("bad dimension `{t}`")))?));
                } else {
                    dims.push(Dim::Sym(self.ident()?));
                }
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(ValueType::new(dtype, Shape(dims)))
    }

    fn at_end(&mut self) -> bool {
        self.ws();
        self.rest().is_empty()
    }
}

/// Parse the text form produced by [`print`]. The result is verified.
pub fn parse(src: &str) -> Result<Graph, IrError> {
    let mut lines = src.lines().enumerate().map(|(i, l)| (i + 1, strip_comment(l).trim())).filter(|(_, l)| !l.is_empty());
    let (first_no, first) = lines.next().ok_or(IrError::Parse { line: 1, msg: "empty input".into() })?;
    let mut c = Cursor { s: first, pos: 0, line: first_no };
    c.expect("graph")?;
    c.ws();
    let name = if c.rest().starts_with('"') { c.string()? } else { c.ident()? };
    c.expect("{")?;
    if !c.at_end() {
        return c.err("unexpected text after `{`");
    }
    let mut graph = Graph::new(&name);
    let mut values: HashMap<String, Value> = HashMap::new();
    let mut closed = false;
    while let Some((no, line)) = lines.next() {
        let mut c = Cursor { s: line, pos: 0, line: no };
        if line == "}" {
            closed = true;
            break;
        }
        if c.eat("dim ") {
            let sym = c.ident()?;
            c.expect("=")?;
            let t = c.number_text();
            let size: u64 = t.parse().or_else(|_| c.err(format!("bad size `{t}`")))?;
            if !c.at_end() {
                return c.err(format!("unexpected text after `dim {sym} = {size}`"));
            }
            graph.bind_dim(&sym, size);
        } else if c.eat("neuron ") {
            let model_name = c.ident()?;
            c.expect("{")?;
            if !c.at_end() {
                return c.err(format!("unexpected text after `neuron {model_name} {{`"));
            }
            let mut body = Vec::new();
            loop {
                let (bno, bline) = lines.next().ok_or(IrError::Parse { line: no, msg: format!("neuron `{model_name}` is not closed") })?;
                if bline == "}" {
                    break;
                }
                body.push((bno, bline));
            }
            let model = parse_neuron(&model_name, &body)?;
            graph.add_neuron(model).map_err(|e| IrError::Parse { line: no, msg: e.to_string() })?;
        } else if c.eat("output ") {
            let out_name = c.string()?;
            c.expect("=")?;
            let r = c.value_ref()?;
            let v = *values.get(&r).ok_or(()).or_else(|_| c.err(format!("unknown value `{r}`")))?;
            if !c.at_end() {
                return c.err("unexpected text after output");
            }
            if graph.output(&out_name).is_some() {
                return c.err(format!("output `{out_name}` is defined twice"));
            }
            graph.set_output(&out_name, v);
        } else {
            parse_node(&mut c, &mut graph, &mut values)?;
        }
    }
    if !closed {
        return Err(IrError::Parse { line: src.lines().count(), msg: "missing closing `}` of the graph".into() });
    }
    if let Some((no, _)) = lines.next() {
        return Err(IrError::Parse { line: no, msg: "text after the end of the graph".into() });
    }
    crate::verify::verify(&graph)?;
    Ok(graph)
}

fn strip_comment(line: &str) -> &str {
    // `//` outside strings and expressions starts a comment.
    let mut in_str = false;
    let mut in_expr = false;
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' if !in_expr => in_str = !in_str,
            b'`' if !in_str => in_expr = !in_expr,
            b'/' if !in_str && !in_expr && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn parse_node(c: &mut Cursor, graph: &mut Graph, values: &mut HashMap<String, Value>) -> Result<(), IrError> {
    let mut results = vec![c.value_ref()?];
    while c.eat(",") {
        results.push(c.value_ref()?);
    }
    c.expect("=")?;
    let recompute = c.eat("recompute ");
    let op_name = c.ident()?;
    let mut attrs = BTreeMap::new();
    if c.eat("{") && !c.eat("}") {
        loop {
            let k = c.ident()?;
            c.expect("=")?;
            let a = c.attr()?;
            if attrs.insert(k.clone(), a).is_some() {
                return c.err(format!("attribute `{k}` given twice"));
            }
            if c.eat("}") {
                break;
            }
            c.expect(",")?;
        }
    }
    let op = Op::from_parts(&op_name, &attrs).or_else(|m| c.err(m))?;
    c.expect("(")?;
    let mut operands = Vec::new();
    if !c.eat(")") {
        loop {
            let r = c.value_ref()?;
            let v = *values.get(&r).ok_or(()).or_else(|_| c.err(format!("`{op_name}` uses `{r}` before it is defined")))?;
            operands.push(v);
            if c.eat(")") {
                break;
            }
            c.expect(",")?;
        }
    }
    c.expect(":")?;
    let mut types = vec![c.value_type()?];
    while c.eat(",") {
        types.push(c.value_type()?);
    }
    let label = if c.eat("@") { Some(c.string()?) } else { None };
    if !c.at_end() {
        let rest: String = c.rest().chars().take(20).collect();
        return c.err(format!("unexpected `{rest}`"));
    }
    if types.len() != results.len() {
        return c.err(format!("{} results but {} types", results.len(), types.len()));
    }
    let name = label.unwrap_or_else(|| match &op {
        Op::Input { name } | Op::Param { name } => name.clone(),
        _ => String::new(),
    });
    // Types are taken as written; the verifier checks them against inference afterwards.
    let n = graph.g.add_node(Node { op, results: types, name, recompute });
    for (slot, v) in operands.iter().enumerate() {
        graph.g.add_edge(v.node, n, Port { src: v.port, dst: slot as u32 });
    }
    for (port, r) in results.into_iter().enumerate() {
        if values.insert(r.clone(), Value { node: n, port: port as u32 }).is_some() {
            return c.err(format!("value `{r}` is defined twice"));
        }
    }
    Ok(())
}

fn parse_neuron(name: &str, body: &[(usize, &str)]) -> Result<NeuronModel, IrError> {
    let mut m = NeuronModel {
        name: name.to_string(),
        params: vec![],
        inputs: vec![],
        state: vec![],
        lets: vec![],
        charge: vec![],
        membrane: String::new(),
        threshold: crate::Expr::c(0.0),
        fire: FireCmp::Ge,
        reset: Reset::Subtract,
        detach_reset: false,
        surrogate: Surrogate::sigmoid(4.0),
        outputs: vec![],
    };
    let mut seen_fire = false;
    for &(no, line) in body {
        let err = |msg: String| IrError::Parse { line: no, msg: format!("neuron `{name}`: {msg}") };
        let expr = |src: &str| parse_expr(src.trim()).map_err(|e| err(e.to_string()));
        let (kw, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let binding = |rest: &str| -> Result<Binding, IrError> {
            let (n, e) = rest.split_once('=').ok_or_else(|| err(format!("expected `name = expression`, got `{rest}`")))?;
            Ok(Binding { name: n.trim().to_string(), expr: expr(e)? })
        };
        let list = |rest: &str| rest.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>();
        match kw {
            "param" => m.params.extend(list(rest)),
            "input" => m.inputs.extend(list(rest)),
            "state" => {
                let (n, v) = rest.split_once('=').ok_or_else(|| err("expected `state name = value`".into()))?;
                let init = v.trim().parse::<f64>().map_err(|_| err(format!("bad initial value `{}`", v.trim())))?;
                m.state.push(StateVar { name: n.trim().to_string(), init });
            }
            "let" => m.lets.push(binding(rest)?),
            "charge" => m.charge.push(binding(rest)?),
            "output" => m.outputs.push(binding(rest)?),
            "fire" => {
                let (mem, tail) = rest.split_once(' ').ok_or_else(|| err("expected `fire v >= threshold`".into()))?;
                let tail = tail.trim_start();
                let (cmp, thr) = if let Some(t) = tail.strip_prefix(">=") {
                    (FireCmp::Ge, t)
                } else if let Some(t) = tail.strip_prefix('>') {
                    (FireCmp::Gt, t)
                } else {
                    return Err(err(format!("expected `>=` or `>` after `{mem}`")));
                };
                m.membrane = mem.to_string();
                m.fire = cmp;
                m.threshold = expr(thr)?;
                seen_fire = true;
            }
            "reset" => {
                let (mode, detached) = match rest.strip_suffix("detached") {
                    Some(r) => (r.trim(), true),
                    None => (rest, false),
                };
                m.detach_reset = detached;
                m.reset = if mode == "subtract" {
                    Reset::Subtract
                } else if mode == "none" {
                    Reset::None
                } else if let Some(v) = mode.strip_prefix("to ") {
                    Reset::ToValue(v.trim().parse().map_err(|_| err(format!("bad reset value `{v}`")))?)
                } else {
                    return Err(err(format!("unknown reset `{mode}`")));
                };
            }
            "surrogate" => {
                let (kind, arg) = rest.split_once('(').ok_or_else(|| err("expected `surrogate kind(alpha)`".into()))?;
                let alpha = arg
                    .trim_end_matches(')')
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| err(format!("bad surrogate parameter `{arg}`")))?;
                let kind = match kind.trim() {
                    "sigmoid" => SurrogateKind::Sigmoid,
                    "atan" => SurrogateKind::Atan,
                    "triangle" => SurrogateKind::Triangle,
                    k => return Err(err(format!("unknown surrogate `{k}`"))),
                };
                m.surrogate = Surrogate { kind, alpha };
            }
            other => return Err(err(format!("unknown line `{other}`"))),
        }
    }
    if !seen_fire {
        return Err(IrError::Parse { line: body.first().map_or(0, |b| b.0), msg: format!("neuron `{name}` has no `fire` line") });
    }
    Ok(m)
}
