//! SLURM host lists: `gpu[01-03,07],login1` → `gpu01 gpu02 gpu03 gpu07
//! login1`. Several bracket groups in one name multiply out
//! (`r[1-2]n[1-2]` → `r1n1 r1n2 r2n1 r2n2`); a range keeps the zero
//! padding of its first bound.

/// Most names one list may expand to: a typo such as `n[1-999999999]`
/// must not take the agent's memory.
pub const MAX_HOSTS: usize = 65_536;

/// Expands a host list, or says what is wrong with it.
pub fn expand(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in split_top(list)? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            let Some(open) = rest.find('[') else {
                names.iter_mut().for_each(|n| n.push_str(rest));
                break;
            };
            let close = rest[open..]
                .find(']')
                .map(|c| open + c)
                .ok_or_else(|| format!("{list:?}: `[` without `]`"))?;
            let prefix = &rest[..open];
            let values =
                expand_ranges(&rest[open + 1..close]).map_err(|e| format!("{list:?}: {e}"))?;
            if names
                .len()
                .saturating_mul(values.len())
                .saturating_add(out.len())
                > MAX_HOSTS
            {
                return Err(format!("{list:?}: more than {MAX_HOSTS} hosts"));
            }
            names = names
                .iter()
                .flat_map(|n| values.iter().map(move |v| format!("{n}{prefix}{v}")))
                .collect();
            rest = &rest[close + 1..];
        }
        out.extend(names);
    }
    Ok(out)
}

/// Splits at the commas outside brackets.
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("{list:?}: nested `[`")),
            '[' => depth += 1,
            ']' if depth == 0 => return Err(format!("{list:?}: `]` without `[`")),
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(format!("{list:?}: `[` without `]`"));
    }
    parts.push(&list[start..]);
    Ok(parts)
}

/// `01-03,07` → `01 02 03 07`.
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for r in ranges.split(',') {
        let r = r.trim();
        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
        let number = |s: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{r:?} is not a number or a range of numbers"))
        };
        let (a, b) = (number(lo)?, number(hi)?);
        if b < a {
            return Err(format!("range {r:?} runs backwards"));
        }
        if b - a >= MAX_HOSTS as u64 {
            return Err(format!("range {r:?} holds more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(list: &str, want: &[&str]) {
        assert_eq!(expand(list).unwrap(), want, "{list}");
    }

    #[test]
    fn plain_ranges_padding_and_products() {
        check("", &[]);
        check("cn001", &["cn001"]);
        check("gpu[01-03,07]", &["gpu01", "gpu02", "gpu03", "gpu07"]);
        check("gpu[1-2]", &["gpu1", "gpu2"]);
        check("cn[004-006],login1", &["cn004", "cn005", "cn006", "login1"]);
        check("n[8-10]", &["n8", "n9", "n10"]);
        check(
            "r[1-2]n[1-2]-ib",
            &["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"],
        );
        check("cs2.example.company.com", &["cs2.example.company.com"]);
        check("a,,b", &["a", "b"]);
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        for (list, says) in [
            ("gpu[01-03", "without `]`"),
            ("gpu01-03]", "without `[`"),
            ("gpu[3-1]", "backwards"),
            ("gpu[a-b]", "not a number"),
            ("gpu[1-[2]]", "nested"),
            ("n[0-99999999999]", "more than"),
            ("n[0-999]m[0-999]", "more than"),
        ] {
            let e = expand(list).unwrap_err();
            assert!(e.contains(says), "{list}: {e}");
        }
    }
}
