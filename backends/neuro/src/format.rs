//! The binary spike-program format and its validating loader.
//!
//! ```text
//! magic "SPKPROG\0" | version u32 | flags u32 (0) | payload length u64 | CRC-32 of payload u32 | payload
//! payload = sections, each: tag u32 | length u64 | bytes   (all integers little-endian)
//! ```
//! Sections: target (TOML), source IR (text), numeric format, lookup tables, buffers, groups
//! (microcode, inputs, parameters, state, outputs), synapse layers (weights source-major),
//! stages (management/host subgraphs as IR text), placement, routing tables, I/O map, host
//! parameters. The loader checks the magic, version, length and checksum, then every index
//! and length, then that the lookup tables match the numeric format and that every stage's IR
//! parses and verifies: a corrupt or mismatched file is an error, never a panic.

use crate::microcode::check_program;
use crate::program::*;
use crate::target::Target;
use sparkc_backend_cpu::kernels::fixed::{Fx, FxInstr, FxProgram, Lut, LutKind};
use sparkc_ir::{BinOp, Tensor, UnOp};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"SPKPROG\0";
pub const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot access {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a spike program (bad magic bytes)")]
    Magic,
    #[error("spike program format version {found}; this sparkc reads version {VERSION} (recompile the model)")]
    Version { found: u32 },
    #[error("spike program is truncated or has trailing bytes: header says {expected} payload bytes, file has {found}")]
    Length { expected: u64, found: u64 },
    #[error("spike program is corrupt: checksum {found:08x} does not match {expected:08x}")]
    Checksum { expected: u32, found: u32 },
    #[error("spike program is corrupt: {0}")]
    Corrupt(String),
    #[error("spike program is invalid: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------- CRC-32 (IEEE)

/// CRC-32 (IEEE 802.3). crc32fast picks a carry-less-multiply kernel at run time: the 0.9B
/// program's 0.9 GB checksum takes ~0.1 s instead of ~0.7 s with table slicing.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

// ---------------------------------------------------------------- writing

/// A segment of the serialised payload: bytes built here, or a large array borrowed from the
/// program (the weights), which is written out without being copied.
enum Seg<'a> {
    Own(Vec<u8>),
    Ref(&'a [u8]),
}

impl Seg<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Seg::Own(v) => v,
            Seg::Ref(r) => r,
        }
    }
}

#[derive(Default)]
struct W<'a> {
    done: Vec<Seg<'a>>,
    cur: Vec<u8>,
    done_len: usize,
}

impl<'a> W<'a> {
    fn u8(&mut self, v: u8) {
        self.cur.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.cur.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.cur.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.cur.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.cur.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.cur.extend_from_slice(s.as_bytes());
    }
    fn i64s(&mut self, v: &[i64]) {
        self.u64(v.len() as u64);
        for &x in v {
            self.i64(x);
        }
    }
    fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len() as u64);
        for &x in v {
            self.u32(x);
        }
    }
    fn opt(&mut self, v: Option<u32>) {
        match v {
            Some(x) => {
                self.u8(1);
                self.u32(x);
            }
            None => self.u8(0),
        }
    }
    /// A large byte array, referenced rather than copied.
    fn big(&mut self, b: &'a [u8]) {
        let cur = std::mem::take(&mut self.cur);
        self.done_len += cur.len() + b.len();
        self.done.push(Seg::Own(cur));
        self.done.push(Seg::Ref(b));
    }
    fn len(&self) -> usize {
        self.done_len + self.cur.len()
    }
    /// Start a section: its tag and a length that `end` fills in.
    fn begin(&mut self, tag: u32) -> (usize, usize, usize) {
        self.u32(tag);
        let at = (self.done.len(), self.cur.len());
        self.u64(0);
        (at.0, at.1, self.len())
    }
    fn end(&mut self, (seg, off, start): (usize, usize, usize)) {
        let len = ((self.len() - start) as u64).to_le_bytes();
        let buf = if seg == self.done.len() {
            &mut self.cur
        } else {
            match &mut self.done[seg] {
                Seg::Own(v) => v,
                Seg::Ref(_) => unreachable!("length fields are written into owned segments"),
            }
        };
        buf[off..off + 8].copy_from_slice(&len);
    }
    fn finish(mut self) -> Vec<Seg<'a>> {
        let cur = std::mem::take(&mut self.cur);
        self.done.push(Seg::Own(cur));
        self.done
    }
}

