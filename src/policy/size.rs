//! Sizes in policies: plain integer bytes, or a string with a K/M/G/T (powers of 1024) suffix,
//! also written KiB/MiB/GiB/TiB. "512M" = 512 MiB. Decimal units (MB) are refused as ambiguous.

const UNITS: &[(&str, u32)] = &[
    ("B", 0),
    ("K", 10),
    ("KiB", 10),
    ("M", 20),
    ("MiB", 20),
    ("G", 30),
    ("GiB", 30),
    ("T", 40),
    ("TiB", 40),
];

/// Parse a size string ("64M", "1GiB", "4096"). The error is a sentence without location.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size `{s}`: use bytes or a number with a K, M, G or T suffix \
             (or KiB, MiB, GiB, TiB; powers of 1024), e.g. \"512M\""
        )
    };
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = if unit.is_empty() {
        0
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, sh)| *sh)
            .ok_or_else(bad)?
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size `{s}` is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Bytes in the largest unit that divides them exactly: 1073741824 -> "1G", 1000 -> "1000".
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0".into();
    }
    for (suffix, shift) in [("T", 40u32), ("G", 30), ("M", 20), ("K", 10)] {
        let unit = 1u64 << shift;
        if n.is_multiple_of(unit) {
            return format!("{}{}", n / unit, suffix);
        }
    }
    n.to_string()
}
