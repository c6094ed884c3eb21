//! Number ranges (reserved, extension), inclusive at both ends: which parts
//! of a range a new version no longer covers.

/// The parts of `range` that none of `ranges` covers.
pub(super) fn uncovered(range: (i64, i64), ranges: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let (mut next, end) = range;
    let mut missing = Vec::new();
    for (start, stop) in sorted {
        if stop < next {
            continue;
        }
        if start > end {
            break;
        }
        if start > next {
            missing.push((next, start - 1));
        }
        next = next.max(stop.saturating_add(1));
        if next > end {
            return missing;
        }
    }
    missing.push((next, end));
    missing
}

/// For each of `before` that `after` no longer covers whole, the numbers it
/// lost, shown (`5, 8 to 9`).
pub(super) fn no_longer_covered(before: &[(i64, i64)], after: &[(i64, i64)], max: i64) -> Vec<String> {
    before
        .iter()
        .map(|&range| uncovered(range, after))
        .filter(|lost| !lost.is_empty())
        .map(|lost| show(&lost, max))
        .collect()
}

/// `5`, `5 to 9`, or `5 to max`.
fn show(ranges: &[(i64, i64)], max: i64) -> String {
    let one = |&(start, end): &(i64, i64)| match end {
        _ if start == end => start.to_string(),
        _ if end >= max => format!("{start} to max"),
        _ => format!("{start} to {end}"),
    };
    ranges.iter().map(one).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_parts_are_found_across_joined_and_overlapping_ranges() {
        assert_eq!(uncovered((1, 10), &[(1, 4), (5, 10)]), []);
        assert_eq!(uncovered((1, 10), &[(3, 4), (4, 6)]), [(1, 2), (7, 10)]);
        assert_eq!(uncovered((1, 10), &[]), [(1, 10)]);
        assert_eq!(uncovered((5, 5), &[(1, 100)]), []);
        assert_eq!(uncovered((1, 10), &[(12, 20), (0, 1)]), [(2, 10)]);
        assert_eq!(show(&[(2, 2), (4, 536_870_911)], 536_870_911), "2, 4 to max");
    }
}
