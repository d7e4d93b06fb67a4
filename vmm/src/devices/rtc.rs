//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! Enough for a guest's wall clock: registers 0x00..=0x09 read the host's UTC time (plus an
//! offset the guest sets by writing them), in BCD or binary and in 24- or 12-hour form as
//! register B selects; register A never shows an update in progress; register D reports a good
//! battery; registers 0x0e..=0x7f are plain battery-backed RAM. Bit 7 of an index write is the
//! NMI mask on a PC and is ignored. There is no interrupt line (periodic, alarm and update
//! interrupts are not generated; register C always reads 0).
//!
//! Register it with `len` [`RTC_PORT_COUNT`] at [`RTC_BASE_PORT`].
//!
//! Saved state ([`RtcSnapshot`]): the index register, all 128 CMOS bytes (the time registers'
//! slots hold nothing: time is read live) and the guest's offset from host time, so a guest that
//! set its RTC keeps its setting across a live update.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{DeviceContext, DeviceError, Persist, PioDevice, VmRequest};

/// The index port; the data port follows it.
pub const RTC_BASE_PORT: u16 = 0x70;
/// Ports 0x70 (index) and 0x71 (data).
pub const RTC_PORT_COUNT: u16 = 2;

const INDEX_OFFSET: u16 = 0;
const DATA_OFFSET: u16 = 1;

/// Bytes of CMOS (registers and RAM).
pub const CMOS_SIZE: usize = 128;
/// Index bit 7 masks NMIs on a PC; not part of the index.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// Register A: bit 7 update in progress (never set here), divider 010 (32.768 kHz time base),
/// rate 0110 (1024 Hz).
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
/// Register B: bit 2 binary (else BCD), bit 1 24-hour (else 12-hour). Default: BCD, 24-hour.
const REG_B_BINARY: u8 = 1 << 2;
const REG_B_24H: u8 = 1 << 1;
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register D: bit 7 valid RAM and time (battery good).
const REG_D_VALID: u8 = 0x80;
/// 12-hour mode: bit 7 of the hours register means PM.
const HOURS_PM: u8 = 0x80;

/// Seconds since the Unix epoch, UTC.
pub type Clock = fn() -> i64;

fn host_clock() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The RTC's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcSnapshot {
    /// The selected register (0..=0x7f).
    pub index: u8,
    /// All [`CMOS_SIZE`] bytes: alarms, registers A and B, and the RAM at 0x0e..=0x7f.
    pub cmos: Vec<u8>,
    /// Guest time minus host time, in seconds (non-zero once the guest set the clock).
    pub offset_secs: i64,
}

/// The CMOS RTC.
pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    offset_secs: i64,
    clock: Clock,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("index", &self.index)
            .field("offset_secs", &self.offset_secs)
            .finish_non_exhaustive()
    }
}

impl Rtc {
    /// An RTC that follows the host's UTC clock, with zeroed RAM.
    pub fn new() -> Self {
        Self::with_clock(host_clock)
    }

