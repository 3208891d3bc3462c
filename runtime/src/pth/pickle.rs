//! The subset of the pickle virtual machine that `torch.save` of a state dict uses
//! (protocols 2–4). Unknown opcodes and globals are errors.

use super::PthTensorInfo;
use crate::DType;

#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered (OrderedDict and dict alike).
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// A persistent storage reference: (dtype, key).
    Storage(DType, String),
    Tensor(PthTensorInfo),
    Mark,
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(..) => "global",
            Value::Storage(..) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
}

type R<T> = std::result::Result<T, String>;

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let s = self
            .b
            .get(self.p..self.p + n)
            .ok_or_else(|| format!("truncated at byte {}", self.p))?;
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn uint(&mut self, n: usize) -> R<u64> {
        let s = self.take(n)?;
        Ok(s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
    fn line(&mut self) -> R<String> {
        let rest = &self.b[self.p..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.p += n + 1;
        Ok(s)
    }
}

fn storage_dtype(name: &str) -> R<DType> {
    match name {
        "FloatStorage" => Ok(DType::F32),
        "BFloat16Storage" => Ok(DType::BF16),
        "HalfStorage" => Ok(DType::F16),
        _ => Err(format!(
            "storage type torch.{name} is not supported (bf16, f16, f32 are)"
        )),
    }
}

fn usizes(v: &Value, what: &str) -> R<Vec<usize>> {
    let Value::Tuple(items) = v else {
        return Err(format!("{what} is a {}, not a tuple", v.kind()));
    };
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(format!("{what} holds a non-index {}", x.kind())),
        })
        .collect()
}

/// Apply a global callable (REDUCE).
fn call(f: Value, args: Value) -> R<Value> {
    let Value::Global(module, name) = &f else {
        return Err(format!("REDUCE on a {}", f.kind()));
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") if args.len() >= 4 => {
            let Value::Storage(dtype, key) = &args[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2 on a {}, not a storage",
                    args[0].kind()
                ));
            };
            let Value::Int(offset) = args[1] else {
                return Err("_rebuild_tensor_v2: storage offset is not an int".into());
            };
            let shape = usizes(&args[2], "tensor size")?;
            let stride = usizes(&args[3], "tensor stride")?;
            if shape.len() != stride.len() || offset < 0 {
                return Err("_rebuild_tensor_v2: inconsistent size/stride/offset".into());
            }
            Ok(Value::Tensor(PthTensorInfo {
                dtype: *dtype,
                shape,
                stride,
                storage: key.clone(),
                offset: offset as usize,
            }))
        }
        ("torch._utils", "_rebuild_parameter") if !args.is_empty() => match &args[0] {
            t @ Value::Tensor(_) => Ok(t.clone()),
            other => Err(format!("_rebuild_parameter on a {}", other.kind())),
        },
        _ => Err(format!(
            "global {module}.{name} with {} arguments is not supported",
            args.len()
        )),
    }
}

fn persistent(pid: Value) -> R<Value> {
    // ('storage', torch.<Type>Storage, key, location, numel)
    let Value::Tuple(t) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(m, ty), Value::Str(key), _, _]
            if tag == "storage" && m == "torch" =>
        {
            Ok(Value::Storage(storage_dtype(ty)?, key.clone()))
        }
        _ => Err("persistent id is not a ('storage', type, key, location, numel) tuple".into()),
    }
}

/// Run the pickle `b` and return the value STOP leaves on the stack.
pub(super) fn load(b: &[u8]) -> R<Value> {
    let mut r = Reader { b, p: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Value> = Default::default();
    let pop = |s: &mut Vec<Value>| s.pop().ok_or_else(|| "stack underflow".to_string());
    let pop_mark = |s: &mut Vec<Value>| -> R<Vec<Value>> {
        let m = s
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("MARK missing")?;
        let items = s.split_off(m + 1);
        s.pop();
        Ok(items)
    };
    loop {
        let at = r.p;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                r.take(8)?; // FRAME length: the frame's content follows inline
            }
            b'.' => return pop(&mut stack),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 | 0x89 => stack.push(Value::Bool),
            b'K' => stack.push(Value::Int(r.uint(1)? as i64)),
            b'M' => stack.push(Value::Int(r.uint(2)? as i64)),
            b'J' => stack.push(Value::Int(r.uint(4)? as u32 as i32 as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes"));
                }
                let s = r.take(n)?;
                let mut v = s.iter().rev().fold(0i64, |a, &x| (a << 8) | x as i64);
                if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                r.take(8)?;
                stack.push(Value::Float);
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.uint(4)?,
                    0x8c => r.uint(1)?,
                    _ => r.uint(8)?,
                } as usize;
                let s = r.take(n)?;
                let s = std::str::from_utf8(s).map_err(|_| "invalid UTF-8 string")?;
                stack.push(Value::Str(s.to_string()));
            }
            b'U' | b'T' | b'C' | b'B' => {
                let n = if matches!(op, b'U' | b'C') {
                    r.uint(1)?
                } else {
                    r.uint(4)?
                } as usize;
                let s = r.take(n)?.to_vec();
                stack.push(match String::from_utf8(s) {
                    Ok(t) if matches!(op, b'U' | b'T') => Value::Str(t),
                    _ => Value::Bytes,
                });
            }
            b'c' => {
                let m = r.line()?;
                let n = r.line()?;
                stack.push(Value::Global(m, n));
            }
            0x93 => {
                let n = pop(&mut stack)?;
                let m = pop(&mut stack)?;
                match (m, n) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err("STACK_GLOBAL on non-strings".into()),
                }
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => r.uint(1)?,
                    b'r' => r.uint(4)?,
                    _ => memo.len() as u64,
                };
                let top = stack.last().ok_or("PUT on an empty stack")?.clone();
                memo.insert(k, top);
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.uint(1)? } else { r.uint(4)? };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| format!("GET of unset memo {k}"))?;
                stack.push(v.clone());
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(call(f, args)?);
            }
            b'b' => {
                // BUILD: the state of an OrderedDict (its `_metadata`) is not needed.
                let _state = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(_)) | Some(Value::Tensor(_)) => {}
                    Some(v) => return Err(format!("BUILD on a {}", v.kind())),
                    None => return Err("stack underflow".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd item count".into());
                }
                let Some(Value::Dict(d)) = stack.last_mut() else {
                    return Err("SETITEM(S) on a non-dict".into());
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                let Some(Value::List(l)) = stack.last_mut() else {
                    return Err("APPEND(S) on a non-list".into());
                };
                l.extend(items);
            }
            _ => {
                return Err(format!(
                    "pickle opcode 0x{op:02x} at byte {at} is not supported"
                ));
            }
        }
    }
}
