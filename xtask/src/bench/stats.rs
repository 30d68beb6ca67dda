//! Statistics and number formatting.

pub(super) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        n => s[n / 2],
    }
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// "median (min–max)" of `v × scale`.
pub(super) fn spread(v: &[f64], scale: f64, decimals: usize) -> String {
    if v.is_empty() {
        return "n/a".to_owned();
    }
    let (lo, hi) = min_max(v);
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        median(v) * scale,
        lo * scale,
        hi * scale,
        d = decimals
    )
}

/// Ratios as overheads: "+0.4 % (−1.2 … +2.0)".
pub(super) fn overhead_spread(ratios: &[f64]) -> String {
    let (lo, hi) = min_max(ratios);
    let pct = |r: f64| {
        let v = (r - 1.0) * 100.0;
        if v < 0.0 {
            format!("−{:.1} %", -v)
        } else {
            format!("+{v:.1} %")
        }
    };
    format!("{} ({} … {})", pct(median(ratios)), pct(lo), pct(hi))
}

pub(super) fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 25.0);
        assert_eq!(percentile(&v, 99.0), 50.0);
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 2.5);
        assert_eq!(
            overhead_spread(&[1.004, 0.99, 1.02]),
            "+0.4 % (−1.0 % … +2.0 %)"
        );
    }
}
