//! NICs on the command line, in QEMU's spellings:
//!
//! - `-netdev tap,id=ID,ifname=NAME,script=no,downscript=no`: the VMM opens /dev/net/tun and
//!   attaches to the tap NAME (created if it does not exist); scripts are not run;
//! - `-netdev tap,id=ID,fd=N`: a tap the management layer opened and passed (libvirt's way);
//! - `-device virtio-net-pci,netdev=ID[,mac=52:54:00:xx:xx:xx][,id=NAME]`;
//! - `-nic tap,...[,model=virtio-net-pci][,mac=...]`: a netdev and its device in one.
//!
//! The spelling is checked here ([`parse_nics`]): every device names a netdev that exists, no
//! two devices share one, MACs parse, scripts are refused. The taps themselves are checked by
//! [`check_taps`] before a VMM that opens them starts (a boot, a restore from a file): a live
//! update's new VMM and a cpr-transfer receiver never open a tap, they take the one handed over.

use crate::devices::virtio::net::{DEFAULT_MAC, NetConfig, TapSource};
use crate::devices::virtio::tap::TapError;

use super::drives::{DriveError, split_options};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NicError {
    #[error("{0}")]
    Syntax(#[from] DriveError),
    #[error("invalid {option} '{spec}': {detail}")]
    Invalid {
        option: &'static str,
        spec: String,
        detail: String,
    },
    #[error(
        "{option} '{spec}': script={script} is not supported: set up the tap beforehand and give script=no,downscript=no (or pass it with fd=N)"
    )]
    Script {
        option: &'static str,
        spec: String,
        script: String,
    },
    #[error(
        "-device {device}: netdev '{netdev}' does not exist (give it with -netdev tap,id={netdev},...)"
    )]
    NoSuchNetdev { device: String, netdev: String },
    #[error("netdev '{0}' is used by two devices")]
    NetdevInUse(String),
    #[error("two netdevs are both named '{0}'")]
    DuplicateId(String),
    #[error("MAC address '{0}' does not parse: use six hex bytes such as 52:54:00:12:34:56")]
    BadMac(String),
    #[error("MAC address '{0}' is a multicast address: the first byte must be even")]
    MulticastMac(String),
    #[error("too many devices: PCI bus 0 has room for {0} disks and NICs together")]
    TooMany(usize),
    #[error("netdev '{netdev}': {source}")]
    Tap {
        netdev: String,
        #[source]
        source: TapErrorText,
    },
}

/// A tap error as text (so that [`NicError`] compares in tests).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TapErrorText(String);

impl From<TapError> for TapErrorText {
    fn from(e: TapError) -> Self {
        TapErrorText(e.to_string())
    }
}

/// PCI slots 1-31 are shared by disks and NICs.
const MAX_PCI_FUNCTIONS: usize = 31;

/// A `-device virtio-net-pci` (or `-nic`) before its netdev is looked up.
struct NicDevice {
    netdev: String,
    mac: Option<[u8; 6]>,
    id: Option<String>,
    /// The option as given, for errors.
    spec: String,
}

#[derive(Debug, Clone)]
struct Netdev {
    id: String,
    source: TapSource,
}

