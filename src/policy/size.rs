//! Sizes in policies: plain integer bytes, or a string with a K/M/G/T (powers of 1024) suffix,
//! also written KiB/MiB/GiB/TiB. "512M" = 512 MiB. Decimal units (MB) are refused as ambiguous.

const UNITS: &[(&str, u32)] =
    &[("B", 0), ("K", 10), ("KiB", 10), ("M", 20), ("MiB", 20), ("G", 30), ("GiB", 30), ("T", 40), ("TiB", 40)];

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
    let shift =
        if unit.is_empty() { 0 } else { UNITS.iter().find(|(u, _)| *u == unit).map(|(_, sh)| *sh).ok_or_else(bad)? };
    let n: u64 = num.parse().map_err(|_| format!("size `{s}` is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size `{s}` is too large"))
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

/// Parse cores' worth of CPU time ("1.0", "0.25", "2") into thousandths of a core. At least
/// 0.01 (the kernel's smallest quota is 1 ms per 100 ms period), at most 4096 cores.
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid cpu `{s}`: use a number of cores such as \"1.0\" or \"0.5\" (at most 3 decimals)");
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 3
    {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let milli: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    let n = whole.checked_mul(1000).and_then(|w| w.checked_add(milli)).ok_or_else(bad)?;
    if !(10..=4_096_000).contains(&n) {
        return Err(format!("cpu `{s}` is out of range: between 0.01 and 4096 cores"));
    }
    Ok(n as u32)
}

/// Thousandths of a core as written in a policy: 1500 -> "1.5", 1000 -> "1.0".
pub fn format_cpu(milli: u32) -> String {
    let frac = format!("{:03}", milli % 1000);
    let frac = frac.trim_end_matches('0');
    format!("{}.{}", milli / 1000, if frac.is_empty() { "0" } else { frac })
}
