//! `-object memory-backend-memfd,...` / `-object memory-backend-file,...` (keyval or QEMU's JSON
//! form, as libvirt writes it) and `-machine memory-backend=ID`: where guest RAM lives.
//!
//! `-m SIZE[,hugepages=on][,prealloc=on]` stays the short form: it is a memfd backend with
//! `share=on`. A backend selected with `-machine memory-backend=ID` gives the RAM size; `-m`
//! must then be absent or say the same size.

use std::path::PathBuf;

/// What backs guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Anonymous memfds (sealed), optionally on 2 MiB huge pages.
    Memfd { hugetlb: bool },
    /// One file holding all of RAM: opened read-write and mapped `MAP_SHARED` (with `share=on`).
    File { mem_path: PathBuf },
}

/// One `-object memory-backend-*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryBackend {
    pub id: String,
    pub kind: BackendKind,
    pub size: u64,
    /// `share=on`: the mapping is shared, so the pages outlive this process's address space
    /// (required by every CPR mode). QEMU's default is off.
    pub share: bool,
    pub prealloc: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(
        "invalid -object '{spec}': {detail}; use memory-backend-memfd,id=ID,size=S,share=on[,hugetlb=on][,hugetlbsize=2M][,prealloc=on] or memory-backend-file,id=ID,size=S,mem-path=PATH,share=on[,prealloc=on] (or the same as JSON)"
    )]
    Invalid { spec: String, detail: String },
    #[error(
        "-object type '{0}' is not supported: only memory-backend-memfd and memory-backend-file"
    )]
    UnsupportedType(String),
    #[error("two -object definitions with id '{0}': give each object its own id")]
    DuplicateId(String),
    #[error(
        "-machine memory-backend={0}: there is no -object with id '{0}'; add -object memory-backend-memfd,id={0},size=S,share=on"
    )]
    UnknownBackend(String),
    #[error(
        "-object {0} is defined but not used: select it with -machine memory-backend={0} (this VMM has one RAM backend)"
    )]
    Unused(String),
    #[error(
        "-m says {m} MiB but memory-backend '{id}' has size {backend} MiB: drop -m or make them agree"
    )]
    SizeMismatch { m: u64, id: String, backend: u64 },
    #[error(
        "-m ...,{option}=... together with -machine memory-backend: give {option} on the -object instead"
    )]
    MemoryOptionWithBackend { option: &'static str },
}

fn invalid(spec: &str, detail: impl Into<String>) -> ObjectError {
    ObjectError::Invalid {
        spec: spec.to_string(),
        detail: detail.into(),
    }
}

/// Key/value pairs of one `-object`, JSON values turned into their keyval spellings.
fn fields(spec: &str) -> Result<(String, Vec<(String, String)>), ObjectError> {
    if spec.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(spec).map_err(|e| invalid(spec, format!("bad JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid(spec, "JSON must be an object"))?;
        let mut kind = None;
        let mut out = Vec::new();
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => {
                    return Err(invalid(
                        spec,
                        format!("'{k}' must be a string, bool or number"),
                    ));
                }
            };
            if k == "qom-type" {
                kind = Some(text);
            } else {
                out.push((k.clone(), text));
            }
        }
        let kind = kind.ok_or_else(|| invalid(spec, "missing \"qom-type\""))?;
        return Ok((kind, out));
    }
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let (kind, mut out) = match first.split_once('=') {
        Some(("qom-type", t)) => (t.to_string(), Vec::new()),
        Some(_) => return Err(invalid(spec, "the object type comes first")),
        None => (first.to_string(), Vec::new()),
    };
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| invalid(spec, format!("'{part}' is not key=value")))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok((kind, out))
}

fn on_off(spec: &str, key: &str, value: &str) -> Result<bool, ObjectError> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(invalid(spec, format!("{key}={value}: use on or off"))),
    }
}

