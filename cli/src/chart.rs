//! A small text chart of one series for a terminal: columns of block
//! characters (eighths of a cell), the value axis on the left, the time
//! range below.

use vitals_common::model::format_value;

const EIGHTHS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Renders `points` (sorted by time) in `width` columns (axis included)
/// and `height` rows. Each column shows the mean of the points that fall
/// in its slice of the time range.
pub fn render(points: &[(i64, f64)], width: usize, height: usize) -> String {
    let finite: Vec<(i64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    let (Some(first), Some(last)) = (finite.first(), finite.last()) else {
        return "(no finite values to chart)".into();
    };
    let height = height.max(2);
    let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (top, bottom) = (format_value(hi), format_value(lo));
    let axis = top.chars().count().max(bottom.chars().count());
    let cols = width.saturating_sub(axis + 3).clamp(8, 400);
    // Mean per column.
    let span = (last.0 - first.0).max(1) as f64;
    let mut sum = vec![0.0; cols];
    let mut n = vec![0u32; cols];
    for &(t, v) in &finite {
        let c = (((t - first.0) as f64 / span) * (cols - 1) as f64).round() as usize;
        let c = c.min(cols - 1);
        sum[c] += v;
        n[c] += 1;
    }
    // A column with no point repeats the one before it (a gap in a step
    // chart would read as zero).
    let mut col: Vec<Option<f64>> = Vec::with_capacity(cols);
    let mut prev = None;
    for i in 0..cols {
        let v = (n[i] > 0).then(|| sum[i] / f64::from(n[i])).or(prev);
        col.push(v);
        prev = v;
    }
    let range = hi - lo;
    // Height in eighths of a cell; a flat series sits at half height.
    let level = |v: f64| -> usize {
        let f = if range > 0.0 { (v - lo) / range } else { 0.5 };
        // At least one eighth, so the lowest value still shows.
        ((f * (height * 8) as f64).round() as usize).clamp(1, height * 8)
    };
    let mut out = String::new();
    for row in 0..height {
        let label = if row == 0 {
            top.as_str()
        } else if row == height - 1 {
            bottom.as_str()
        } else {
            ""
        };
        out.push_str(&format!("{label:>axis$} ┤"));
        let base = (height - 1 - row) * 8;
        for v in &col {
            let ch = match v {
                None => ' ',
                Some(v) => {
                    let l = level(*v);
                    EIGHTHS[l.saturating_sub(base).min(8)]
                }
            };
            out.push(ch);
        }
        out.push('\n');
    }
    out.push_str(&format!("{:>axis$} └{}\n", "", "─".repeat(cols)));
    let (from, to) = (
        crate::commands::fmt_ms(first.0),
        crate::commands::fmt_ms(last.0),
    );
    let gap = (cols + 2).saturating_sub(from.len() + to.len()).max(1);
    out.push_str(&format!("{:>axis$}  {from}{}{to}", "", " ".repeat(gap)));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_rising_series_fills_from_bottom_left_to_top_right() {
        let pts: Vec<(i64, f64)> = (0..40).map(|i| (i * 1000, i as f64)).collect();
        let text = render(&pts, 50, 4);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("39 ┤"), "{text}");
        assert!(lines[3].starts_with(" 0 ┤"), "{text}");
        // Top row: empty on the left, full on the right.
        let top: Vec<char> = lines[0].chars().skip(4).collect();
        assert_eq!(top[0], ' ');
        assert_eq!(*top.last().unwrap(), '█');
        // Bottom row: something in every column.
        assert!(lines[3].chars().skip(4).all(|c| c != ' '), "{text}");
        assert!(lines[5].contains("1970-01-01T00:00:00Z"), "{text}");
    }

    #[test]
    fn a_flat_series_and_no_values_do_not_divide_by_zero() {
        let text = render(&[(0, 5.0), (1000, 5.0)], 30, 3);
        assert!(text.contains('█') || text.contains('▄'), "{text}");
        assert_eq!(
            render(&[(0, f64::NAN)], 30, 3),
            "(no finite values to chart)"
        );
    }
}