const S_TARGET: u32 = 1;
const S_IR: u32 = 2;
const S_META: u32 = 3;
const S_LUTS: u32 = 4;
const S_BUFFERS: u32 = 5;
const S_GROUPS: u32 = 6;
const S_SYNAPSES: u32 = 7;
const S_STAGES: u32 = 8;
const S_PLACEMENT: u32 = 9;
const S_ROUTES: u32 = 10;
const S_IO: u32 = 11;
const S_PARAMS: u32 = 12;
const SECTIONS: [u32; 12] = [S_TARGET, S_IR, S_META, S_LUTS, S_BUFFERS, S_GROUPS, S_SYNAPSES, S_STAGES, S_PLACEMENT, S_ROUTES, S_IO, S_PARAMS];

fn unop_code(op: UnOp) -> u8 {
    UnOp::ALL.iter().position(|&o| o == op).expect("listed") as u8
}

fn binop_code(op: BinOp) -> u8 {
    BinOp::ALL.iter().position(|&o| o == op).expect("listed") as u8
}

fn write_microcode(w: &mut W, p: &FxProgram) {
    w.u16(p.n_regs);
    w.u64(p.consts.len() as u64);
    for &(r, v) in &p.consts {
        w.u16(r);
        w.i64(v);
    }
    w.u64(p.instrs.len() as u64);
    for ins in &p.instrs {
        let (tag, op, regs) = match *ins {
            FxInstr::Un { op, dst, a } => (0u8, unop_code(op), [dst, a, 0, 0]),
            FxInstr::Bin { op, dst, a, b } => (1, binop_code(op), [dst, a, b, 0]),
            FxInstr::Select { dst, cond, a, b } => (2, 0, [dst, cond, a, b]),
        };
        w.u8(tag);
        w.u8(op);
        for r in regs {
            w.u16(r);
        }
    }
}

