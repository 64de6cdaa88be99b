//! Output for machines: CSV records. Every tool and report writes CSV through `csv_row`.

/// One CSV record (RFC 4180), newline included: a field with a comma, quote, CR or LF is
/// quoted and its quotes doubled. The one CSV writer of every tool and report.
pub fn csv_row<S: AsRef<str>>(fields: &[S]) -> String {
    let mut line = String::new();
    for (i, f) in fields.iter().enumerate() {
        let f = f.as_ref();
        if i > 0 {
            line.push(',');
        }
        if f.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&f.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(f);
        }
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_quote_what_needs_quoting() {
        assert_eq!(csv_row(&["a", "b c", "1.5"]), "a,b c,1.5\n");
        assert_eq!(
            csv_row(&["x,y", "say \"hi\"", "two\nlines", "cr\r"]),
            "\"x,y\",\"say \"\"hi\"\"\",\"two\nlines\",\"cr\r\"\n"
        );
    }
}
