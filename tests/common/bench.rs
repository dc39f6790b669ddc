//! Helpers shared by the benchmarks that compare Skiff with QEMU.

use std::borrow::Borrow;
use std::process::{Command, Stdio};

/// The first line of `qemu-system-x86_64 --version`, or `None` when QEMU is not installed
/// (the benchmarks then skip its columns).
pub fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// `values` in ascending order.
pub fn sorted<I>(values: I) -> Vec<f64>
where
    I: IntoIterator,
    I::Item: Borrow<f64>,
{
    let mut v: Vec<f64> = values.into_iter().map(|x| *x.borrow()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The median of `values` (the upper one of an even count); panics when there are none.
pub fn median<I>(values: I) -> f64
where
    I: IntoIterator,
    I::Item: Borrow<f64>,
{
    let v = sorted(values);
    v[v.len() / 2]
}