/// The payload of a program as segments.
fn payload(p: &SpikeProgram) -> Vec<Seg<'_>> {
    let mut s = W::default();
    let at = s.begin(S_TARGET);
    s.str(&p.target.to_toml());
    s.end(at);
    let at = s.begin(S_IR);
    s.str(&p.source_ir);
    s.end(at);
    let at = s.begin(S_META);
    s.u32(p.fx.frac);
    s.u32(p.fx.bits);
    s.u32(p.frames_per_token);
    s.end(at);
    let at = s.begin(S_LUTS);
    s.u64(p.luts.len() as u64);
    for (k, l) in &p.luts {
        s.u8(k.code());
        s.i64(l.lo);
        s.u32(l.shift);
        s.i64s(&l.values);
    }
    s.end(at);
    let at = s.begin(S_BUFFERS);
    s.u64(p.buffers.len() as u64);
    for b in &p.buffers {
        s.str(&b.name);
        s.u8(match b.ty {
            BufferType::F32 => 0,
            BufferType::I64 => 1,
        });
    }
    s.end(at);
    let at = s.begin(S_GROUPS);
    s.u64(p.groups.len() as u64);
    for g in &p.groups {
        s.str(&g.name);
        s.u32(g.channels);
        s.u8(match g.rate {
            Rate::Frame => 0,
            Rate::Token => 1,
        });
        write_microcode(&mut s, &g.microcode);
        s.u64(g.inputs.len() as u64);
        for i in &g.inputs {
            s.u16(i.reg);
            match i.source {
                InputSource::Dendrite { synapse } => {
                    s.u8(0);
                    s.u32(synapse);
                }
                InputSource::Injection { buffer } => {
                    s.u8(1);
                    s.u32(buffer);
                }
            }
        }
        s.u64(g.params.len() as u64);
        for prm in &g.params {
            s.str(&prm.name);
            s.u16(prm.reg);
            s.i64s(&prm.values);
        }
        s.u64(g.state.len() as u64);
        for st in &g.state {
            s.str(&st.name);
            s.u16(st.reg);
            s.u16(st.next);
            match st.init {
                StateInit::Buffer(b) => {
                    s.u8(0);
                    s.u32(b);
                }
                StateInit::Const(v) => {
                    s.u8(1);
                    s.i64(v);
                }
            }
            s.u8(st.token_reset as u8);
            s.i64(st.reset_value);
            s.opt(st.export);
        }
        s.u64(g.outputs.len() as u64);
        for o in &g.outputs {
            s.str(&o.name);
            s.u16(o.reg);
            s.u32(o.bits);
            s.u32(o.shift);
            s.i64s(&o.mult);
            s.u32s(&o.synapses);
            s.opt(o.buffer);
        }
    }
    s.end(at);
    let at = s.begin(S_SYNAPSES);
    s.u64(p.synapses.len() as u64);
    for sy in &p.synapses {
        s.str(&sy.name);
        match sy.source {
            SynapseSource::Group { group, output } => {
                s.u8(0);
                s.u32(group);
                s.u32(output);
            }
            SynapseSource::Buffer(b) => {
                s.u8(1);
                s.u32(b);
            }
        }
        for v in [sy.payload_bits, sy.dest_group, sy.dest_input, sy.inputs, sy.outputs, sy.weight_bits] {
            s.u32(v);
        }
        match &sy.weights {
            Weights::I8(v) => {
                s.u8(1);
                s.u64(v.len() as u64);
                s.big(bytemuck::cast_slice(v));
            }
            Weights::I16(v) if cfg!(target_endian = "little") => {
                s.u8(2);
                s.u64(v.len() as u64);
                s.big(bytemuck::cast_slice(v));
            }
            Weights::I16(v) => {
                s.u8(2);
                s.u64(v.len() as u64);
                for &x in v {
                    s.cur.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        s.i64s(&sy.mult);
        s.u32(sy.shift);
        s.i64s(&sy.bias);
        s.u32(sy.bits);
    }
    s.end(at);
    let at = s.begin(S_STAGES);
    s.u64(p.stages.len() as u64);
    for st in &p.stages {
        s.str(&st.name);
        match &st.kind {
            StageKind::Neuro { groups } => {
                s.u8(0);
                s.u32s(groups);
            }
            StageKind::Management { chip } => {
                s.u8(1);
                s.u32(*chip);
            }
            StageKind::Host => s.u8(2),
        }
        s.str(&st.ir);
        s.u32s(&st.inputs);
        s.u32s(&st.outputs);
    }
    s.end(at);
    let at = s.begin(S_PLACEMENT);
    let pl = &p.placement;
    s.u32(pl.chips);
    s.u64(pl.cores.len() as u64);
    for c in &pl.cores {
        for v in [c.chip, c.index, c.group, c.lo, c.hi, c.part] {
            s.u32(v);
        }
        s.u64(c.synapse_bits);
    }
    s.u64(pl.groups.len() as u64);
    for g in &pl.groups {
        s.u32(g.neurons_per_core);
        s.u32(g.parts);
        s.u32s(&g.cores);
    }
    s.end(at);
    let at = s.begin(S_ROUTES);
    s.u64(p.routes.len() as u64);
    for r in &p.routes {
        s.u32(r.synapse);
        s.opt(r.src_core);
        s.u64(r.dst.len() as u64);
        for h in &r.dst {
            for v in [h.core, h.east_west, h.north_south, h.chip_hops] {
                s.u32(v);
            }
        }
    }
    s.end(at);
    let at = s.begin(S_IO);
    for list in [&p.inputs, &p.outputs] {
        s.u64(list.len() as u64);
        for (name, b) in list {
            s.str(name);
            s.u32(*b);
        }
    }
    s.end(at);
    let at = s.begin(S_PARAMS);
    s.u64(p.host_params.len() as u64);
    for (name, t) in &p.host_params {
        s.str(name);
        s.u64(t.shape.len() as u64);
        for &d in &t.shape {
            s.u64(d as u64);
        }
        match t.as_f32() {
            // Borrowed, not copied: the embedding table is the largest host parameter.
            Some(v) if cfg!(target_endian = "little") => s.big(bytemuck::cast_slice(v)),
            _ => {
                for x in t.to_f32_vec() {
                    s.cur.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    s.end(at);

    s.finish()
}

fn header(segs: &[Seg]) -> [u8; HEADER] {
    let len: u64 = segs.iter().map(|x| x.bytes().len() as u64).sum();
    let mut hasher = crc32fast::Hasher::new();
    segs.iter().for_each(|x| hasher.update(x.bytes()));
    let crc = hasher.finalize();
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Serialise a program.
pub fn to_bytes(p: &SpikeProgram) -> Vec<u8> {
    let segs = payload(p);
    let mut out = header(&segs).to_vec();
    for x in &segs {
        out.extend_from_slice(x.bytes());
    }
    out
}

/// Write a program (streamed: the weights are not copied into one buffer first).
pub fn write_program(path: &Path, p: &SpikeProgram) -> Result<(), FormatError> {
    use std::io::Write;
    let io = |source| FormatError::Io { path: path.display().to_string(), source };
    let segs = payload(p);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    f.write_all(&header(&segs)).map_err(io)?;
    for x in &segs {
        f.write_all(x.bytes()).map_err(io)?;
    }
    f.flush().map_err(io)
}

// ---------------------------------------------------------------- reading

struct R<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.b.len() - self.pos {
            return Err(FormatError::Corrupt(format!("{} section ends early (needs {n} more bytes at offset {})", self.what, self.pos)));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, FormatError> {
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(FormatError::Corrupt(format!("{} section claims {n} items but has {left} bytes left", self.what)));
        }
        Ok(n as usize)
    }
    fn str(&mut self) -> Result<String, FormatError> {
        let n = self.count(1)?;
        let what = self.what;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FormatError::Corrupt(format!("{what} section holds text that is not UTF-8")))
    }
    fn i64s(&mut self) -> Result<Vec<i64>, FormatError> {
        let n = self.count(8)?;
        (0..n).map(|_| self.i64()).collect()
    }
    fn u32s(&mut self) -> Result<Vec<u32>, FormatError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn opt(&mut self) -> Result<Option<u32>, FormatError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            t => Err(FormatError::Corrupt(format!("{} section: bad option tag {t}", self.what))),
        }
    }
    fn done(&self) -> Result<(), FormatError> {
        if self.pos != self.b.len() {
            return Err(FormatError::Corrupt(format!("{} section has {} unread bytes", self.what, self.b.len() - self.pos)));
        }
        Ok(())
    }
}

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

fn read_microcode(r: &mut R) -> Result<FxProgram, FormatError> {
    let n_regs = r.u16()?;
    let nc = r.count(10)?;
    let consts = (0..nc).map(|_| Ok((r.u16()?, r.i64()?))).collect::<Result<Vec<_>, FormatError>>()?;
    let ni = r.count(10)?;
    let mut instrs = Vec::with_capacity(ni);
    for _ in 0..ni {
        let (tag, op) = (r.u8()?, r.u8()?);
        let regs = [r.u16()?, r.u16()?, r.u16()?, r.u16()?];
        instrs.push(match tag {
            0 => FxInstr::Un { op: *UnOp::ALL.get(op as usize).ok_or_else(|| corrupt(format!("unknown unary op code {op}")))?, dst: regs[0], a: regs[1] },
            1 => FxInstr::Bin { op: *BinOp::ALL.get(op as usize).ok_or_else(|| corrupt(format!("unknown binary op code {op}")))?, dst: regs[0], a: regs[1], b: regs[2] },
            2 => FxInstr::Select { dst: regs[0], cond: regs[1], a: regs[2], b: regs[3] },
            t => return Err(corrupt(format!("unknown instruction tag {t}"))),
        });
    }
    Ok(FxProgram { instrs, consts, n_regs })
}

/// Parse and validate a program from bytes.
pub fn from_bytes(bytes: &[u8]) -> Result<SpikeProgram, FormatError> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    if bytes.len() < HEADER {
        return Err(FormatError::Length { expected: 0, found: bytes.len() as u64 });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(FormatError::Corrupt(format!("unknown header flags {flags:#x}")));
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(FormatError::Length { expected: len, found: payload.len() as u64 });
    }
    let found = crc32(payload);
    if found != crc {
        return Err(FormatError::Checksum { expected: crc, found });
    }
    // Sections, each exactly once, in order.
    let mut top = R { b: payload, pos: 0, what: "program" };
    let mut sec: BTreeMap<u32, &[u8]> = BTreeMap::new();
    while top.pos < payload.len() {
        let tag = top.u32()?;
        let n = top.u64()?;
        if n > (payload.len() - top.pos) as u64 {
            return Err(corrupt(format!("section {tag} is longer than the file")));
        }
        let body = top.take(n as usize)?;
        if !SECTIONS.contains(&tag) {
            return Err(corrupt(format!("unknown section tag {tag}")));
        }
        if sec.insert(tag, body).is_some() {
            return Err(corrupt(format!("section {tag} appears twice")));
        }
    }
    let get = |tag: u32, what: &'static str| -> Result<R, FormatError> {
        sec.get(&tag).map(|b| R { b, pos: 0, what }).ok_or_else(|| corrupt(format!("the {what} section is missing")))
    };

    let mut r = get(S_TARGET, "target")?;
    let toml_text = r.str()?;
    r.done()?;
    let target = Target::from_toml(&toml_text, "(embedded in the program)").map_err(|e| FormatError::Invalid(e.to_string()))?;
    let mut r = get(S_IR, "source IR")?;
    let source_ir = r.str()?;
    r.done()?;
    let mut r = get(S_META, "meta")?;
    let (frac, bits, frames_per_token) = (r.u32()?, r.u32()?, r.u32()?);
    r.done()?;
    let mut r = get(S_LUTS, "lookup tables")?;
    let n = r.count(21)?;
    let mut luts = Vec::new();
    for _ in 0..n {
        let k = r.u8()?;
        let kind = LutKind::from_code(k).ok_or_else(|| corrupt(format!("unknown lookup table {k}")))?;
        let lut = Lut { lo: r.i64()?, shift: r.u32()?, values: r.i64s()? };
        luts.push((kind, lut));
    }
    r.done()?;
    let mut r = get(S_BUFFERS, "buffers")?;
    let n = r.count(9)?;
    let mut buffers = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let ty = match r.u8()? {
            0 => BufferType::F32,
            1 => BufferType::I64,
            t => return Err(corrupt(format!("buffer `{name}`: unknown type {t}"))),
        };
        buffers.push(Buffer { name, ty });
    }
    r.done()?;
    let mut r = get(S_GROUPS, "groups")?;
    let n = r.count(8)?;
    let mut groups = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let channels = r.u32()?;
        let rate = match r.u8()? {
            0 => Rate::Frame,
            1 => Rate::Token,
            t => return Err(corrupt(format!("group `{name}`: unknown rate {t}"))),
        };
        let microcode = read_microcode(&mut r)?;
        let ni = r.count(7)?;
        let mut inputs = Vec::new();
        for _ in 0..ni {
            let reg = r.u16()?;
            let source = match r.u8()? {
                0 => InputSource::Dendrite { synapse: r.u32()? },
                1 => InputSource::Injection { buffer: r.u32()? },
                t => return Err(corrupt(format!("group `{name}`: unknown input kind {t}"))),
            };
            inputs.push(GroupInput { reg, source });
        }
        let np = r.count(18)?;
        let mut params = Vec::new();
        for _ in 0..np {
            params.push(GroupParam { name: r.str()?, reg: r.u16()?, values: r.i64s()? });
        }
        let ns = r.count(23)?;
        let mut state = Vec::new();
        for _ in 0..ns {
            let sname = r.str()?;
            let (reg, next) = (r.u16()?, r.u16()?);
            let init = match r.u8()? {
                0 => StateInit::Buffer(r.u32()?),
                1 => StateInit::Const(r.i64()?),
                t => return Err(corrupt(format!("state `{sname}`: unknown initial value kind {t}"))),
            };
            let token_reset = match r.u8()? {
                0 => false,
                1 => true,
                t => return Err(corrupt(format!("state `{sname}`: bad flag {t}"))),
            };
            state.push(StateSlot { name: sname, reg, next, init, token_reset, reset_value: r.i64()?, export: r.opt()? });
        }
        let no = r.count(35)?;
        let mut outputs = Vec::new();
        for _ in 0..no {
            outputs.push(GroupOutput { name: r.str()?, reg: r.u16()?, bits: r.u32()?, shift: r.u32()?, mult: r.i64s()?, synapses: r.u32s()?, buffer: r.opt()? });
        }
        groups.push(Group { name, channels, rate, microcode, inputs, params, state, outputs });
    }
    r.done()?;
    let mut r = get(S_SYNAPSES, "synapses")?;
    let n = r.count(40)?;
    let mut synapses = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let source = match r.u8()? {
            0 => SynapseSource::Group { group: r.u32()?, output: r.u32()? },
            1 => SynapseSource::Buffer(r.u32()?),
            t => return Err(corrupt(format!("synapse layer `{name}`: unknown source kind {t}"))),
        };
        let (payload_bits, dest_group, dest_input, inputs, outputs, weight_bits) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let weights = match r.u8()? {
            1 => {
                let k = r.count(1)?;
                Weights::I8(bytemuck::cast_slice::<u8, i8>(r.take(k)?).to_vec())
            }
            2 => {
                let k = r.count(2)?;
                Weights::I16((0..k).map(|_| r.u16().map(|v| v as i16)).collect::<Result<_, _>>()?)
            }
            t => return Err(corrupt(format!("synapse layer `{name}`: unknown weight encoding {t}"))),
        };
        let mult = r.i64s()?;
        let shift = r.u32()?;
        let bias = r.i64s()?;
        let bits = r.u32()?;
        synapses.push(SynapseLayer { name, source, payload_bits, dest_group, dest_input, inputs, outputs, weight_bits, weights, mult, shift, bias, bits });
    }
    r.done()?;
    let mut r = get(S_STAGES, "stages")?;
    let n = r.count(26)?;
    let mut stages = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let kind = match r.u8()? {
            0 => StageKind::Neuro { groups: r.u32s()? },
            1 => StageKind::Management { chip: r.u32()? },
            2 => StageKind::Host,
            t => return Err(corrupt(format!("stage `{name}`: unknown kind {t}"))),
        };
        stages.push(Stage { name, kind, ir: r.str()?, inputs: r.u32s()?, outputs: r.u32s()? });
    }
    r.done()?;
    let mut r = get(S_PLACEMENT, "placement")?;
    let chips = r.u32()?;
    let nc = r.count(32)?;
    let mut cores = Vec::new();
    for _ in 0..nc {
        cores.push(CoreAlloc { chip: r.u32()?, index: r.u32()?, group: r.u32()?, lo: r.u32()?, hi: r.u32()?, part: r.u32()?, synapse_bits: r.u64()? });
    }
    let ng = r.count(16)?;
    let mut gp = Vec::new();
    for _ in 0..ng {
        gp.push(GroupPlacement { neurons_per_core: r.u32()?, parts: r.u32()?, cores: r.u32s()? });
    }
    r.done()?;
    let placement = Placement { chips, cores, groups: gp };
    let mut r = get(S_ROUTES, "routes")?;
    let n = r.count(13)?;
    let mut routes = Vec::new();
    for _ in 0..n {
        let synapse = r.u32()?;
        let src_core = r.opt()?;
        let k = r.count(16)?;
        let dst = (0..k).map(|_| Ok(Hop { core: r.u32()?, east_west: r.u32()?, north_south: r.u32()?, chip_hops: r.u32()? })).collect::<Result<_, FormatError>>()?;
        routes.push(Route { synapse, src_core, dst });
    }
    r.done()?;
    let mut r = get(S_IO, "I/O map")?;
    let mut io = Vec::new();
    for _ in 0..2 {
        let k = r.count(12)?;
        io.push((0..k).map(|_| Ok((r.str()?, r.u32()?))).collect::<Result<Vec<_>, FormatError>>()?);
    }
    r.done()?;
    let outputs = io.pop().expect("two lists");
    let inputs = io.pop().expect("two lists");
    let mut r = get(S_PARAMS, "parameters")?;
    let n = r.count(16)?;
    let mut host_params = BTreeMap::new();
    for _ in 0..n {
        let name = r.str()?;
        let rank = r.count(8)?;
        let shape: Vec<usize> = (0..rank).map(|_| r.u64().map(|d| d as usize)).collect::<Result<_, _>>()?;
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| corrupt(format!("parameter `{name}` has an impossible shape")))?;
        let bytes = r.take(numel.checked_mul(4).ok_or_else(|| corrupt(format!("parameter `{name}` is too large")))?)?;
        let data: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        host_params.insert(name, Tensor::f32(shape, data));
    }
    r.done()?;
    let p = SpikeProgram {
        target,
        source_ir,
        fx: Fx::new(frac, bits),
        frames_per_token,
        luts,
        buffers,
        groups,
        synapses,
        stages,
        placement,
        routes,
        inputs,
        outputs,
        host_params,
    };
    validate(&p)?;
    Ok(p)
}

