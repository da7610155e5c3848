//! Golden inputs: an answer's value at a JSON path against the expected
//! one. Pure, so every verdict is tested without a server.

use serde_json::Value;

/// One step of a path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Parses `predictions[0].label`, `$.predictions[0].label` or
/// `data.0.score` (a number after a dot is an index into an array, and a
/// key into an object). The empty path (or `$`) is the whole answer.
pub fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    let p = path.trim();
    let p = p.strip_prefix('$').unwrap_or(p);
    let p = p.strip_prefix('.').unwrap_or(p);
    let mut steps = Vec::new();
    if p.is_empty() {
        return Ok(steps);
    }
    for part in p.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && rest.is_empty() {
            return Err(format!(
                "{path:?}: empty step (two dots, or a trailing dot)"
            ));
        }
        if !key.is_empty() {
            steps.push(Step::Key(key.to_string()));
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| format!("{path:?}: '[' without ']'"))?;
            let idx = rest[1..close].trim();
            let n = idx
                .parse::<usize>()
                .map_err(|_| format!("{path:?}: [{idx}] is not an array index"))?;
            steps.push(Step::Index(n));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("{path:?}: unexpected {rest:?} after ']'"));
            }
        }
    }
    Ok(steps)
}

/// The value at `steps` in `v`, if there is one.
pub fn lookup<'a>(v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let mut cur = v;
    for s in steps {
        cur = match (s, cur) {
            (Step::Key(k), Value::Object(m)) => m.get(k)?,
            (Step::Key(k), Value::Array(a)) => a.get(k.parse::<usize>().ok()?)?,
            (Step::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// What an answer said, as an event shows it.
pub fn show(v: Option<&Value>) -> String {
    let s = match v {
        None => "(nothing at the path)".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    if s.chars().count() > 200 {
        let mut t: String = s.chars().take(200).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// Whether `got` is the expected answer: numbers within `tolerance`
/// (absolute; default exact), anything else equal.
pub fn correct(expect: &Value, got: Option<&Value>, tolerance: Option<f64>) -> bool {
    let Some(got) = got else {
        return false;
    };
    match (expect.as_f64(), got.as_f64()) {
        (Some(e), Some(g)) => (g - e).abs() <= tolerance.unwrap_or(0.0),
        _ => expect == got,
    }
}

/// The verdict on one answer body: (correct, what it said).
pub fn judge(
    body: &[u8],
    steps: &[Step],
    expect: &Value,
    tolerance: Option<f64>,
) -> (bool, String) {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let got = lookup(&v, steps);
            (correct(expect, got, tolerance), show(got))
        }
        Err(e) => (false, format!("(not JSON: {e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        use Step::*;
        assert_eq!(parse_path("").unwrap(), vec![]);
        assert_eq!(parse_path("$").unwrap(), vec![]);
        assert_eq!(
            parse_path("$.predictions[0].label").unwrap(),
            vec![Key("predictions".into()), Index(0), Key("label".into())]
        );
        assert_eq!(
            parse_path("a[1][2]").unwrap(),
            vec![Key("a".into()), Index(1), Index(2)]
        );
        assert_eq!(
            parse_path("data.0.score").unwrap(),
            vec![Key("data".into()), Key("0".into()), Key("score".into())]
        );
        for bad in ["a..b", "a.", "a[x]", "a[1", "a[1]b"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verdicts() {
        let body = br#"{"predictions":[{"label":"cat","score":0.91}],"data":[3]}"#;
        let p = |s| parse_path(s).unwrap();
        assert_eq!(
            judge(body, &p("predictions[0].label"), &json!("cat"), None),
            (true, "cat".to_string())
        );
        assert_eq!(
            judge(body, &p("predictions[0].label"), &json!("dog"), None),
            (false, "cat".to_string())
        );
        assert!(judge(body, &p("predictions[0].score"), &json!(0.9), Some(0.02)).0);
        assert!(!judge(body, &p("predictions[0].score"), &json!(0.9), Some(0.005)).0);
        assert!(!judge(body, &p("predictions[0].score"), &json!(0.9), None).0);
        assert!(judge(body, &p("data.0"), &json!(3), None).0);
        assert_eq!(
            judge(body, &p("predictions[3].label"), &json!("cat"), None),
            (false, "(nothing at the path)".to_string())
        );
        let (ok, got) = judge(b"<html>", &p("x"), &json!(1), None);
        assert!(!ok && got.starts_with("(not JSON"), "{got}");
        // A string "3" is not the number 3.
        assert!(!judge(br#"{"v":"3"}"#, &p("v"), &json!(3), None).0);
        assert_eq!(show(Some(&json!("x".repeat(300)))).chars().count(), 201);
    }
}
