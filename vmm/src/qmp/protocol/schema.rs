//! A small declarative QAPI: argument types described as data, checked the
//! way QEMU's QObject input visitor checks them.
//!
//! Every command's arguments are described once (see `commands.rs`) with
//! these types; [`check_args`] walks a request's `arguments` against the
//! description and reports the first problem with QEMU's exact message.
//! Only after that does serde turn the (normalised) value into the typed
//! Rust struct, so serde's own, differently worded errors never reach a
//! client.
//!
//! QEMU conventions reproduced here:
//! - members are visited in schema order, and an unexpected member is
//!   reported only after all declared members of that object checked out;
//! - "missing"/"invalid type"/"unexpected" messages name the member by its
//!   full path (`channels[0].addr.transport`), while enum and bounded
//!   integer messages use the bare member name (`'null'` inside a list);
//! - an optional member that is present with the value `null` is a type
//!   error, not "absent";
//! - `uint64`/`size` accept negative integers (wrapped), as QEMU does for
//!   backward compatibility.

use serde_json::{Map, Value};

/// An enumeration type.
#[derive(Debug)]
pub struct EnumDef {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// The type of a member or list element.
#[derive(Debug)]
pub enum Ty {
    /// `str`
    Str,
    /// `int` (int64): JSON integers only, no floats, no strings.
    Int,
    /// `uint64`
    Uint64,
    /// `size` (checked like `uint64`)
    Size,
    /// `uint8`/`uint16`/`uint32`: uint64 first, then this bound; the
    /// string is QEMU's C type name used in the message (`"uint8_t"`).
    UintN(u64, &'static str),
    /// `bool`
    Bool,
    /// `number`: any JSON number.
    Number,
    /// `any`
    Any,
    /// The `StrOrNull` alternate.
    StrOrNull,
    Enum(&'static EnumDef),
    List(&'static Ty),
    Object(&'static Body),
}

/// One member of an object type.
#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

/// A mandatory member.
pub const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member (QAPI's `'*name'`).
pub const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// The members of an object type: a struct or a flat union.
#[derive(Debug)]
pub enum Body {
    Struct(&'static [Member]),
    /// Flat union: `base` (which must contain the enum-typed
    /// `discriminator`) plus the members of the branch selected by the
    /// discriminator's value.  A value without a branch has no extra members.
    Union {
        base: &'static [Member],
        discriminator: &'static str,
        variants: &'static [(&'static str, &'static Body)],
    },
}

/// Check a command's `arguments` object against its member list and return
/// it normalised (negative `uint64`s wrapped), or QEMU's error message.
pub fn check_args(members: &'static [Member], args: &Map<String, Value>) -> Result<Value, String> {
    let mut checker = Checker { path: Vec::new() };
    checker.object(&Body::Struct(members), args)
}

enum Seg {
    Key(String),
    Index(usize),
}

struct Checker {
    path: Vec<Seg>,
}

impl Checker {
    /// QEMU's `full_name()`: `a.b[2].c`.
    fn full_name(&self, last: Option<&str>) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) => {
                    s.push('[');
                    s.push_str(&i.to_string());
                    s.push(']');
                }
            }
        }
        if let Some(last) = last {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(last);
        }
        if s.is_empty() {
            s.push_str("<anonymous>");
        }
        s
    }

    fn type_error(&self, expected: &str) -> String {
        format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full_name(None)
        )
    }

    fn object(&mut self, body: &Body, map: &Map<String, Value>) -> Result<Value, String> {
        let mut out = Map::new();
        self.body(body, map, &mut out)?;
        // check_struct: anything not consumed is unexpected.
        if let Some(extra) = map.keys().find(|k| !out.contains_key(k.as_str())) {
            return Err(format!(
                "Parameter '{}' is unexpected",
                self.full_name(Some(extra))
            ));
        }
        Ok(Value::Object(out))
    }

    fn body(
        &mut self,
        body: &Body,
        map: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        match body {
            Body::Struct(members) => self.members(members, map, out),
            Body::Union {
                base,
                discriminator,
                variants,
            } => {
                self.members(base, map, out)?;
                let tag = out
                    .get(*discriminator)
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match variants.iter().find(|(name, _)| *name == tag) {
                    Some((_, branch)) => self.body(branch, map, out),
                    None => Ok(()),
                }
            }
        }
    }

    fn members(
        &mut self,
        members: &[Member],
        map: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        for m in members {
            match map.get(m.name) {
                None if m.optional => {}
                None => {
                    return Err(format!(
                        "Parameter '{}' is missing",
                        self.full_name(Some(m.name))
                    ));
                }
                Some(v) => {
                    self.path.push(Seg::Key(m.name.to_owned()));
                    let checked = self.value(&m.ty, v, Some(m.name));
                    self.path.pop();
                    out.insert(m.name.to_owned(), checked?);
                }
            }
        }
        Ok(())
    }

    /// Check one value whose path is already pushed.  `name` is the bare
    /// member name, `None` for list elements.
    fn value(&mut self, ty: &Ty, v: &Value, name: Option<&str>) -> Result<Value, String> {
        let short = name.unwrap_or("null");
        match ty {
            Ty::Str => match v {
                Value::String(_) => Ok(v.clone()),
                _ => Err(self.type_error("string")),
            },
            Ty::Int => match v.as_i64() {
                Some(_) => Ok(v.clone()),
                None => Err(self.type_error("integer")),
            },
            Ty::Uint64 | Ty::Size => self.uint64(v),
            Ty::UintN(max, cname) => {
                let n = self.uint64(v)?;
                if n.as_u64().is_some_and(|n| n <= *max) {
                    Ok(n)
                } else {
                    Err(format!("Parameter '{short}' expects {cname}"))
                }
            }
            Ty::Bool => match v {
                Value::Bool(_) => Ok(v.clone()),
                _ => Err(self.type_error("boolean")),
            },
            Ty::Number => match v {
                Value::Number(_) => Ok(v.clone()),
                _ => Err(self.type_error("number")),
            },
            Ty::Any => Ok(v.clone()),
            Ty::StrOrNull => match v {
                Value::String(_) | Value::Null => Ok(v.clone()),
                _ => Err(format!(
                    "Invalid parameter type for '{short}', expected: StrOrNull"
                )),
            },
            Ty::Enum(def) => match v {
                Value::String(s) if def.values.contains(&s.as_str()) => Ok(v.clone()),
                Value::String(s) => Err(format!("Parameter '{short}' does not accept value '{s}'")),
                _ => Err(self.type_error("string")),
            },
            Ty::List(elem) => match v {
                Value::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        self.path.push(Seg::Index(i));
                        let checked = self.value(elem, item, None);
                        self.path.pop();
                        out.push(checked?);
                    }
                    Ok(Value::Array(out))
                }
                _ => Err(self.type_error("array")),
            },
            Ty::Object(body) => match v {
                Value::Object(map) => self.object(body, map),
                _ => Err(self.type_error("object")),
            },
        }
    }

    /// QEMU's uint64 input: unsigned, or negative int64 reinterpreted.
    /// (`size` shares it: QMP's visitor has no size callback, so the message
    /// says "uint64" for both.)
    fn uint64(&self, v: &Value) -> Result<Value, String> {
        if let Some(u) = v.as_u64() {
            return Ok(Value::from(u));
        }
        if let Some(i) = v.as_i64() {
            return Ok(Value::from(i as u64));
        }
        Err(format!(
            "Parameter '{}' expects uint64",
            self.full_name(None)
        ))
    }
}
