//! What every bench prints its figures with (each bench includes this with `mod support;`).
#![allow(dead_code)]

use std::time::Duration;

/// The median (the upper one of an even count); sorts `v` in place, so `v[0]` and
/// `v[v.len() - 1]` are the minimum and maximum afterwards.
pub fn median<T: PartialOrd + Copy>(v: &mut [T]) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The 1, 5 and 15 minute load averages: single runs here vary 2-4x with the load.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
