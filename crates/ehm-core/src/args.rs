//! Checks of command-line values shared by the tools: a value that makes no sense (`--top-k 0`,
//! `--alpha nan`, `--epochs inf`) is a usage error (exit 2) before any work, never silently
//! clamped or carried into a NaN. Use as `#[arg(value_parser = args::at_least_one)]`.

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))
}

/// A count: 1 or more.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match number::<usize>(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A finite number above 0 (learning rates, epochs, temperatures).
pub fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = number(s)?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number above 0, got {v}"))
    }
}

/// A finite number of 0 or more.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = number(s)?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number ≥ 0, got {v}"))
    }
}

/// A fraction strictly between 0 and 1 (a mask ratio).
pub fn open_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = number(s)?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("must be between 0 and 1 (exclusive), got {v}"))
    }
}

/// A number from 0 to 1: a probability, training progress t.
pub fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = number(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be from 0 to 1, got {v}"))
    }
}

/// A fraction from 0 to 1 as f32 (an opacity).
pub fn unit(s: &str) -> Result<f32, String> {
    fraction(s).map(|v| v as f32)
}

/// A cosine similarity threshold, −1 to 1.
pub fn cosine(s: &str) -> Result<f32, String> {
    let v: f32 = number(s)?;
    if (-1.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be a cosine similarity from -1 to 1, got {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_is_refused_and_sense_accepted() {
        assert!(at_least_one("0").is_err() && at_least_one("-1").is_err());
        assert_eq!(at_least_one("3"), Ok(3));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(positive("1.5e-4"), Ok(1.5e-4));
        assert!(non_negative("-0.1").is_err() && non_negative("nan").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        for bad in ["0", "1", "nan", "-0.5"] {
            assert!(open_fraction(bad).is_err(), "{bad}");
        }
        assert!(unit("5").is_err() && unit("nan").is_err() && unit("0.55").is_ok());
        assert!(fraction("1.5").is_err() && fraction("nan").is_err() && fraction("0.1") == Ok(0.1));
        assert!(cosine("1.5").is_err() && cosine("nan").is_err() && cosine("-1").is_ok());
    }
}
