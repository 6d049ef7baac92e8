//! A small, defensive pickle virtual machine: just enough of protocols 2-5 to read PyTorch
//! checkpoints.
//!
//! Why not `candle_core::pickle::Stack`: on hostile or merely unusual input it panics (LONG1 of
//! more than 8 bytes overflows a shift, and the legacy format's magic number *is* a 10-byte
//! LONG1), allocates whatever a length prefix claims, and deep-clones memo entries. Here every
//! length is checked against the bytes left, nesting depth is capped (so dropping a value cannot
//! overflow the stack), and total work is bounded relative to the input size (so crafted memo
//! games cannot go quadratic).
//!
//! Values are immutable `Rc` nodes shared between the stack and the memo; mutation of a container
//! on the stack (APPEND, SETITEM) is copy-on-write. Like candle (and unlike CPython) a container
//! memoised before it is filled is seen empty when fetched back — torch never relies on that.
use std::collections::HashMap;
use std::rc::Rc;

/// Deepest nesting accepted. Real checkpoints nest < 10 levels.
const MAX_DEPTH: u32 = 100;

/// A shared pickle value.
pub(crate) type V = Rc<Obj>;

/// A value with its nesting depth (leaves are 0).
#[derive(Debug, Clone)]
pub(crate) struct Obj {
    depth: u32,
    pub(crate) val: Value,
}

// Some payloads (floats, bytes, BUILD state) are never consulted by the tensor reader but are
// kept so that `Debug` output shows what a pickle really held.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64; only its little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`: REDUCE, NEWOBJ, NEWOBJ_EX.
    Call {
        callable: V,
        args: V,
    },
    /// BUILD on something that is not a dict (the state is kept, unapplied).
    Build {
        obj: V,
        state: V,
    },
    /// A persistent id (BINPERSID): torch's storage references.
    PersId(V),
}

impl Obj {
    fn leaf(val: Value) -> V {
        Rc::new(Obj { depth: 0, val })
    }
    /// A synthetic `callable(*args)` node (used to unwrap tensor-subclass rebuilds).
    pub(crate) fn call(callable: V, args: V) -> Obj {
        Obj {
            depth: callable.depth.max(args.depth) + 1,
            val: Value::Call { callable, args },
        }
    }
}

impl Value {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// Items of a tuple or list.
    pub(crate) fn as_seq(&self) -> Option<&[V]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    pub(crate) fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }
}

/// Why a pickle could not be parsed. Plain text: the caller adds the file name.
pub(crate) type PResult<T> = std::result::Result<T, String>;

/// Parses one pickle starting at `bytes[*pos]`, advancing `*pos` past its STOP opcode.
/// `work_limit` bounds the total work (opcodes plus items copied).
pub(crate) fn parse(bytes: &[u8], pos: &mut usize, work_limit: u64) -> PResult<V> {
    let mut vm = Vm {
        bytes,
        pos: *pos,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        work: 0,
        work_limit,
    };
    let out = vm.run();
    *pos = vm.pos;
    out
}

