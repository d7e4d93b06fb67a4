//! Disks on the command line, in QEMU's spellings:
//!
//! - `-drive file=PATH,format=raw,if=virtio[,id=ID][,readonly=on][,cache=MODE][,aio=A][,serial=S]`: a
//!   disk and its virtio-blk-pci device in one;
//! - `-drive if=none,id=ID,file=PATH,format=raw` or `-blockdev driver=file,node-name=ID,filename=PATH`
//!   (also libvirt's JSON form, with a `raw` format node on top of the file node), plus
//!   `-device virtio-blk-pci,drive=ID`;
//! - `-add-fd fd=N,set=S` and `file=/dev/fdset/S`: a disk the management layer opened.
//!
//! The spelling is checked here ([`parse_disks`]): every `-device` names a drive that exists, no
//! two devices share one, formats other than raw are refused by name. The images themselves are
//! checked by [`check_images`] before a VMM that opens them by path starts (a boot, a restore
//! from a file): it exists, is a regular file or a block device, opens with the access asked
//! for, and, without `format=`, is not a qcow2 image. A live update's new VMM (and its rollback)
//! never looks at the paths: the disks come with the update, and their paths may be gone.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use crate::devices::virtio::block::{AioMode, BlockConfig, CacheMode, DiskSource};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveError {
    #[error("invalid {option} '{spec}': {detail}")]
    Syntax {
        option: &'static str,
        spec: String,
        detail: String,
    },
    #[error("drive '{id}': {path}: {detail}")]
    Image {
        id: String,
        path: String,
        detail: String,
    },
    #[error(
        "drive '{id}': image format '{format}' is not supported; only raw images are (convert with: qemu-img convert -O raw IMAGE OUT.raw)"
    )]
    Format { id: String, format: String },
    #[error(
        "-device {device}: drive '{drive}' does not exist (give it with -drive if=none,id={drive},... or -blockdev node-name={drive},...)"
    )]
    NoSuchDrive { device: String, drive: String },
    #[error("drive '{0}' is used by two devices")]
    DriveInUse(String),
    #[error("two drives are both named '{0}'")]
    DuplicateId(String),
    #[error("-device {0}: unknown device; this VMM has virtio-blk-pci and virtio-net-pci")]
    UnknownDevice(String),
    #[error("file=/dev/fdset/{0}: no -add-fd put an fd in set {0}")]
    NoFdSet(u32),
    #[error("-add-fd fd={0}: fd {0} is not open in this process (pass it when starting the VMM)")]
    FdNotOpen(RawFd),
    #[error("too many disks: PCI bus 0 has room for {0}")]
    TooMany(usize),
}

/// The disks the command line asks for, in the order their devices appear.
pub fn parse_disks(
    drives: &[String],
    blockdevs: &[String],
    devices: &[String],
    add_fds: &[String],
) -> Result<Vec<BlockConfig>, DriveError> {
    let fdsets = parse_add_fds(add_fds)?;
    let mut pending: Vec<PendingDrive> = Vec::new();
    let mut implicit: Vec<String> = Vec::new();
    for (n, spec) in drives.iter().enumerate() {
        let d = parse_drive(spec, n)?;
        if d.attach_now {
            implicit.push(d.id.clone());
        }
        push_unique(&mut pending, d)?;
    }
    // libvirt writes a file node and a raw format node over it; the format node's name is the
    // one a -device names.
    let mut aliases: BTreeMap<String, String> = BTreeMap::new();
    for spec in blockdevs {
        match parse_blockdev(spec)? {
            Blockdev::File(d) => push_unique(&mut pending, d)?,
            Blockdev::Raw { node, file } => {
                aliases.insert(node, file);
            }
        }
    }
    let mut order: Vec<(String, Option<String>, Option<bool>)> =
        implicit.into_iter().map(|id| (id, None, None)).collect();
    for spec in devices {
        order.push(parse_device(spec)?);
    }
    let mut out = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for (name, serial, write_cache) in order {
        let id = aliases.get(&name).cloned().unwrap_or(name.clone());
        let Some(d) = pending.iter().find(|d| d.id == id) else {
            return Err(DriveError::NoSuchDrive {
                device: "virtio-blk-pci".into(),
                drive: name,
            });
        };
        if used.contains(&id) {
            return Err(DriveError::DriveInUse(name));
        }
        used.push(id.clone());
        let source = match &d.file {
            FileSpec::Path(p) => DiskSource::Path(p.clone()),
            FileSpec::FdSet(set) => DiskSource::Fd(
                *fdsets
                    .get(set)
                    .and_then(|fds| fds.first())
                    .ok_or(DriveError::NoFdSet(*set))?,
            ),
        };
        if let Some(f) = d.format.as_deref().filter(|f| *f != "raw") {
            return Err(DriveError::Format {
                id: d.id.clone(),
                format: f.to_string(),
            });
        }
        out.push(BlockConfig {
            id: d.id.clone(),
            source,
            read_only: d.read_only,
            serial: serial.or_else(|| d.serial.clone()).unwrap_or_default(),
            format_stated: d.format.is_some(),
            aio: d.aio,
            cache: CacheMode {
                writeback: write_cache.unwrap_or(d.cache.writeback),
                ..d.cache
            },
        });
    }
    for d in &pending {
        if !used.contains(&d.id) {
            log::warn!("drive '{}' is not attached to any device", d.id);
        }
    }
    if out.len() > MAX_DISKS {
        return Err(DriveError::TooMany(MAX_DISKS));
    }
    Ok(out)
}

