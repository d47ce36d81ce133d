//! Small helpers: number and time formatting, natural ordering, timestamps.
use std::cmp::Ordering;

/// `12.5s`, `3m 05s`, `2h 04m`.
pub fn human_time(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 60.0 {
        return if secs < 10.0 { format!("{secs:.2}s") } else { format!("{secs:.1}s") };
    }
    let s = secs.round() as u64;
    if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// `950`, `9.57k`, `1.23M`: three significant digits for large numbers.
pub fn compact(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    let (v, suffix) = if a >= 1e9 {
        (x / 1e9, "G")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let va = v.abs();
    let s = if va >= 100.0 {
        format!("{v:.0}")
    } else if va >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{s}{suffix}")
}

/// A float with up to `max_dec` decimals, trailing zeros removed.
pub fn trim_float(x: f64, max_dec: usize) -> String {
    let s = format!("{x:.max_dec$}");
    if s.contains('.') {
        let t = s.trim_end_matches('0').trim_end_matches('.');
        if t == "-0" {
            "0".into()
        } else {
            t.to_string()
        }
    } else {
        s
    }
}

/// A general float for tables: 4 significant digits, scientific when tiny or huge.
pub fn general(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{x:.3e}");
    }
    let digits = (a.log10().floor() as i32).max(-3);
    let dec = (3 - digits).clamp(0, 6) as usize;
    trim_float(x, dec)
}

/// Axis tick text: decimals chosen from the tick spacing `step`.
pub fn tick(x: f64, step: f64) -> String {
    if x.abs() >= 1e4 {
        return compact(x);
    }
    let dec = if step > 0.0 && step.is_finite() { (-(step.log10().floor()) as i32).clamp(0, 6) } else { 2 };
    trim_float(x, dec as usize)
}

/// Compare strings so that embedded numbers sort by value (`seed2` < `seed10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut ai, mut bi) = (a.chars().peekable(), b.chars().peekable());
    loop {
        match (ai.peek().copied(), bi.peek().copied()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let mut na = String::new();
                while let Some(c) = ai.peek().copied().filter(char::is_ascii_digit) {
                    na.push(c);
                    ai.next();
                }
                let mut nb = String::new();
                while let Some(c) = bi.peek().copied().filter(char::is_ascii_digit) {
                    nb.push(c);
                    bi.next();
                }
                let (ta, tb) = (na.trim_start_matches('0'), nb.trim_start_matches('0'));
                let o = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if o != Ordering::Equal {
                    return o;
                }
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                ai.next();
                bi.next();
            }
        }
    }
}

/// Text made safe inside HTML elements (`&`, `<`, `>` escaped).
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SSZ` without a date crate.
pub fn now_iso() -> String {
    iso_utc(since_epoch(), false)
}

/// Time since 1970-01-01 UTC (zero if the clock is before it).
pub fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// `t` after the epoch as `YYYY-MM-DDTHH:MM:SSZ`, or with `micros`
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (Jupyter's message dates).
pub fn iso_utc(t: std::time::Duration, micros: bool) -> String {
    let secs = t.as_secs();
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let frac = if micros { format!(".{:06}", t.subsec_micros()) } else { String::new() };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}{frac}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        let t = std::time::Duration::from_millis(1_000_000_000_250);
        assert_eq!(iso_utc(t, false), "2001-09-09T01:46:40Z");
        assert_eq!(iso_utc(t, true), "2001-09-09T01:46:40.250000Z");
        assert_eq!(iso_utc(std::time::Duration::from_secs(951_782_400), false), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn formats() {
        assert_eq!(human_time(5.0), "5.00s");
        assert_eq!(human_time(12.54), "12.5s");
        assert_eq!(human_time(185.0), "3m 05s");
        assert_eq!(human_time(7440.0), "2h 04m");
        assert_eq!(compact(9571.6), "9.57k");
        assert_eq!(compact(123456.0), "123k");
        assert_eq!(compact(950.0), "950");
        assert_eq!(trim_float(0.5000, 3), "0.5");
        assert_eq!(general(0.29585898), "0.2959");
        assert_eq!(general(1234.5678), "1235");
        assert_eq!(tick(0.25, 0.05), "0.25");
        assert_eq!(tick(3000.0, 500.0), "3000");
        assert_eq!(natural_cmp("seed2", "seed10"), Ordering::Less);
        assert_eq!(natural_cmp("a_70", "a_9"), Ordering::Greater);
        assert_eq!(now_iso().len(), 20);
    }
}
