//! Summaries of timing samples, the same way in every benchmark and in the soak.

use serde_json::{Value, json};

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `{min, median, p99 (nearest rank), max, n}` of `v`; `null` when empty.
pub fn summary(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    json!({"min": s[0], "median": median(&s), "p99": rank(0.99), "max": s[s.len() - 1], "n": s.len()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p99() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = summary(&v);
        assert_eq!(
            (s["min"].as_f64(), s["p99"].as_f64(), s["max"].as_f64()),
            (Some(1.0), Some(198.0), Some(200.0))
        );
        assert!(summary(&[]).is_null());
    }
}