/// PCI slots 1-31 (slot 0 is the host bridge).
pub const MAX_DISKS: usize = 31;

#[derive(Debug, Clone, PartialEq, Eq)]
enum FileSpec {
    Path(PathBuf),
    FdSet(u32),
}

#[derive(Debug, Clone)]
struct PendingDrive {
    id: String,
    file: FileSpec,
    format: Option<String>,
    read_only: bool,
    serial: Option<String>,
    /// `aio=`: the I/O path.
    aio: AioMode,
    /// `cache=`, `cache.direct=`, `cache.no-flush=`, `cache.writeback=`.
    cache: CacheMode,
    /// `if=virtio`: a virtio-blk-pci device comes with it.
    attach_now: bool,
}

fn push_unique(list: &mut Vec<PendingDrive>, d: PendingDrive) -> Result<(), DriveError> {
    if list.iter().any(|o| o.id == d.id) {
        return Err(DriveError::DuplicateId(d.id));
    }
    list.push(d);
    Ok(())
}

/// `key=value,key=value` (QEMU's option syntax; `,,` is a literal comma in a value).
pub(crate) fn split_options(
    option: &'static str,
    spec: &str,
) -> Result<Vec<(String, String)>, DriveError> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = spec.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => {
                return Err(DriveError::Syntax {
                    option,
                    spec: spec.to_string(),
                    detail: format!("'{part}' is not key=value"),
                });
            }
        }
    }
    Ok(out)
}

fn on_off(option: &'static str, spec: &str, key: &str, v: &str) -> Result<bool, DriveError> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(DriveError::Syntax {
            option,
            spec: spec.to_string(),
            detail: format!("{key}={v}: use on or off"),
        }),
    }
}

fn file_spec(option: &'static str, spec: &str, path: &str) -> Result<FileSpec, DriveError> {
    let bad = |detail: String| DriveError::Syntax {
        option,
        spec: spec.to_string(),
        detail,
    };
    match path.strip_prefix("/dev/fdset/") {
        Some(n) => n
            .parse()
            .map(FileSpec::FdSet)
            .map_err(|_| bad(format!("file={path}: /dev/fdset/ takes a set number"))),
        None if path.is_empty() => Err(bad("file= is empty".into())),
        None => Ok(FileSpec::Path(PathBuf::from(path))),
    }
}

