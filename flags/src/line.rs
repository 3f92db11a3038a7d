//! The line syntax shared by the three tables: `--name[ {a,b}]<TAB># key=value ... notes`.

/// The value of `key=` among a line's attributes (the first one).
pub(crate) fn field<'a>(meta: &'a str, key: &str) -> Option<&'a str> {
    meta.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Splits `--name {a,b}\t# meta` into name, choices and meta; None for a line without a TAB.
pub(crate) fn split_line(line: &str) -> Option<(&str, Vec<&str>, &str)> {
    let (head, meta) = line.split_once('\t')?;
    let meta = meta.trim_start_matches('#').trim();
    let mut parts = head.splitn(2, ' ');
    let name = parts.next()?.trim();
    let choices = parts
        .next()
        .map(|c| {
            c.trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
                .collect()
        })
        .unwrap_or_default();
    Some((name, choices, meta))
}