pub fn read_program(path: &Path) -> Result<SpikeProgram, FormatError> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io { path: path.display().to_string(), source })?;
    from_bytes(&bytes)
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Invalid(msg.into())
}

/// Cross-check every index and size of a program.
pub fn validate(p: &SpikeProgram) -> Result<(), FormatError> {
    let fx = p.fx;
    if !(2..=48).contains(&fx.bits) || fx.frac > 40 {
        return Err(invalid(format!("fixed-point format bits={} frac={} is out of range", fx.bits, fx.frac)));
    }
    // The numbers that size the simulation must agree with the source IR.
    let source = sparkc_ir::text::parse(&p.source_ir).map_err(|e| invalid(format!("source IR: {e}")))?;
    let k = source.dims.get("K").copied().unwrap_or(1);
    if p.frames_per_token as u64 != k {
        return Err(invalid(format!("frames per token {} does not match the source IR's K = {k}", p.frames_per_token)));
    }
    let nb = p.buffers.len() as u32;
    let buf = |b: u32, what: &str| if b < nb { Ok(()) } else { Err(invalid(format!("{what} names buffer {b}; there are {nb}"))) };
    let mut names = BTreeSet::new();
    for b in &p.buffers {
        if !names.insert(&b.name) {
            return Err(invalid(format!("buffer `{}` is declared twice", b.name)));
        }
    }
    let mut lut_kinds = BTreeSet::new();
    for (k, l) in &p.luts {
        if *l != Lut::build(*k, fx) {
            return Err(invalid(format!("lookup table `{}` does not match the fixed-point format frac={} bits={}", k.name(), fx.frac, fx.bits)));
        }
        lut_kinds.insert(*k);
    }
    let (ng, ns) = (p.groups.len() as u32, p.synapses.len() as u32);
    let check_bits = |bits: u32, shift: u32, what: &str| {
        if !(1..=48).contains(&bits) || shift > 62 {
            return Err(invalid(format!("{what}: bits={bits} shift={shift} out of range")));
        }
        Ok(())
    };
    for g in &p.groups {
        let w = |m: String| invalid(format!("group `{}`: {m}", g.name));
        let c = g.channels as usize;
        if c == 0 {
            return Err(w("has no neurons".into()));
        }
        let nr = g.microcode.n_regs;
        let reg = |r: u16, what: &str| if r < nr { Ok(()) } else { Err(w(format!("{what} register r{r} is outside the {nr} registers"))) };
        let mut pre = Vec::new();
        for i in &g.inputs {
            reg(i.reg, "input")?;
            pre.push(i.reg);
            match i.source {
                InputSource::Dendrite { synapse } if synapse >= ns => return Err(w(format!("reads synapse layer {synapse}; there are {ns}"))),
                InputSource::Injection { buffer } => buf(buffer, &format!("group `{}`", g.name))?,
                _ => {}
            }
        }
        for prm in &g.params {
            reg(prm.reg, "parameter")?;
            pre.push(prm.reg);
            if prm.values.len() != c {
                return Err(w(format!("parameter `{}` has {} values for {c} neurons", prm.name, prm.values.len())));
            }
        }
        for s in &g.state {
            reg(s.reg, "state")?;
            reg(s.next, "state")?;
            pre.push(s.reg);
            if let StateInit::Buffer(b) = s.init {
                buf(b, &format!("state `{}`", s.name))?;
            }
            if let Some(b) = s.export {
                buf(b, &format!("state `{}`", s.name))?;
            }
        }
        check_program(&g.microcode, &pre).map_err(|e| w(format!("microcode: {e}")))?;
        for k in g.microcode.luts_used() {
            if !lut_kinds.contains(&k) {
                return Err(w(format!("microcode reads lookup table `{}`, which the program does not hold", k.name())));
            }
        }
        for o in &g.outputs {
            reg(o.reg, "output")?;
            if o.bits > 32 {
                return Err(w(format!("output `{}` has {}-bit payloads; at most 32", o.name, o.bits)));
            }
            check_bits(o.bits, o.shift, &format!("group `{}` output `{}`", g.name, o.name))?;
            if o.mult.len() != c {
                return Err(w(format!("output `{}` has {} multipliers for {c} neurons", o.name, o.mult.len())));
            }
            for &s in &o.synapses {
                if s >= ns {
                    return Err(w(format!("output `{}` feeds synapse layer {s}; there are {ns}", o.name)));
                }
            }
            if let Some(b) = o.buffer {
                buf(b, &format!("group `{}` output", g.name))?;
            }
        }
    }
    for (si, s) in p.synapses.iter().enumerate() {
        let w = |m: String| invalid(format!("synapse layer `{}`: {m}", s.name));
        if s.dest_group >= ng {
            return Err(w(format!("feeds group {}; there are {ng}", s.dest_group)));
        }
        let dest = &p.groups[s.dest_group as usize];
        if dest.inputs.get(s.dest_input as usize).map(|i| &i.source) != Some(&InputSource::Dendrite { synapse: si as u32 }) {
            return Err(w(format!("input {} of group `{}` is not this layer's dendrite", s.dest_input, dest.name)));
        }
        if s.outputs != dest.channels || s.weights.len() as u64 != s.inputs as u64 * s.outputs as u64 || s.mult.len() != s.outputs as usize || s.bias.len() != s.outputs as usize {
            return Err(w(format!("sizes do not agree ({} inputs, {} outputs, {} weights, group of {})", s.inputs, s.outputs, s.weights.len(), dest.channels)));
        }
        if s.bits < 2 {
            return Err(w(format!("dendrite width {} bits is too small", s.bits)));
        }
        check_bits(s.bits, s.shift, &format!("synapse layer `{}`", s.name))?;
        match s.source {
            SynapseSource::Group { group, output } => {
                let src = p.groups.get(group as usize).ok_or_else(|| w(format!("reads group {group}; there are {ng}")))?;
                let o = src.outputs.get(output as usize).ok_or_else(|| w(format!("reads output {output} of `{}`, which has {}", src.name, src.outputs.len())))?;
                if src.channels != s.inputs || !o.synapses.contains(&(si as u32)) {
                    return Err(w(format!("does not match its source `{}`", src.name)));
                }
            }
            SynapseSource::Buffer(b) => buf(b, &format!("synapse layer `{}`", s.name))?,
        }
    }
    let mut in_stage = vec![0u32; p.groups.len()];
    for st in &p.stages {
        for &b in st.inputs.iter().chain(&st.outputs) {
            buf(b, &format!("stage `{}`", st.name))?;
        }
        match &st.kind {
            StageKind::Neuro { groups } => {
                for &g in groups {
                    *in_stage.get_mut(g as usize).ok_or_else(|| invalid(format!("stage `{}` runs group {g}; there are {ng}", st.name)))? += 1;
                }
            }
            StageKind::Management { .. } | StageKind::Host => {
                let g = sparkc_ir::text::parse(&st.ir).map_err(|e| invalid(format!("stage `{}`: {e}", st.name)))?;
                if g.dims != source.dims {
                    return Err(invalid(format!("stage `{}` fixes dims {:?}; the source IR fixes {:?}", st.name, g.dims, source.dims)));
                }
                sparkc_ir::verify::verify(&g).map_err(|e| invalid(format!("stage `{}`: {e}", st.name)))?;
                for (_, name, ty) in g.params() {
                    let t = p.host_params.get(name).ok_or_else(|| invalid(format!("stage `{}` needs parameter `{name}`, which the program does not hold", st.name)))?;
                    if t.shape.len() != ty.shape.rank() {
                        return Err(invalid(format!("parameter `{name}` is {:?}, stage `{}` declares {ty}", t.shape, st.name)));
                    }
                }
            }
        }
    }
    if let Some(g) = in_stage.iter().position(|&k| k != 1) {
        return Err(invalid(format!("group `{}` runs in {} stages (must be one)", p.groups[g].name, in_stage[g])));
    }
    let pl = &p.placement;
    if pl.groups.len() != p.groups.len() {
        return Err(invalid("placement does not cover every group"));
    }
    let cores = pl.cores.len() as u32;
    if pl.chips != cores.div_ceil(p.target.chip.cores).max(1) {
        return Err(invalid(format!("placement claims {} chips for {cores} cores of {} per chip", pl.chips, p.target.chip.cores)));
    }
    for (id, c) in pl.cores.iter().enumerate() {
        if c.chip != id as u32 / p.target.chip.cores || c.index != id as u32 % p.target.chip.cores {
            return Err(invalid(format!("core {id} is recorded at chip {} index {}", c.chip, c.index)));
        }
        let g = p.groups.get(c.group as usize).ok_or_else(|| invalid(format!("a core holds group {}; there are {ng}", c.group)))?;
        if c.lo >= c.hi || c.hi > g.channels || c.hi - c.lo > p.target.core.neurons || c.chip >= pl.chips.max(1) || c.index >= p.target.chip.cores {
            return Err(invalid(format!("a core of group `{}` has a bad range or site", g.name)));
        }
    }
    for (gi, gp) in pl.groups.iter().enumerate() {
        if gp.cores.is_empty() || gp.parts == 0 || !(gp.cores.len() as u32).is_multiple_of(gp.parts) {
            return Err(invalid(format!("group `{}` has no valid placement", p.groups[gi].name)));
        }
        // The chunks hold every neuron once, in order.
        let mut next = 0u32;
        for chunk in gp.cores.chunks(gp.parts as usize) {
            let c0 = pl.cores.get(chunk[0] as usize).ok_or_else(|| invalid(format!("group `{}` is placed on a core that does not exist", p.groups[gi].name)))?;
            if c0.lo != next || chunk.iter().any(|&c| pl.cores.get(c as usize).is_none_or(|x| x.lo != c0.lo || x.hi != c0.hi)) {
                return Err(invalid(format!("the cores of group `{}` do not cover its neurons in order", p.groups[gi].name)));
            }
            next = c0.hi;
        }
        if next != p.groups[gi].channels {
            return Err(invalid(format!("the cores of group `{}` hold {next} of its {} neurons", p.groups[gi].name, p.groups[gi].channels)));
        }
        for &c in &gp.cores {
            if c >= cores || pl.cores[c as usize].group != gi as u32 {
                return Err(invalid(format!("group `{}` is placed on core {c}, which does not hold it", p.groups[gi].name)));
            }
        }
    }
    for r in &p.routes {
        if r.synapse >= ns || r.src_core.is_some_and(|c| c >= cores) || r.dst.iter().any(|h| h.core >= cores) {
            return Err(invalid("a route names a synapse layer or core that does not exist"));
        }
    }
    for (name, b) in p.inputs.iter().chain(&p.outputs) {
        buf(*b, &format!("graph input/output `{name}`"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(super::crc32(b""), 0);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Byte-at-a-time reference.
        let mut c = !0u32;
        for &b in &long {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        assert_eq!(super::crc32(&long), !c);
    }
}