fn parse_drive(spec: &str, index: usize) -> Result<PendingDrive, DriveError> {
    let bad = |detail: String| DriveError::Syntax {
        option: "-drive",
        spec: spec.to_string(),
        detail,
    };
    let mut id = None;
    let mut file = None;
    let mut format = None;
    let mut read_only = false;
    let mut serial = None;
    let mut aio = AioMode::default();
    let mut cache = CacheMode::default();
    let mut interface = "virtio".to_string();
    for (k, v) in split_options("-drive", spec)? {
        if parse_cache("-drive", spec, &k, &v, &mut cache)? {
            continue;
        }
        match k.as_str() {
            "file" => file = Some(file_spec("-drive", spec, &v)?),
            "format" => format = Some(v),
            "if" => interface = v,
            "id" => id = Some(v),
            "readonly" | "read-only" => read_only = on_off("-drive", spec, &k, &v)?,
            "serial" => serial = Some(v),
            "aio" => aio = parse_aio("-drive", spec, &v)?,
            "discard" | "detect-zeroes" | "media" => {}
            other => return Err(bad(format!("unknown option '{other}'"))),
        }
    }
    let attach_now = match interface.as_str() {
        "virtio" => true,
        "none" => false,
        other => return Err(bad(format!("if={other}: use if=virtio or if=none"))),
    };
    let Some(file) = file else {
        return Err(bad("file= is missing".into()));
    };
    let id = match id {
        Some(id) => id,
        None if attach_now => format!("virtio{index}"),
        None => return Err(bad("if=none needs id= for -device to name it".into())),
    };
    Ok(PendingDrive {
        id,
        file,
        format,
        read_only,
        serial,
        aio,
        cache,
        attach_now,
    })
}