struct Vm<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    /// Stack lengths at each MARK (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
    work: u64,
    work_limit: u64,
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "pickle truncated at byte {}: need {n} more bytes, {} left",
                    self.pos,
                    self.bytes.len().saturating_sub(self.pos)
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn len_u64(&mut self) -> PResult<usize> {
        usize::try_from(u64::from_le_bytes(self.arr()?)).map_err(|_| "length overflows".into())
    }
    fn line(&mut self) -> PResult<&'a [u8]> {
        let rest = &self.bytes[self.pos.min(self.bytes.len())..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("pickle truncated at byte {}: no newline", self.pos))?;
        let line = self.take(n)?;
        self.pos += 1; // the newline, known present
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }

    fn charge(&mut self, n: usize) -> PResult<()> {
        self.work = self.work.saturating_add(n as u64);
        if self.work > self.work_limit {
            return Err("pickle too expensive to evaluate for its size (hostile input?)".into());
        }
        Ok(())
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn push(&mut self, v: V) {
        self.stack.push(v)
    }
    fn push_leaf(&mut self, val: Value) {
        self.stack.push(Obj::leaf(val))
    }
    fn pop(&mut self) -> PResult<V> {
        if self.stack.len() <= self.floor() {
            return Err(format!("pickle stack underflow at byte {}", self.pos));
        }
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> PResult<Vec<V>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle: no MARK at byte {}", self.pos))?;
        if m > self.stack.len() {
            return Err("pickle: corrupt MARK".into());
        }
        Ok(self.stack.split_off(m))
    }

    /// A new container from children, with depth checked.
    fn node<'c>(
        &mut self,
        children: impl Iterator<Item = &'c V>,
        n: usize,
        val: impl FnOnce() -> Value,
    ) -> PResult<V> {
        self.charge(n)?;
        let d = children.map(|c| c.depth).max().map_or(0, |d| d + 1);
        if d > MAX_DEPTH {
            return Err(format!("pickle nests deeper than {MAX_DEPTH}"));
        }
        Ok(Rc::new(Obj {
            depth: d,
            val: val(),
        }))
    }

    /// Mutable access to the top of the stack (copy-on-write when shared with the memo).
    fn top_mut(&mut self) -> PResult<&mut Obj> {
        if self.stack.len() <= self.floor() {
            return Err(format!("pickle stack underflow at byte {}", self.pos));
        }
        let top = self.stack.last_mut().ok_or("pickle stack underflow")?;
        if Rc::strong_count(top) > 1 || Rc::weak_count(top) > 0 {
            let n = match &top.val {
                Value::List(v) | Value::Tuple(v) => v.len(),
                Value::Dict(v) => v.len(),
                _ => 1,
            };
            self.work = self.work.saturating_add(n as u64);
            if self.work > self.work_limit {
                return Err(
                    "pickle too expensive to evaluate for its size (hostile input?)".into(),
                );
            }
        }
        let top = self.stack.last_mut().ok_or("pickle stack underflow")?;
        Ok(Rc::make_mut(top))
    }

    /// Appends items to the list (or set) on top of the stack.
    fn extend_list(&mut self, items: Vec<V>) -> PResult<()> {
        self.charge(items.len())?;
        let d = items.iter().map(|c| c.depth + 1).max().unwrap_or(0);
        let top = self.top_mut()?;
        match &mut top.val {
            Value::List(l) => l.extend(items),
            other => return Err(format!("pickle: APPEND to a non-list {}", kind(other))),
        }
        top.depth = top.depth.max(d);
        if top.depth > MAX_DEPTH {
            return Err(format!("pickle nests deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<V>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err("pickle: SETITEMS with an odd number of items".into());
        }
        self.charge(items.len())?;
        let d = items.iter().map(|c| c.depth + 1).max().unwrap_or(0);
        let top = self.top_mut()?;
        match &mut top.val {
            Value::Dict(dict) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            other => return Err(format!("pickle: SETITEM on a non-dict {}", kind(other))),
        }
        top.depth = top.depth.max(d);
        if top.depth > MAX_DEPTH {
            return Err(format!("pickle nests deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn memo_get(&self, id: u64) -> PResult<V> {
        self.memo
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("pickle: memo entry {id} missing"))
    }
    fn memo_put(&mut self, id: u64) -> PResult<()> {
        if self.stack.len() <= self.floor() {
            return Err("pickle: PUT on an empty stack".into());
        }
        let top = self
            .stack
            .last()
            .cloned()
            .ok_or("pickle: PUT on empty stack")?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn string(&mut self, n: usize, utf8: bool) -> PResult<()> {
        let raw = self.take(n)?;
        let s = if utf8 {
            std::str::from_utf8(raw)
                .map_err(|_| "pickle: invalid UTF-8 string".to_string())?
                .to_owned()
        } else {
            // Python 2 str (BINSTRING): latin-1.
            raw.iter().map(|&b| b as char).collect()
        };
        self.push_leaf(Value::Str(s));
        Ok(())
    }

    fn long(&mut self, n: usize) -> PResult<()> {
        let raw = self.take(n)?;
        if n == 0 {
            self.push_leaf(Value::Int(0));
        } else if n <= 8 {
            let neg = raw[n - 1] & 0x80 != 0;
            let mut buf = [if neg { 0xff } else { 0 }; 8];
            buf[..n].copy_from_slice(raw);
            self.push_leaf(Value::Int(i64::from_le_bytes(buf)));
        } else {
            self.push_leaf(Value::BigInt(raw.to_vec()));
        }
        Ok(())
    }

    fn call(&mut self, callable: V, args: V) -> PResult<()> {
        // OrderedDict()/dict() become a real (empty) dict so that SETITEMS can fill them.
        let v = if callable.val.is_global("collections", "OrderedDict")
            || callable.val.is_global("collections", "defaultdict")
            || callable.val.is_global("builtins", "dict")
            || callable.val.is_global("__builtin__", "dict")
        {
            Obj::leaf(Value::Dict(Vec::new()))
        } else {
            let (c, a) = (callable.clone(), args.clone());
            self.node([&callable, &args].into_iter(), 2, || Value::Call {
                callable: c,
                args: a,
            })?
        };
        self.push(v);
        Ok(())
    }

    fn run(&mut self) -> PResult<V> {
        loop {
            self.charge(1)?;
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.arr::<8>()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.pop()?;
                    self.push(v.clone());
                    self.push(v);
                }
                b'N' => self.push_leaf(Value::None),
                0x88 => self.push_leaf(Value::Bool(true)),
                0x89 => self.push_leaf(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.push_leaf(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_leaf(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.push_leaf(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    self.long(n)?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n).map_err(|_| "pickle: negative LONG4 length")?;
                    self.long(n)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.arr()?);
                    self.push_leaf(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.string(n, true)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    self.string(n, true)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    self.string(n, true)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n).map_err(|_| "pickle: negative string length")?;
                    self.string(n, false)?;
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    self.string(n, false)?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let raw = self.take(n)?.to_vec();
                    self.push_leaf(Value::Bytes(raw));
                }
                b')' => self.push_leaf(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.node(items.iter(), items.len(), || Value::Tuple(items.clone()))?;
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(format!("pickle stack underflow at byte {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.node(items.iter(), n, || Value::Tuple(items.clone()))?;
                    self.push(v);
                }
                b']' => self.push_leaf(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.node(items.iter(), items.len(), || Value::List(items.clone()))?;
                    self.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                // Sets are kept as lists: nothing in a checkpoint needs set semantics.
                0x8f => self.push_leaf(Value::List(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.node(items.iter(), items.len(), || Value::List(items.clone()))?;
                    self.push(v);
                }
                b'}' => self.push_leaf(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push_leaf(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'c' => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    self.push_leaf(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module.val, &name.val) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (module, name) = (m.clone(), n.clone());
                            self.push_leaf(Value::Global { module, name });
                        }
                        _ => return Err("pickle: STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    // BUILD on a dict sets attributes (an OrderedDict's `_metadata`), not
                    // items: keep the dict as it is.
                    let v = if matches!(obj.val, Value::Dict(_)) {
                        obj
                    } else {
                        let (o, s) = (obj.clone(), state.clone());
                        self.node([&obj, &state].into_iter(), 2, || Value::Build {
                            obj: o,
                            state: s,
                        })?
                    };
                    self.push(v);
                }
                b'Q' => {
                    let id = self.pop()?;
                    let idc = id.clone();
                    let v = self.node(std::iter::once(&id), 1, || Value::PersId(idc))?;
                    self.push(v);
                }
                b'q' => {
                    let id = self.u8()? as u64;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.u32()? as u64;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u64;
                    self.memo_put(id)?;
                }
                b'h' => {
                    let id = self.u8()? as u64;
                    let v = self.memo_get(id)?;
                    self.push(v);
                }
                b'j' => {
                    let id = self.u32()? as u64;
                    let v = self.memo_get(id)?;
                    self.push(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at}"
                    ))
                }
            }
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global { .. } => "global",
        Value::Call { .. } => "object",
        Value::Build { .. } => "object",
        Value::PersId(_) => "persistent id",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> PResult<V> {
        let mut pos = 0;
        parse(bytes, &mut pos, 1 << 20)
    }

    #[test]
    fn long1_of_ten_bytes_is_kept_as_bigint() {
        // The legacy torch magic number 0x1950a86a20f9469cfc6c.
        let b = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        let v = run(b).unwrap();
        match &v.val {
            Value::BigInt(raw) => assert_eq!(raw.len(), 10),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negative_long1_and_small_ints() {
        let v = run(b"\x80\x02\x8a\x01\xff.").unwrap();
        assert_eq!(v.val.as_int(), Some(-1));
        let v = run(b"\x80\x02M\xe9\x03.").unwrap();
        assert_eq!(v.val.as_int(), Some(1001));
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        assert!(run(b"\x80\x02X\xff\xff\xff\xff").is_err());
        assert!(run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\x7f").is_err());
    }

    #[test]
    fn deep_nesting_is_rejected() {
        // An empty list wrapped in TUPLE1 again and again.
        let mut b = b"\x80\x02]".to_vec();
        b.extend(std::iter::repeat_n(0x85, MAX_DEPTH as usize + 10));
        b.push(b'.');
        assert!(run(&b).unwrap_err().contains("deeper"));
    }

    #[test]
    fn memo_copy_games_hit_the_work_limit() {
        // A list of 1000 items, then many (PUT, APPEND) pairs: each forces a copy.
        let mut b = b"\x80\x02](".to_vec();
        b.extend(std::iter::repeat_n(b'N', 1000));
        b.push(b'e');
        for _ in 0..5000 {
            b.extend_from_slice(b"q\x00Na");
        }
        b.push(b'.');
        let mut pos = 0;
        assert!(parse(&b, &mut pos, 100_000)
            .unwrap_err()
            .contains("expensive"));
    }
}
