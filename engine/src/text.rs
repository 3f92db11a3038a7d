//! Words for people: the one "did you mean" of the project, used for misspelt task ids,
//! field names, flags and backend names alike.

/// The candidate closest to a misspelt `word`, when it is close enough to be a likely typo:
/// at most a third of the longer word's length in edits (at least one).
///
/// First by plain edit distance, exactly as written; failing that, ignoring case and
/// counting a swap of two neighbouring letters as one edit (`nmae` → `name`), which matters
/// for short names. Ties go to the candidate that sorts first.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<&'a str> = candidates.into_iter().collect();
    let lower = word.to_lowercase();
    nearest(word, &candidates, |c| strsim::levenshtein(word, c)).or_else(|| {
        nearest(word, &candidates, |c| {
            strsim::damerau_levenshtein(&lower, &c.to_lowercase())
        })
    })
}

fn nearest<'a>(
    word: &str,
    candidates: &[&'a str],
    distance: impl Fn(&str) -> usize,
) -> Option<&'a str> {
    let mut best: Option<(usize, &'a str)> = None;
    for &c in candidates {
        let d = distance(c);
        let limit = (word.len().max(c.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|b| (d, c) < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn suggests_a_near_miss_or_nothing() {
        assert_eq!(closest("comple", ["compile", "link"]), Some("compile"));
        assert_eq!(closest("zzz", ["compile", "link"]), None);
        assert_eq!(closest("partiton", ["qos", "partition"]), Some("partition"));
    }

    #[test]
    fn a_swap_or_a_case_counts_as_one_edit() {
        assert_eq!(closest("nmae", ["name", "kind"]), Some("name"));
        assert_eq!(closest("NAme", ["name", "kind"]), Some("name"));
    }

    #[test]
    fn ties_go_to_the_first_in_order() {
        assert_eq!(closest("ab", ["ac", "aa"]), Some("aa"));
    }
}