    /// An RTC over another clock (for tests).
    pub fn with_clock(clock: Clock) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos[usize::from(REG_B)] = REG_B_DEFAULT;
        cmos[usize::from(REG_D)] = REG_D_VALID;
        Rtc {
            index: 0,
            cmos,
            offset_secs: 0,
            clock,
        }
    }

    fn snapshot(&self) -> RtcSnapshot {
        RtcSnapshot {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset_secs: self.offset_secs,
        }
    }

    /// Rebuilds the RTC from a snapshot; fails if the CMOS image is not [`CMOS_SIZE`] bytes.
    fn from_snapshot(snap: &RtcSnapshot) -> Result<Self, DeviceError> {
        Self::from_snapshot_with_clock(snap, host_clock)
    }

    /// [`from_snapshot`](Self::from_snapshot) over another clock (for tests).
    fn from_snapshot_with_clock(snap: &RtcSnapshot, clock: Clock) -> Result<Self, DeviceError> {
        let cmos: [u8; CMOS_SIZE] = snap.cmos.as_slice().try_into().map_err(|_| {
            DeviceError::InvalidState(format!(
                "RTC state has {} CMOS bytes, expected {CMOS_SIZE}",
                snap.cmos.len()
            ))
        })?;
        Ok(Rtc {
            index: snap.index & INDEX_MASK,
            cmos,
            offset_secs: snap.offset_secs,
            clock,
        })
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)().saturating_add(self.offset_secs))
    }

    fn binary(&self) -> bool {
        self.cmos[usize::from(REG_B)] & REG_B_BINARY != 0
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, raw: u8) -> u8 {
        if self.binary() {
            raw
        } else {
            (raw >> 4).saturating_mul(10).saturating_add(raw & 0x0f)
        }
    }

    fn encode_hours(&self, hour: u8) -> u8 {
        if self.cmos[usize::from(REG_B)] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hours(&self, raw: u8) -> u8 {
        if self.cmos[usize::from(REG_B)] & REG_B_24H != 0 {
            return self.decode(raw);
        }
        let h12 = self.decode(raw & !HOURS_PM) % 12;
        if raw & HOURS_PM != 0 { h12 + 12 } else { h12 }
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let now = self.now();
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hours(now.hour),
            REG_WEEKDAY => self.encode(now.weekday),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode((now.year.rem_euclid(100)) as u8),
            REG_A => self.cmos[usize::from(REG_A)] & !REG_A_UIP,
            // Reading C acknowledges interrupts; none are ever raised.
            REG_C => 0,
            REG_D => REG_D_VALID,
            _ => self.cmos[usize::from(index)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR => {
                self.set_time_field(index, value)
            }
            // The weekday follows from the date.
            REG_WEEKDAY => {}
            REG_A => self.cmos[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_C | REG_D => {}
            // Alarms, register B and RAM are stored as written.
            _ => self.cmos[usize::from(index)] = value,
        }
    }

    /// The guest sets one field of the clock: keep the others, move the offset.
    fn set_time_field(&mut self, index: u8, raw: u8) {
        let mut t = self.now();
        match index {
            REG_SECONDS => t.second = self.decode(raw).min(59),
            REG_MINUTES => t.minute = self.decode(raw).min(59),
            REG_HOURS => t.hour = self.decode_hours(raw).min(23),
            REG_DAY => t.day = self.decode(raw).clamp(1, 31),
            REG_MONTH => t.month = self.decode(raw).clamp(1, 12),
            REG_YEAR => {
                // Two digits: 70..=99 are 19xx, 00..=69 are 20xx (as Linux reads them).
                let yy = i64::from(self.decode(raw).min(99));
                t.year = if yy >= 70 { 1900 + yy } else { 2000 + yy };
            }
            _ => return,
        }
        self.offset_secs = t.to_unix().saturating_sub((self.clock)());
    }
}

impl Persist for Rtc {
    type State = RtcSnapshot;
    type Config = ();

    fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(Rtc::new())
    }

    fn save(&self) -> RtcSnapshot {
        self.snapshot()
    }

    fn restore(
        _: &mut DeviceContext<'_>,
        _: &(),
        state: &RtcSnapshot,
    ) -> Result<Self, DeviceError> {
        Rtc::from_snapshot(state)
    }
}

impl PioDevice for Rtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            INDEX_OFFSET => self.index,
            DATA_OFFSET => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest> {
        let &value = data.first()?;
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
        None
    }
}

/// A broken-down UTC time (proleptic Gregorian calendar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u8,
    /// 1..=31
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 (Sunday) ..= 7 (Saturday), as the RTC counts.
    weekday: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (RTC weekday 5).
        let weekday = ((days + 4).rem_euclid(7) + 1) as u8;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