/// Parses one `-object`.
pub fn parse_object(spec: &str) -> Result<MemoryBackend, ObjectError> {
    let (kind, fields) = fields(spec)?;
    if kind != "memory-backend-memfd" && kind != "memory-backend-file" {
        return Err(ObjectError::UnsupportedType(kind));
    }
    let mut id = None;
    let mut size = None;
    let mut share = false;
    let mut prealloc = false;
    let mut hugetlb = false;
    let mut mem_path = None;
    for (k, v) in &fields {
        match (kind.as_str(), k.as_str()) {
            (_, "id") if !v.is_empty() => id = Some(v.clone()),
            (_, "size") => {
                // JSON gives bytes; keyval takes QEMU's suffixes (a bare number is bytes).
                let bytes = if v.bytes().all(|b| b.is_ascii_digit()) {
                    v.parse::<u64>()
                        .map_err(|_| invalid(spec, format!("size={v} is not a size")))?
                } else {
                    super::parse_memory(v).map_err(|e| invalid(spec, e.to_string()))?
                };
                size = Some(bytes);
            }
            (_, "share") => share = on_off(spec, k, v)?,
            (_, "prealloc") => prealloc = on_off(spec, k, v)?,
            // Accepted as QEMU spells them, without effect here.
            (_, "merge" | "dump" | "x-use-canonical-path-for-ramblock-id") => {
                on_off(spec, k, v)?;
            }
            ("memory-backend-memfd", "hugetlb") => hugetlb = on_off(spec, k, v)?,
            ("memory-backend-memfd", "hugetlbsize") => {
                if !matches!(v.as_str(), "2M" | "2048K" | "2097152") {
                    return Err(invalid(
                        spec,
                        format!(
                            "hugetlbsize={v}: only 2 MiB huge pages (hugetlbsize=2M) are supported"
                        ),
                    ));
                }
            }
            ("memory-backend-memfd", "seal") => {
                if !on_off(spec, k, v)? {
                    return Err(invalid(
                        spec,
                        "seal=off: guest RAM memfds are always sealed against resizing",
                    ));
                }
            }
            ("memory-backend-file", "mem-path") if !v.is_empty() => {
                mem_path = Some(PathBuf::from(v));
            }
            _ => return Err(invalid(spec, format!("unknown or empty option '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| invalid(spec, "missing id=ID"))?;
    let size = size.ok_or_else(|| invalid(spec, "missing size=S"))?;
    let kind = match kind.as_str() {
        "memory-backend-file" => BackendKind::File {
            mem_path: mem_path.ok_or_else(|| invalid(spec, "missing mem-path=PATH"))?,
        },
        _ => BackendKind::Memfd { hugetlb },
    };
    Ok(MemoryBackend {
        id,
        kind,
        size,
        share,
        prealloc,
    })
}

/// The backend `-machine memory-backend=ID` selects, from every `-object`.
pub fn select_backend(
    objects: &[String],
    selected: Option<&str>,
) -> Result<Option<MemoryBackend>, ObjectError> {
    let mut backends: Vec<MemoryBackend> = Vec::new();
    for spec in objects {
        let b = parse_object(spec)?;
        if backends.iter().any(|o| o.id == b.id) {
            return Err(ObjectError::DuplicateId(b.id));
        }
        backends.push(b);
    }
    match selected {
        Some(id) => {
            let pos = backends
                .iter()
                .position(|b| b.id == id)
                .ok_or_else(|| ObjectError::UnknownBackend(id.to_string()))?;
            let chosen = backends.remove(pos);
            if let Some(other) = backends.first() {
                return Err(ObjectError::Unused(other.id.clone()));
            }
            Ok(Some(chosen))
        }
        None => match backends.first() {
            Some(b) => Err(ObjectError::Unused(b.id.clone())),
            None => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_memfd_and_file() {
        let b = parse_object(
            "memory-backend-memfd,id=ram0,size=1G,share=on,hugetlb=on,hugetlbsize=2M,prealloc=on",
        )
        .unwrap();
        assert_eq!(b.id, "ram0");
        assert_eq!(b.size, 1 << 30);
        assert!(b.share && b.prealloc);
        assert_eq!(b.kind, BackendKind::Memfd { hugetlb: true });
        let f = parse_object(
            "memory-backend-file,id=pc.ram,size=512M,mem-path=/dev/shm/vm.ram,share=on",
        )
        .unwrap();
        assert_eq!(
            f.kind,
            BackendKind::File {
                mem_path: "/dev/shm/vm.ram".into()
            }
        );
        assert_eq!(f.size, 512 << 20);
        assert!(f.share && !f.prealloc);
        // QEMU's default is share=off.
        assert!(
            !parse_object("memory-backend-memfd,id=m,size=64M")
                .unwrap()
                .share
        );
    }

    #[test]
    fn json_as_libvirt_writes_it() {
        let b = parse_object(
            r#"{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":1073741824}"#,
        )
        .unwrap();
        assert_eq!(b.id, "pc.ram");
        assert_eq!(b.size, 1 << 30);
        assert!(b.share);
        let f = parse_object(
            r#"{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/var/lib/vm/ram","share":true,"prealloc":true,"size":67108864}"#,
        )
        .unwrap();
        assert!(matches!(f.kind, BackendKind::File { .. }) && f.prealloc);
    }

    #[test]
    fn bad_objects_say_what_is_wrong() {
        for (spec, needle) in [
            ("memory-backend-memfd,size=1G", "missing id"),
            ("memory-backend-memfd,id=a", "missing size"),
            ("memory-backend-file,id=a,size=1G", "missing mem-path"),
            (
                "memory-backend-memfd,id=a,size=1G,share=maybe",
                "use on or off",
            ),
            (
                "memory-backend-memfd,id=a,size=1G,hugetlbsize=1G",
                "only 2 MiB",
            ),
            (
                "memory-backend-file,id=a,size=1G,mem-path=/x,hugetlb=on",
                "unknown",
            ),
            ("memory-backend-ram,id=a,size=1G", "not supported"),
            ("{\"qom-type\":\"memory-backend-memfd\"", "bad JSON"),
            (
                "memory-backend-memfd,id=a,size=lots",
                "invalid memory size 'lots'",
            ),
            (
                "memory-backend-memfd,id=a,size=99999999999999999999999",
                "not a size",
            ),
        ] {
            let e = parse_object(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn selection_rules() {
        let objs = vec!["memory-backend-memfd,id=a,size=64M,share=on".to_string()];
        assert_eq!(select_backend(&objs, Some("a")).unwrap().unwrap().id, "a");
        assert!(
            select_backend(&objs, Some("b"))
                .unwrap_err()
                .to_string()
                .contains("no -object with id 'b'")
        );
        assert!(
            select_backend(&objs, None)
                .unwrap_err()
                .to_string()
                .contains("memory-backend=a")
        );
        let two = vec![objs[0].clone(), objs[0].clone()];
        assert!(matches!(
            select_backend(&two, Some("a")),
            Err(ObjectError::DuplicateId(_))
        ));
        assert_eq!(select_backend(&[], None).unwrap(), None);
    }
}
