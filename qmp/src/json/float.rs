//! Doubles printed like C's `printf("%.17g")`, which QEMU uses.

/// Formats `x` as `%.17g` does (finite values only).
pub(crate) fn format_g17(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..17).contains(&exp) {
        let decimals = usize::try_from(16 - exp).unwrap_or(0);
        strip_zeros(&format!("{x:.decimals$}")).to_string()
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_zeros(mantissa), exp.unsigned_abs())
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::format_g17;

    #[test]
    fn matches_printf() {
        // Expected strings observed from QEMU 7.2.
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(-0.0), "-0");
        assert_eq!(format_g17(2.0), "2");
        assert_eq!(format_g17(1e20), "1e+20");
        assert_eq!(format_g17(1e16), "10000000000000000");
        assert_eq!(format_g17(1e17), "1e+17");
        assert_eq!(format_g17(1.2345678901234568e23), "1.2345678901234569e+23");
        assert_eq!(
            format_g17(-9223372036854775809.0),
            "-9.2233720368547758e+18"
        );
        assert_eq!(format_g17(1.5e-7), "1.4999999999999999e-07");
        assert_eq!(format_g17(0.0001), "0.0001");
        assert_eq!(format_g17(1.5), "1.5");
        assert_eq!(format_g17(f64::MAX), "1.7976931348623157e+308");
        assert_eq!(format_g17(5e-324), "4.9406564584124654e-324");
    }
}
