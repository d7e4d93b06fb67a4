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

/// Why arguments do not fit their schema, worded as QEMU's QObject input visitor words it
/// (the text goes to the client as a GenericError's `desc`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// A mandatory member is absent (full path: `channels[0].addr.transport`).
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidType {
        name: String,
        expected: &'static str,
    },
    /// A member the schema does not declare.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// An integer out of its type's range (`uint8_t`, `uint64`).
    #[error("Parameter '{name}' expects {expected}")]
    Expects {
        name: String,
        expected: &'static str,
    },
    #[error("Parameter '{name}' does not accept value '{value}'")]
    EnumValue { name: String, value: String },
}

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
pub fn check_args(
    members: &'static [Member],
    args: &Map<String, Value>,
) -> Result<Value, ArgError> {
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

    fn type_error(&self, expected: &'static str) -> ArgError {
        ArgError::InvalidType {
            name: self.full_name(None),
            expected,
        }
    }

    fn object(&mut self, body: &Body, map: &Map<String, Value>) -> Result<Value, ArgError> {
        let mut out = Map::new();
        self.body(body, map, &mut out)?;
        // check_struct: anything not consumed is unexpected.
        if let Some(extra) = map.keys().find(|k| !out.contains_key(k.as_str())) {
            return Err(ArgError::Unexpected(self.full_name(Some(extra))));
        }
        Ok(Value::Object(out))
    }

    fn body(
        &mut self,
        body: &Body,
        map: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), ArgError> {
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
    ) -> Result<(), ArgError> {
        for m in members {
            match map.get(m.name) {
                None if m.optional => {}
                None => {
                    return Err(ArgError::Missing(self.full_name(Some(m.name))));
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
    fn value(&mut self, ty: &Ty, v: &Value, name: Option<&str>) -> Result<Value, ArgError> {
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
                    Err(ArgError::Expects {
                        name: short.to_owned(),
                        expected: cname,
                    })
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
                _ => Err(ArgError::InvalidType {
                    name: short.to_owned(),
                    expected: "StrOrNull",
                }),
            },
            Ty::Enum(def) => match v {
                Value::String(s) if def.values.contains(&s.as_str()) => Ok(v.clone()),
                Value::String(s) => Err(ArgError::EnumValue {
                    name: short.to_owned(),
                    value: s.clone(),
                }),
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
    fn uint64(&self, v: &Value) -> Result<Value, ArgError> {
        if let Some(u) = v.as_u64() {
            return Ok(Value::from(u));
        }
        if let Some(i) = v.as_i64() {
            return Ok(Value::from(i as u64));
        }
        Err(ArgError::Expects {
            name: self.full_name(None),
            expected: "uint64",
        })
    }
}

/// Check any value (a command's result, an event's data) against `ty`, with the same rules as
/// arguments. Tests use it to prove that what the monitor sends matches what
/// `query-qmp-schema` says it sends.
pub fn check_value(ty: &Ty, v: &Value) -> Result<Value, ArgError> {
    let mut checker = Checker { path: Vec::new() };
    checker.value(ty, v, None)
}

// --- introspection (query-qmp-schema) ----------------------------------------

/// One command as introspection sees it: name, arguments, result type.
pub struct IntrospectCommand {
    pub name: &'static str,
    pub args: &'static [Member],
    pub ret: &'static Ty,
}

/// One event as introspection sees it: name and the members of its `data`.
pub struct IntrospectEvent {
    pub name: &'static str,
    pub data: &'static [Member],
}

/// QEMU's `query-qmp-schema` result (`[SchemaInfo]`) for these commands and events.
///
/// As in QEMU, commands and events keep their names, every other type gets a masked name
/// ("0", "1", ... in order of first use; arrays are "[ELEMENT]"), and the integer types all
/// appear as the builtin `int`. Built from the very tables the dispatcher checks requests
/// against, so the schema cannot drift from what is implemented.
pub fn introspect(commands: &[IntrospectCommand], events: &[IntrospectEvent]) -> Vec<Value> {
    let mut s = Introspector::default();
    for c in commands {
        let arg_type = s.members_type(c.args);
        let ret_type = s.type_name(c.ret);
        s.push(serde_json::json!({
            "name": c.name,
            "meta-type": "command",
            "arg-type": arg_type,
            "ret-type": ret_type,
        }));
    }
    for e in events {
        let arg_type = s.members_type(e.data);
        s.push(serde_json::json!({
            "name": e.name,
            "meta-type": "event",
            "arg-type": arg_type,
        }));
    }
    s.finish()
}

/// Builtin types: introspection name and JSON type.
const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("int", "int"),
    ("bool", "boolean"),
    ("number", "number"),
    ("null", "null"),
    ("any", "value"),
];

#[derive(Default)]
struct Introspector {
    /// Entities in order of emission.
    out: Vec<Value>,
    /// Named non-builtin types already emitted, by the address of their definition.
    seen: Vec<(usize, String)>,
    builtins_used: Vec<&'static str>,
    next: usize,
}

impl Introspector {
    fn push(&mut self, v: Value) {
        self.out.push(v);
    }

    fn finish(mut self) -> Vec<Value> {
        for (name, json_type) in BUILTINS {
            if self.builtins_used.contains(name) {
                self.out.push(serde_json::json!({
                    "name": name,
                    "meta-type": "builtin",
                    "json-type": json_type,
                }));
            }
        }
        self.out
    }

    fn builtin(&mut self, name: &'static str) -> String {
        if !self.builtins_used.contains(&name) {
            self.builtins_used.push(name);
        }
        name.to_owned()
    }

    /// The masked name of the type defined at `key`, and whether it is new.
    fn name_for(&mut self, key: usize) -> (String, bool) {
        if let Some((_, name)) = self.seen.iter().find(|(k, _)| *k == key) {
            return (name.clone(), false);
        }
        let name = self.next.to_string();
        self.next += 1;
        self.seen.push((key, name.clone()));
        (name, true)
    }

    fn members_type(&mut self, members: &'static [Member]) -> String {
        // Every empty member list is the one empty object type, as in QEMU.
        let key = if members.is_empty() {
            0
        } else {
            members.as_ptr() as usize
        };
        let (name, new) = self.name_for(key);
        if new {
            let members = self.members(members);
            self.push(serde_json::json!({
                "name": name,
                "meta-type": "object",
                "members": members,
            }));
        }
        name
    }

    fn members(&mut self, members: &'static [Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let ty = self.type_name(&m.ty);
                let mut v = serde_json::json!({ "name": m.name, "type": ty });
                if m.optional {
                    v["default"] = Value::Null;
                }
                v
            })
            .collect()
    }

    fn type_name(&mut self, ty: &'static Ty) -> String {
        match ty {
            Ty::Str => self.builtin("str"),
            Ty::Int | Ty::Uint64 | Ty::Size | Ty::UintN(..) => self.builtin("int"),
            Ty::Bool => self.builtin("bool"),
            Ty::Number => self.builtin("number"),
            Ty::Any => self.builtin("any"),
            Ty::StrOrNull => {
                // One alternate however many members use it (an odd key is no address).
                let (name, new) = self.name_for(1);
                if new {
                    let s = self.builtin("str");
                    let n = self.builtin("null");
                    self.push(serde_json::json!({
                        "name": name,
                        "meta-type": "alternate",
                        "members": [{ "type": s }, { "type": n }],
                    }));
                }
                name
            }
            Ty::Enum(def) => {
                let (name, new) = self.name_for(*def as *const EnumDef as usize);
                if new {
                    let members: Vec<Value> = def
                        .values
                        .iter()
                        .map(|v| serde_json::json!({ "name": v }))
                        .collect();
                    self.push(serde_json::json!({
                        "name": name,
                        "meta-type": "enum",
                        "members": members,
                        "values": def.values,
                    }));
                }
                name
            }
            Ty::List(elem) => {
                let elem_name = self.type_name(elem);
                let name = format!("[{elem_name}]");
                let key = *elem as *const Ty as usize ^ 1;
                if !self.seen.iter().any(|(_, n)| *n == name) {
                    self.seen.push((key, name.clone()));
                    self.push(serde_json::json!({
                        "name": name,
                        "meta-type": "array",
                        "element-type": elem_name,
                    }));
                }
                name
            }
            Ty::Object(body) => self.body_type(body),
        }
    }

    fn body_type(&mut self, body: &'static Body) -> String {
        if let Body::Struct(members) = body
            && members.is_empty()
        {
            return self.members_type(members);
        }
        let (name, new) = self.name_for(body as *const Body as usize);
        if !new {
            return name;
        }
        match body {
            Body::Struct(members) => {
                let members = self.members(members);
                self.push(serde_json::json!({
                    "name": name,
                    "meta-type": "object",
                    "members": members,
                }));
            }
            Body::Union {
                base,
                discriminator,
                variants,
            } => {
                let members = self.members(base);
                let variants: Vec<Value> = variants
                    .iter()
                    .map(|(case, branch)| {
                        let ty = self.body_type(branch);
                        serde_json::json!({ "case": case, "type": ty })
                    })
                    .collect();
                self.push(serde_json::json!({
                    "name": name,
                    "meta-type": "object",
                    "members": members,
                    "tag": discriminator,
                    "variants": variants,
                }));
            }
        }
        name
    }
}