/// The NICs the command line asks for, in the order their devices appear (`-nic` first).
/// `device_specs` are the `-device` values that name a virtio-net device.
pub fn parse_nics(
    netdevs: &[String],
    device_specs: &[String],
    nic_specs: &[String],
    disk_count: usize,
) -> Result<Vec<NetConfig>, NicError> {
    let mut backends: Vec<Netdev> = Vec::new();
    let mut wanted: Vec<NicDevice> = Vec::new();
    for (n, spec) in nic_specs.iter().enumerate() {
        let (netdev, mac) = parse_nic(spec, n)?;
        wanted.push(NicDevice {
            netdev: netdev.id.clone(),
            mac,
            id: None,
            spec: format!("-nic {spec}"),
        });
        push_unique(&mut backends, netdev)?;
    }
    for spec in netdevs {
        push_unique(&mut backends, parse_netdev("-netdev", spec)?)?;
    }
    for spec in device_specs {
        wanted.push(parse_device(spec)?);
    }
    let mut out: Vec<NetConfig> = Vec::new();
    for (index, nic) in wanted.into_iter().enumerate() {
        let NicDevice {
            netdev,
            mac,
            id,
            spec,
        } = nic;
        let Some(backend) = backends.iter().find(|b| b.id == netdev) else {
            return Err(NicError::NoSuchNetdev {
                device: spec,
                netdev,
            });
        };
        if out.iter().any(|c| c.netdev == netdev) {
            return Err(NicError::NetdevInUse(netdev));
        }
        let mut default = DEFAULT_MAC;
        default[5] = default[5].wrapping_add(index as u8);
        out.push(NetConfig {
            device_id: id.unwrap_or_else(|| format!("net{index}")),
            netdev,
            source: backend.source.clone(),
            mac: mac.unwrap_or(default),
        });
    }
    for b in &backends {
        if !out.iter().any(|c| c.netdev == b.id) {
            log::warn!("netdev '{}' is not attached to any device", b.id);
        }
    }
    if disk_count + out.len() > MAX_PCI_FUNCTIONS {
        return Err(NicError::TooMany(MAX_PCI_FUNCTIONS));
    }
    Ok(out)
}

/// Whether a `-device` value is a NIC (the others are disks).
pub fn is_nic_device(spec: &str) -> bool {
    let driver = spec.split(',').next().unwrap_or("");
    matches!(driver, "virtio-net-pci" | "virtio-net")
}

fn push_unique(list: &mut Vec<Netdev>, d: Netdev) -> Result<(), NicError> {
    if list.iter().any(|o| o.id == d.id) {
        return Err(NicError::DuplicateId(d.id));
    }
    list.push(d);
    Ok(())
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], NicError> {
    let bad = || NicError::BadMac(text.to_string());
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(NicError::MulticastMac(text.to_string()));
    }
    Ok(mac)
}

/// The tap options shared by `-netdev tap,...` and `-nic tap,...`; returns the netdev and the
/// options it did not know (for `-nic`'s own).
fn parse_tap(
    option: &'static str,
    spec: &str,
    pairs: Vec<(String, String)>,
    default_id: Option<String>,
) -> Result<(Netdev, Vec<(String, String)>), NicError> {
    let bad = |detail: String| NicError::Invalid {
        option,
        spec: spec.to_string(),
        detail,
    };
    let mut id = default_id;
    let mut ifname = None;
    let mut fd = None;
    let mut rest = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "id" => id = Some(v),
            "ifname" => ifname = Some(v),
            "fd" => {
                fd = Some(
                    v.parse::<i32>()
                        .map_err(|_| bad(format!("fd={v}: not a number")))?,
                )
            }
            "script" | "downscript" => {
                if v != "no" {
                    return Err(NicError::Script {
                        option,
                        spec: spec.to_string(),
                        script: v,
                    });
                }
            }
            "vhost" => {
                if v != "off" {
                    return Err(bad(format!(
                        "vhost={v}: there is no vhost-net here; leave it out or use vhost=off"
                    )));
                }
            }
            "vnet_hdr" => {
                if v == "off" {
                    return Err(bad("vnet_hdr=off: the device needs the vnet header".into()));
                }
            }
            "queues" => {
                if v != "1" {
                    return Err(bad(format!("queues={v}: one queue pair is supported")));
                }
            }
            "sndbuf" => {}
            _ => rest.push((k, v)),
        }
    }
    let id = id.ok_or_else(|| bad("id= is missing".into()))?;
    let source = match (ifname, fd) {
        (Some(_), Some(_)) => return Err(bad("give either ifname= or fd=, not both".into())),
        (Some(name), None) => TapSource::Ifname(name),
        (None, Some(fd)) => TapSource::Fd(fd),
        (None, None) => {
            return Err(bad(
                "ifname=NAME (a tap the VMM opens) or fd=N (a tap opened for it) is missing".into(),
            ));
        }
    };
    Ok((Netdev { id, source }, rest))
}