/// `cache=MODE` and its parts, as QEMU spells them (the parts apply on top of the mode,
/// whatever their order); false if `key` is not a cache option.
fn parse_cache(
    option: &'static str,
    spec: &str,
    key: &str,
    value: &str,
    cache: &mut CacheMode,
) -> Result<bool, DriveError> {
    match key {
        "cache" => {
            let mode = CacheMode::parse(value).ok_or_else(|| DriveError::Syntax {
                option,
                spec: spec.to_string(),
                detail: format!(
                    "cache={value}: use cache=writeback, none, writethrough, directsync or unsafe"
                ),
            })?;
            // A part given before the mode still counts (QEMU: the parts win).
            let given = split_options(option, spec)?;
            let pick = |part: &str, set: bool, from_mode: bool| {
                if given.iter().any(|(k, _)| k == part) {
                    set
                } else {
                    from_mode
                }
            };
            *cache = CacheMode {
                direct: pick("cache.direct", cache.direct, mode.direct),
                no_flush: pick("cache.no-flush", cache.no_flush, mode.no_flush),
                writeback: pick("cache.writeback", cache.writeback, mode.writeback),
            };
        }
        "cache.direct" => cache.direct = on_off(option, spec, key, value)?,
        "cache.no-flush" => cache.no_flush = on_off(option, spec, key, value)?,
        "cache.writeback" => cache.writeback = on_off(option, spec, key, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_aio(option: &'static str, spec: &str, value: &str) -> Result<AioMode, DriveError> {
    AioMode::parse(value).ok_or_else(|| DriveError::Syntax {
        option,
        spec: spec.to_string(),
        detail: format!("aio={value}: use aio=io_uring, aio=native or aio=threads"),
    })
}

enum Blockdev {
    File(PendingDrive),
    /// A raw format node named `node` over the file node `file`.
    Raw {
        node: String,
        file: String,
    },
}

fn parse_blockdev(spec: &str) -> Result<Blockdev, DriveError> {
    let bad = |detail: String| DriveError::Syntax {
        option: "-blockdev",
        spec: spec.to_string(),
        detail,
    };
    let pairs: Vec<(String, String)> = if spec.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(spec).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        };
        let mut pairs = Vec::new();
        for (k, v) in obj {
            match v {
                // `"cache": {"direct": true, "no-flush": false}` is `cache.direct=on,...`.
                serde_json::Value::Object(inner) => {
                    pairs.extend(inner.iter().map(|(ik, iv)| (format!("{k}.{ik}"), text(iv))))
                }
                other => pairs.push((k.clone(), text(other))),
            }
        }
        pairs
    } else {
        split_options("-blockdev", spec)?
    };
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let node = get("node-name").ok_or_else(|| bad("node-name= is missing".into()))?;
    let read_only = match get("read-only") {
        Some(v) => on_off("-blockdev", spec, "read-only", &v)?,
        None => false,
    };
    let aio = match get("aio") {
        Some(v) => parse_aio("-blockdev", spec, &v)?,
        None => AioMode::default(),
    };
    let mut cache = CacheMode::default();
    for (k, v) in &pairs {
        if k.starts_with("cache.") {
            parse_cache("-blockdev", spec, k, v, &mut cache)?;
        }
    }
    match get("driver").as_deref() {
        Some("file") | Some("host_device") => {
            let filename = get("filename").ok_or_else(|| bad("filename= is missing".into()))?;
            Ok(Blockdev::File(PendingDrive {
                id: node,
                file: file_spec("-blockdev", spec, &filename)?,
                format: Some("raw".into()),
                read_only,
                serial: None,
                aio,
                cache,
                attach_now: false,
            }))
        }
        Some("raw") => {
            let file = get("file").ok_or_else(|| bad("a raw node needs file=NODE".into()))?;
            Ok(Blockdev::Raw { node, file })
        }
        Some(other) => Err(DriveError::Format {
            id: node,
            format: other.to_string(),
        }),
        None => Err(bad("driver= is missing".into())),
    }
}

/// `-device virtio-blk-pci,drive=ID[,serial=S][,write-cache=on|off|auto][,id=..][,addr=..]`:
/// the drive, its serial, and whether the guest sees a write cache (libvirt says it here; `auto`
/// leaves it to the drive's `cache=`).
fn parse_device(spec: &str) -> Result<(String, Option<String>, Option<bool>), DriveError> {
    let (driver, rest) = spec.split_once(',').unwrap_or((spec, ""));
    if driver != "virtio-blk-pci" && driver != "virtio-blk" {
        return Err(DriveError::UnknownDevice(driver.to_string()));
    }
    let mut drive = None;
    let mut serial = None;
    let mut write_cache = None;
    for (k, v) in split_options("-device", rest)? {
        match k.as_str() {
            "drive" => drive = Some(v),
            "serial" => serial = Some(v),
            "write-cache" if v == "auto" => write_cache = None,
            "write-cache" => write_cache = Some(on_off("-device", spec, &k, &v)?),
            "id" | "addr" | "bus" | "bootindex" | "num-queues" | "queue-size" => {}
            other => {
                return Err(DriveError::Syntax {
                    option: "-device",
                    spec: spec.to_string(),
                    detail: format!("unknown option '{other}'"),
                });
            }
        }
    }
    let drive = drive.ok_or_else(|| DriveError::Syntax {
        option: "-device",
        spec: spec.to_string(),
        detail: "drive= is missing".into(),
    })?;
    Ok((drive, serial, write_cache))
}

/// `-add-fd fd=N,set=S[,opaque=..]`: fd N, inherited from whoever started the VMM, joins set S.
fn parse_add_fds(specs: &[String]) -> Result<BTreeMap<u32, Vec<RawFd>>, DriveError> {
    let mut sets: BTreeMap<u32, Vec<RawFd>> = BTreeMap::new();
    for spec in specs {
        let bad = |detail: String| DriveError::Syntax {
            option: "-add-fd",
            spec: spec.to_string(),
            detail,
        };
        let mut fd = None;
        let mut set = None;
        for (k, v) in split_options("-add-fd", spec)? {
            match k.as_str() {
                "fd" => fd = Some(v.parse::<RawFd>().map_err(|_| bad(format!("fd={v}")))?),
                "set" => set = Some(v.parse::<u32>().map_err(|_| bad(format!("set={v}")))?),
                "opaque" => {}
                other => return Err(bad(format!("unknown option '{other}'"))),
            }
        }
        let (Some(fd), Some(set)) = (fd, set) else {
            return Err(bad("needs fd=N and set=S".into()));
        };
        if fd < 3 || cpr_common::fds::identity(fd, "add-fd").is_err() {
            return Err(DriveError::FdNotOpen(fd));
        }
        sets.entry(set).or_default().push(fd);
    }
    Ok(sets)
}

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Opens every image as its device will and checks what it is (see the module comment for
/// when).
pub fn check_images(disks: &[BlockConfig]) -> Result<(), DriveError> {
    disks.iter().try_for_each(check_image)
}

fn check_image(config: &BlockConfig) -> Result<(), DriveError> {
    let image_err = |detail: String| DriveError::Image {
        id: config.id.clone(),
        path: config.source.to_string(),
        detail,
    };
    let not_a_disk =
        || image_err("not a regular file or block device (a disk image is needed)".into());
    let is_disk = |ft: std::fs::FileType| ft.is_file() || ft.is_block_device();
    // A path is looked at before it is opened (a directory would open for reading).
    if let DiskSource::Path(p) = &config.source {
        let meta = std::fs::metadata(p).map_err(|e| image_err(e.to_string()))?;
        if !is_disk(meta.file_type()) {
            return Err(not_a_disk());
        }
    }
    let file = config
        .open_for_check()
        .map_err(|e| image_err(format!("{e}")))?;
    // A passed fd can be anything: a socket, a pipe, a directory.
    let meta = file.metadata().map_err(|e| image_err(e.to_string()))?;
    if !is_disk(meta.file_type()) {
        return Err(not_a_disk());
    }
    if !config.format_stated {
        use std::os::unix::fs::FileExt;
        let mut magic = [0u8; 4];
        if file.read_exact_at(&mut magic, 0).is_ok() && &magic == QCOW_MAGIC {
            return Err(DriveError::Format {
                id: config.id.clone(),
                format: "qcow2".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cpr-drives-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_spelling_gives_the_same_disk() {
        let p = image("raw", &[0u8; 4096]);
        let path = p.display().to_string();
        let a = parse_disks(
            &strs(&[&format!("file={path},format=raw,if=virtio,serial=abc")]),
            &[],
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].id, "virtio0");
        assert_eq!(a[0].serial, "abc");
        let b = parse_disks(
            &strs(&[&format!("if=none,id=d0,file={path},format=raw,readonly=on")]),
            &[],
            &strs(&["virtio-blk-pci,drive=d0,serial=xyz"]),
            &[],
        )
        .unwrap();
        assert_eq!(
            (b[0].id.as_str(), b[0].read_only, b[0].serial.as_str()),
            ("d0", true, "xyz")
        );
        let c = parse_disks(
            &[],
            &strs(&[&format!("driver=file,node-name=n1,filename={path}")]),
            &strs(&["virtio-blk-pci,drive=n1"]),
            &[],
        )
        .unwrap();
        assert_eq!(c[0].source, DiskSource::Path(p.clone()));
        // libvirt: a file node, a raw node over it, the device on the raw node.
        let d = parse_disks(
            &[],
            &strs(&[
                &format!(r#"{{"driver":"file","filename":"{path}","node-name":"libvirt-1-storage","read-only":false}}"#),
                r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"}"#,
            ]),
            &strs(&["virtio-blk-pci,bus=pci.0,addr=0x4,drive=libvirt-1-format,id=virtio-disk0"]),
            &[],
        )
        .unwrap();
        assert_eq!(d[0].id, "libvirt-1-storage");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn aio_picks_the_io_path_in_both_spellings_and_bad_values_are_refused() {
        let p = image("aio", &[0u8; 4096]);
        let path = p.display().to_string();
        let drive = |aio: &str| {
            parse_disks(
                &strs(&[&format!("file={path},format=raw,if=virtio{aio}")]),
                &[],
                &[],
                &[],
            )
        };
        assert_eq!(drive("").unwrap()[0].aio, AioMode::Auto);
        assert_eq!(drive(",aio=threads").unwrap()[0].aio, AioMode::Threads);
        assert_eq!(drive(",aio=io_uring").unwrap()[0].aio, AioMode::IoUring);
        assert_eq!(drive(",aio=native").unwrap()[0].aio, AioMode::IoUring);
        let e = drive(",aio=posix").unwrap_err().to_string();
        assert!(e.contains("aio=posix") && e.contains("aio=threads"), "{e}");
        let b = parse_disks(
            &[],
            &strs(&[&format!(
                "driver=file,node-name=n1,filename={path},aio=threads"
            )]),
            &strs(&["virtio-blk-pci,drive=n1"]),
            &[],
        )
        .unwrap();
        assert_eq!(b[0].aio, AioMode::Threads);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn cache_modes_and_their_parts_in_every_spelling() {
        let p = image("cache", &[0u8; 4096]);
        let path = p.display().to_string();
        let drive = |opts: &str| {
            parse_disks(
                &strs(&[&format!("file={path},format=raw,if=virtio{opts}")]),
                &[],
                &[],
                &[],
            )
            .map(|d| {
                let c = d[0].cache;
                (c.direct, c.no_flush, c.writeback)
            })
        };
        assert_eq!(drive(""), Ok((false, false, true)));
        assert_eq!(drive(",cache=writeback"), Ok((false, false, true)));
        assert_eq!(drive(",cache=none"), Ok((true, false, true)));
        assert_eq!(drive(",cache=writethrough"), Ok((false, false, false)));
        assert_eq!(drive(",cache=directsync"), Ok((true, false, false)));
        assert_eq!(drive(",cache=unsafe"), Ok((false, true, true)));
        assert_eq!(drive(",cache.direct=on"), Ok((true, false, true)));
        // The parts win over the mode, before or after it.
        assert_eq!(
            drive(",cache=none,cache.direct=off"),
            Ok((false, false, true))
        );
        assert_eq!(
            drive(",cache.no-flush=on,cache=none"),
            Ok((true, true, true))
        );
        let e = drive(",cache=fast").unwrap_err().to_string();
        assert!(
            e.contains("cache=fast") && e.contains("none, writethrough"),
            "{e}"
        );
        // libvirt: the cache object on the file node, the write cache on the device.
        let d = parse_disks(
            &[],
            &strs(&[&format!(
                r#"{{"driver":"file","filename":"{path}","node-name":"s","cache":{{"direct":true,"no-flush":false}}}}"#
            )]),
            &strs(&["virtio-blk-pci,drive=s,write-cache=off"]),
            &[],
        )
        .unwrap();
        assert_eq!(
            d[0].cache,
            CacheMode {
                direct: true,
                no_flush: false,
                writeback: false
            }
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bad_disks_are_refused_with_what_is_wrong() {
        let raw = image("ok", &[0u8; 4096]);
        let qcow = image("qcow", b"QFI\xfb\0\0\0\x03");
        let path = raw.display().to_string();
        let err = |drives: &[&str], devices: &[&str]| {
            parse_disks(&strs(drives), &[], &strs(devices), &[])
                .and_then(|disks| check_images(&disks))
                .unwrap_err()
                .to_string()
        };
        let missing = err(&["file=/nonexistent/disk.img,format=raw"], &[]);
        assert!(missing.contains("No such file"), "{missing}");
        let dir = err(&["file=/tmp,format=raw"], &[]);
        assert!(dir.contains("not a regular file"), "{dir}");
        let fmt = err(&[&format!("file={path},format=qcow2")], &[]);
        assert!(fmt.contains("'qcow2' is not supported"), "{fmt}");
        let probed = err(&[&format!("file={},if=virtio", qcow.display())], &[]);
        assert!(probed.contains("'qcow2'"), "{probed}");
        let nodrive = err(&[], &["virtio-blk-pci,drive=nope"]);
        assert!(nodrive.contains("drive 'nope' does not exist"), "{nodrive}");
        let twice = err(
            &[&format!("if=none,id=d0,file={path},format=raw")],
            &["virtio-blk-pci,drive=d0", "virtio-blk-pci,drive=d0"],
        );
        assert!(twice.contains("used by two devices"), "{twice}");
        let unknown = err(&[], &["e1000,netdev=n0"]);
        assert!(unknown.contains("unknown device"), "{unknown}");
        let noid = err(&[&format!("if=none,file={path}")], &[]);
        assert!(noid.contains("needs id="), "{noid}");
        let nofdset = err(&["file=/dev/fdset/7,format=raw"], &[]);
        assert!(nofdset.contains("no -add-fd"), "{nofdset}");
        let badfd = parse_disks(&[], &[], &[], &strs(&["fd=999,set=1"])).unwrap_err();
        assert_eq!(badfd, DriveError::FdNotOpen(999));
        // An fd that is not a disk (here a socket) passed with -add-fd.
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let socket_disk = parse_disks(
            &strs(&["file=/dev/fdset/3,format=raw,if=virtio"]),
            &[],
            &[],
            &strs(&[&format!("fd={fd},set=3")]),
        )
        .and_then(|disks| check_images(&disks))
        .unwrap_err()
        .to_string();
        assert!(socket_disk.contains("not a regular file"), "{socket_disk}");
        std::fs::remove_file(raw).unwrap();
        std::fs::remove_file(qcow).unwrap();
    }
}
