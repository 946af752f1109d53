//! Parsing of Kubernetes quantities (`512Mi`, `8Gi`, `1.5G`, `100`) into
//! whole numbers, for sizes the schema accepted as strings.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Why a quantity could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl std::fmt::Display for QuantityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid quantity {:?}: expected a number with an optional suffix such as Mi, Gi or G",
            self.0
        )
    }
}

impl std::error::Error for QuantityError {}

/// The value of a quantity in base units (bytes for memory and disks),
/// rounded up to a whole unit. Negative values are refused.
pub fn parse_quantity(q: &Quantity) -> Result<u64, QuantityError> {
    parse_str(&q.0)
}

/// [`parse_quantity`] on a plain string.
pub fn parse_str(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError(s.to_string());
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') && num.len() == 1 {
        return Err(err());
    }
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    let int_part = int_part.trim_start_matches('+');
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(err());
    }
    // multiplier as (numerator, power-of-ten exponent) so decimals stay exact
    let (mult, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let e = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i32>().ok())
                .ok_or_else(err)?;
            (1, e)
        }
    };
    let digits: String = format!("{int_part}{frac_part}");
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| err())?
    };
    let exp = exp10 - frac_part.len() as i32;
    let mut value = mantissa.checked_mul(mult).ok_or_else(err)?;
    if exp >= 0 {
        value = value
            .checked_mul(10u128.checked_pow(exp as u32).ok_or_else(err)?)
            .ok_or_else(err)?;
    } else {
        let div = 10u128.checked_pow((-exp) as u32).ok_or_else(err)?;
        value = value.div_ceil(div);
    }
    u64::try_from(value).map_err(|_| err())
}

/// Bytes to whole MiB, rounded up.
pub fn bytes_to_mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_str("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_str("8Gi").unwrap(), 8 << 30);
        assert_eq!(parse_str("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_str("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_str("100").unwrap(), 100);
        assert_eq!(parse_str("1e3").unwrap(), 1000);
        assert_eq!(parse_str("1500m").unwrap(), 2);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "Gi", "-1Gi", "1.2.3", "1Xi", "abc", "1e999"] {
            assert!(parse_str(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn mib_rounds_up() {
        assert_eq!(bytes_to_mib(1), 1);
        assert_eq!(bytes_to_mib(1 << 20), 1);
        assert_eq!(bytes_to_mib((1 << 20) + 1), 2);
    }
}
