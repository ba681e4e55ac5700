//! Application versions as vendors write them (`2027`, `2027.1`, `12.0.3b`), ordered the
//! way people read them: component by component, numbers numerically.

use std::cmp::Ordering;

/// Compares two dotted versions. Numeric parts compare as numbers (`2027.10` is above
/// `2027.9`), missing parts count as zero (`2027` equals `2027.0`), and a text part sorts
/// above a number (`12.0b` above `12.0.1`), which keeps pre-release labels conservative.
pub fn compare(a: &str, b: &str) -> Ordering {
    let pa: Vec<&str> = a.trim().split(['.', '-']).collect();
    let pb: Vec<&str> = b.trim().split(['.', '-']).collect();
    for i in 0..pa.len().max(pb.len()) {
        let x = pa.get(i).copied().unwrap_or("0");
        let y = pb.get(i).copied().unwrap_or("0");
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

/// True if `version` is not above `ceiling`.
pub fn within(version: &str, ceiling: &str) -> bool {
    compare(version, ceiling) != Ordering::Greater
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_like_people_read() {
        assert_eq!(compare("2027.10", "2027.9"), Ordering::Greater);
        assert_eq!(compare("2027", "2027.0"), Ordering::Equal);
        assert_eq!(compare("11.2", "12"), Ordering::Less);
        assert!(within("2027.1", "2027.1"));
        assert!(!within("2028", "2027.99"));
        assert!(within("1.0", "1.0.0"));
    }
}