fn backend_type<'a>(option: &'static str, spec: &'a str) -> Result<(&'a str, &'a str), NicError> {
    let (kind, rest) = spec.split_once(',').unwrap_or((spec, ""));
    if kind != "tap" {
        return Err(NicError::Invalid {
            option,
            spec: spec.to_string(),
            detail: format!("'{kind}': the only network backend is tap"),
        });
    }
    Ok((kind, rest))
}

fn parse_netdev(option: &'static str, spec: &str) -> Result<Netdev, NicError> {
    let (_, rest) = backend_type(option, spec)?;
    let (netdev, unknown) = parse_tap(option, spec, split_options(option, rest)?, None)?;
    if let Some((k, _)) = unknown.first() {
        return Err(NicError::Invalid {
            option,
            spec: spec.to_string(),
            detail: format!("unknown option '{k}'"),
        });
    }
    Ok(netdev)
}

/// `-nic tap,...[,model=virtio-net-pci][,mac=]`: the netdev and the device's MAC.
fn parse_nic(spec: &str, index: usize) -> Result<(Netdev, Option<[u8; 6]>), NicError> {
    let option = "-nic";
    let (_, rest) = backend_type(option, spec)?;
    let (netdev, unknown) = parse_tap(
        option,
        spec,
        split_options(option, rest)?,
        Some(format!("nic{index}")),
    )?;
    let mut mac = None;
    for (k, v) in unknown {
        match k.as_str() {
            "mac" => mac = Some(parse_mac(&v)?),
            "model" => {
                if !matches!(v.as_str(), "virtio-net-pci" | "virtio-net" | "virtio") {
                    return Err(NicError::Invalid {
                        option,
                        spec: spec.to_string(),
                        detail: format!("model={v}: the only model is virtio-net-pci"),
                    });
                }
            }
            other => {
                return Err(NicError::Invalid {
                    option,
                    spec: spec.to_string(),
                    detail: format!("unknown option '{other}'"),
                });
            }
        }
    }
    Ok((netdev, mac))
}

/// `-device virtio-net-pci,netdev=ID[,mac=..][,id=..]`.
fn parse_device(spec: &str) -> Result<NicDevice, NicError> {
    let option = "-device";
    let rest = spec.split_once(',').map_or("", |(_, r)| r);
    let mut netdev = None;
    let mut mac = None;
    let mut id = None;
    for (k, v) in split_options(option, rest)? {
        match k.as_str() {
            "netdev" => netdev = Some(v),
            "mac" => mac = Some(parse_mac(&v)?),
            "id" => id = Some(v),
            "addr" | "bus" | "romfile" | "bootindex" | "mq" | "vectors" | "rx_queue_size"
            | "tx_queue_size" | "host_mtu" => {}
            other => {
                return Err(NicError::Invalid {
                    option,
                    spec: spec.to_string(),
                    detail: format!("unknown option '{other}'"),
                });
            }
        }
    }
    let netdev = netdev.ok_or_else(|| NicError::Invalid {
        option,
        spec: spec.to_string(),
        detail: "netdev= is missing".into(),
    })?;
    Ok(NicDevice {
        netdev,
        mac,
        id,
        spec: spec.to_string(),
    })
}