/// Days since 1970-01-01 of a civil date (the well-known era-based conversion).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_EVE: i64 = 1_709_251_198;

    fn fixed_clock() -> i64 {
        LEAP_EVE
    }

    fn read_reg(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[index]);
        let mut b = [0u8; 1];
        rtc.read(DATA_OFFSET, &mut b);
        b[0]
    }

    fn write_reg(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(INDEX_OFFSET, &[index]);
        rtc.write(DATA_OFFSET, &[value]);
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for secs in [
            0,
            LEAP_EVE,
            951_782_400,   // 2000-02-29
            4_107_542_400, // 2100-03-01
            -86_400,       // 1969-12-31
        ] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        let t = DateTime::from_unix(LEAP_EVE);
        assert_eq!((t.year, t.month, t.day), (2024, 2, 29));
        assert_eq!((t.hour, t.minute, t.second), (23, 59, 58));
        assert_eq!(t.weekday, 5, "Thursday");
        assert_eq!(
            DateTime::from_unix(0).weekday,
            5,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn time_registers_read_bcd_24h_by_default() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x58);
        assert_eq!(read_reg(&mut rtc, REG_MINUTES), 0x59);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 0x23);
        assert_eq!(read_reg(&mut rtc, REG_WEEKDAY), 0x05);
        assert_eq!(read_reg(&mut rtc, REG_DAY), 0x29);
        assert_eq!(read_reg(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read_reg(&mut rtc, REG_YEAR), 0x24);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        write_reg(&mut rtc, REG_B, REG_B_BINARY | REG_B_24H);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 58);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 23);
        assert_eq!(read_reg(&mut rtc, REG_YEAR), 24);
        write_reg(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 11 | HOURS_PM);
        write_reg(&mut rtc, REG_B, 0);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 0x11 | HOURS_PM);
    }

    #[test]
    fn status_registers_are_sane() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        assert_eq!(
            read_reg(&mut rtc, REG_A) & REG_A_UIP,
            0,
            "no update in progress"
        );
        assert_eq!(read_reg(&mut rtc, REG_A), REG_A_DEFAULT);
        assert_eq!(read_reg(&mut rtc, REG_B), REG_B_DEFAULT);
        assert_eq!(read_reg(&mut rtc, REG_C), 0);
        assert_eq!(read_reg(&mut rtc, REG_D), REG_D_VALID, "battery good");
        // UIP cannot be set by the guest; D and C ignore writes.
        write_reg(&mut rtc, REG_A, 0xa6);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        write_reg(&mut rtc, REG_D, 0);
        assert_eq!(read_reg(&mut rtc, REG_D), REG_D_VALID);
    }

    #[test]
    fn nmi_bit_is_ignored_and_index_reads_back() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        rtc.write(INDEX_OFFSET, &[0x80 | REG_SECONDS]);
        let mut b = [0u8; 1];
        rtc.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x58);
        rtc.read(INDEX_OFFSET, &mut b);
        assert_eq!(b[0], REG_SECONDS);
    }

    #[test]
    fn ram_bytes_are_stored() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        for index in 0x0e..=0x7f_u8 {
            write_reg(&mut rtc, index, index ^ 0x5a);
        }
        for index in 0x0e..=0x7f_u8 {
            assert_eq!(read_reg(&mut rtc, index), index ^ 0x5a);
        }
        // The alarm registers (0x01, 0x03, 0x05) are stored too.
        write_reg(&mut rtc, 0x01, 0x30);
        assert_eq!(read_reg(&mut rtc, 0x01), 0x30);
    }

    #[test]
    fn guest_can_set_the_clock() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        write_reg(&mut rtc, REG_B, 0x80 | REG_B_24H); // SET: the guest updates the time
        write_reg(&mut rtc, REG_YEAR, 0x25);
        write_reg(&mut rtc, REG_MONTH, 0x03);
        write_reg(&mut rtc, REG_DAY, 0x01);
        write_reg(&mut rtc, REG_HOURS, 0x08);
        write_reg(&mut rtc, REG_MINUTES, 0x30);
        write_reg(&mut rtc, REG_SECONDS, 0x00);
        write_reg(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(read_reg(&mut rtc, REG_YEAR), 0x25);
        assert_eq!(read_reg(&mut rtc, REG_MONTH), 0x03);
        assert_eq!(read_reg(&mut rtc, REG_DAY), 0x01);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 0x08);
        assert_eq!(read_reg(&mut rtc, REG_MINUTES), 0x30);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x00);
        assert_eq!(
            read_reg(&mut rtc, REG_WEEKDAY),
            0x07,
            "2025-03-01 is a Saturday"
        );
        // The setting survives a snapshot.
        let snap = rtc.snapshot();
        let mut restored = Rtc::from_snapshot_with_clock(&snap, fixed_clock).unwrap();
        assert_eq!(read_reg(&mut restored, REG_HOURS), 0x08);
    }

    #[test]
    fn snapshot_round_trips_through_serde_and_rejects_bad_sizes() {
        let mut rtc = Rtc::with_clock(fixed_clock);
        write_reg(&mut rtc, 0x40, 0x99);
        rtc.write(INDEX_OFFSET, &[0x41]);
        let snap = rtc.snapshot();
        assert_eq!(snap.index, 0x41);
        let json = serde_json::to_string(&snap).unwrap();
        let back: RtcSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut restored = Rtc::from_snapshot_with_clock(&back, fixed_clock).unwrap();
        let mut b = [0u8; 1];
        restored.read(INDEX_OFFSET, &mut b);
        assert_eq!(b[0], 0x41);
        assert_eq!(read_reg(&mut restored, 0x40), 0x99);

        let short = RtcSnapshot {
            cmos: vec![0; 64],
            ..snap
        };
        let err = Rtc::from_snapshot(&short).unwrap_err().to_string();
        assert!(err.contains("64 CMOS bytes"), "{err}");
    }

    #[test]
    fn host_clock_is_sane() {
        let mut rtc = Rtc::new();
        let year = read_reg(&mut rtc, REG_YEAR);
        assert!(year >> 4 <= 9 && year & 0xf <= 9, "BCD year {year:#x}");
        assert!(host_clock() > 1_700_000_000);
    }
}