/// Opens every tap as its device will (a boot, a restore from a file) and closes it again:
/// /dev/net/tun is usable, the named tap can be attached, a passed fd is a tap.
pub fn check_taps(nics: &[NetConfig]) -> Result<(), NicError> {
    for nic in nics {
        nic.open().map_err(|e| NicError::Tap {
            netdev: nic.netdev.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_spelling_gives_the_same_nic() {
        let long = parse_nics(
            &strs(&["tap,id=n0,ifname=tap7,script=no,downscript=no"]),
            &strs(&["virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,id=eth0"]),
            &[],
            0,
        )
        .unwrap();
        assert_eq!(
            long,
            [NetConfig {
                netdev: "n0".into(),
                device_id: "eth0".into(),
                source: TapSource::Ifname("tap7".into()),
                mac: [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc],
            }]
        );
        let short = parse_nics(
            &[],
            &[],
            &strs(&["tap,id=n0,ifname=tap7,script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:aa:bb:cc"]),
            0,
        )
        .unwrap();
        assert_eq!(short[0].source, long[0].source);
        assert_eq!(short[0].mac, long[0].mac);
        let fd = parse_nics(
            &strs(&["tap,id=n1,fd=5"]),
            &strs(&["virtio-net-pci,netdev=n1"]),
            &[],
            0,
        )
        .unwrap();
        assert_eq!(fd[0].source, TapSource::Fd(5));
        assert_eq!(fd[0].mac, DEFAULT_MAC, "QEMU's default MAC");
        let two = parse_nics(
            &strs(&["tap,id=a,ifname=ta", "tap,id=b,ifname=tb"]),
            &strs(&["virtio-net-pci,netdev=a", "virtio-net,netdev=b"]),
            &[],
            2,
        )
        .unwrap();
        assert_eq!(
            two[1].mac[5], 0x57,
            "the second NIC's default MAC is the next one"
        );
        assert!(is_nic_device("virtio-net-pci,netdev=a"));
        assert!(!is_nic_device("virtio-blk-pci,drive=a"));
    }

    #[test]
    fn bad_nics_are_refused_with_what_is_wrong() {
        let err = |netdevs: &[&str], devices: &[&str], nics: &[&str]| {
            parse_nics(&strs(netdevs), &strs(devices), &strs(nics), 0)
                .unwrap_err()
                .to_string()
        };
        let e = err(&["tap,id=n0,ifname=t0"], &["virtio-net-pci,netdev=n9"], &[]);
        assert!(e.contains("netdev 'n9' does not exist"), "{e}");
        let e = err(
            &["tap,id=n0,ifname=t0"],
            &["virtio-net-pci,netdev=n0", "virtio-net-pci,netdev=n0"],
            &[],
        );
        assert!(e.contains("used by two devices"), "{e}");
        let e = err(
            &["tap,id=n0,ifname=t0"],
            &["virtio-net-pci,netdev=n0,mac=52:54:zz:00:00:01"],
            &[],
        );
        assert!(e.contains("does not parse"), "{e}");
        let e = err(
            &["tap,id=n0,ifname=t0"],
            &["virtio-net-pci,netdev=n0,mac=01:00:5e:00:00:01"],
            &[],
        );
        assert!(e.contains("multicast"), "{e}");
        let e = err(&["tap,id=n0,ifname=t0,script=/etc/qemu-ifup"], &[], &[]);
        assert!(e.contains("not supported"), "{e}");
        let e = err(&["user,id=n0"], &[], &[]);
        assert!(e.contains("only network backend is tap"), "{e}");
        let e = err(&["tap,id=n0"], &[], &[]);
        assert!(e.contains("ifname=NAME"), "{e}");
        let e = err(&["tap,id=n0,ifname=a,fd=3"], &[], &[]);
        assert!(e.contains("not both"), "{e}");
        let e = err(&["tap,id=n0,ifname=a", "tap,id=n0,ifname=b"], &[], &[]);
        assert!(e.contains("both named"), "{e}");
        let e = err(&[], &[], &["tap,ifname=a,model=e1000"]);
        assert!(e.contains("virtio-net-pci"), "{e}");
        let e = parse_nics(
            &strs(&["tap,id=n0,ifname=a"]),
            &strs(&["virtio-net-pci,netdev=n0"]),
            &[],
            31,
        )
        .unwrap_err();
        assert_eq!(e, NicError::TooMany(31));
    }
}
