//! Pure parsers for what `squeue`/`sinfo` (and slurmrestd) print.
//!
//! JSON comes in two shapes, told apart value by value rather than by the
//! version in `meta`: Slurm ≤ 22.05 writes plain numbers and `job_state`
//! as a string; ≥ 23.02 writes numbers as `{"set", "infinite", "number"}`
//! and states as lists. slurmrestd's `/slurm/v0.0.4x/jobs` and `/nodes`
//! bodies are the same documents. A JSON error names the line; a document
//! that parses but lacks what a job or node needs names the entry
//! (`jobs[3]`) with line 0, "the document as a whole".
//!
//! The text fallbacks read the output of the `-o` formats the source passes
//! ([`SQUEUE_FORMAT`], [`SINFO_FORMAT`]), and also the one-JSON-object-per-
//! line form some exporters produce with `-o '{"id": %A, ...}'`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::hostlist;
use crate::sources::ParseError;

/// `squeue -o` format of the text fallback, run with `SLURM_TIME_FORMAT=%s`
/// so times are Unix seconds: job id (unique per array task), array job id,
/// array task id, user, account, partition, state, reason, nodes,
/// generic resources per node, submit time, start time, time limit, and
/// the name last, so a `|` in a job name cannot shift the other fields.
pub const SQUEUE_FORMAT: &str = "%A|%F|%K|%u|%a|%P|%T|%r|%N|%b|%V|%S|%l|%j";
/// `sinfo -N -o` format of the text fallback: node, state, CPUs
/// allocated/idle/other/total, gres, partition, reason (last: free text).
pub const SINFO_FORMAT: &str = "%N|%T|%C|%G|%P|%E";

/// One job as squeue reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    pub id: u64,
    /// The array's job id, for a task of a job array.
    pub array_job_id: Option<u64>,
    pub array_task_id: Option<u64>,
    pub name: String,
    pub user: String,
    pub account: String,
    pub partition: String,
    /// Base state as SLURM spells it: `RUNNING`, `PENDING`, `COMPLETED`...
    pub state: String,
    /// Further state flags (`CONFIGURING`, `REQUEUED`...), 23.02 on.
    pub state_flags: Vec<String>,
    /// Why it waits or ended (`Priority`, `Resources`...); None for "None".
    pub reason: Option<String>,
    /// Expanded host names.
    pub nodes: Vec<String>,
    /// GPUs allocated to the job over all its nodes (0 while pending).
    pub gpus: u64,
    /// Unix seconds.
    pub submit_time: Option<i64>,
    /// Unix seconds; for a pending job, SLURM's expected start.
    pub start_time: Option<i64>,
    /// None: unlimited or not given.
    pub time_limit_seconds: Option<u64>,
    /// Where the job writes its output, as submitted: sbatch's filename
    /// patterns (`%j`, `%x`...) may be left unexpanded (≤ 22.05), and a
    /// relative path is relative to `cwd`. None for "not said"; an
    /// absent `stderr` goes to `stdout`.
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// The job's working directory.
    pub cwd: Option<String>,
}

/// One node as sinfo reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    pub name: String,
    /// Lower case: the base state first (`idle`, `mixed`, `allocated`,
    /// `down`...), then flags (`drain`, `not_responding`...).
    pub states: Vec<String>,
    pub reason: Option<String>,
    pub cpus: Option<u64>,
    pub cpus_allocated: Option<u64>,
    pub gpus: Option<u64>,
    pub partitions: Vec<String>,
}

/// Job states that are a base state (the rest of a state list are flags).
pub const JOB_BASE_STATES: &[&str] = &[
    "PENDING",
    "RUNNING",
    "SUSPENDED",
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
];

/// Node base states (sinfo's lower-case names).
pub const NODE_BASE_STATES: &[&str] = &[
    "idle",
    "mixed",
    "allocated",
    "down",
    "error",
    "future",
    "unknown",
];

fn doc_error(what: impl Into<String>) -> ParseError {
    ParseError::new(0, what)
}

fn parse_document(text: &str, key: &str) -> Result<Vec<Value>, ParseError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| ParseError::new(e.line(), format!("not valid JSON: {e}")))?;
    if let Some(errors) = doc.get("errors").and_then(Value::as_array)
        && let Some(first) = errors.first()
    {
        let what = first
            .get("error")
            .or_else(|| first.get("description"))
            .and_then(Value::as_str)
            .unwrap_or("(no description)");
        return Err(doc_error(format!(
            "SLURM reported {} error(s), first: {what}",
            errors.len()
        )));
    }
    match doc.get(key) {
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(doc_error(format!("`{key}` is not a list"))),
        None => Err(doc_error(format!("no `{key}` list in the document"))),
    }
}

/// A number in either shape: plain, or `{"set", "infinite", "number"}`.
/// Unset, infinite, null and SLURM's NO_VAL/INFINITE sentinels are None.
fn number(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    let n = match v {
        Value::Object(o) => {
            if o.get("set").and_then(Value::as_bool) == Some(false)
                || o.get("infinite").and_then(Value::as_bool) == Some(true)
            {
                return None;
            }
            o.get("number")?.as_i64()?
        }
        _ => v.as_i64()?,
    };
    // NO_VAL (0xfffffffe), INFINITE (0xffffffff) and their 64-bit kin.
    (0..0xffff_fffe).contains(&n).then_some(n)
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A state in either shape: `"RUNNING"` or `["RUNNING", "CONFIGURING"]`.
fn states(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s
            .split(['+', ','])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses `squeue --json` (or slurmrestd's jobs body).
pub fn parse_squeue_json(text_in: &str) -> Result<Vec<Job>, ParseError> {
    let items = parse_document(text_in, "jobs")?;
    let mut jobs = Vec::with_capacity(items.len());
    for (i, j) in items.iter().enumerate() {
        let at = |what: &str| doc_error(format!("jobs[{i}]: {what}"));
        if j.get("state").is_some_and(|s| s.get("current").is_some()) {
            return Err(at(
                "a slurmdbd accounting record (`state.current`), not a squeue or /slurm/…/jobs entry",
            ));
        }
        let id = number(j.get("job_id")).ok_or_else(|| at("no job_id"))? as u64;
        let mut all_states = states(j.get("job_state"));
        if all_states.is_empty() {
            return Err(at(&format!("job {id}: no job_state")));
        }
        let base = all_states
            .iter()
            .position(|s| JOB_BASE_STATES.contains(&s.as_str()))
            .unwrap_or(0);
        let state = all_states.remove(base);
        let array_job_id = number(j.get("array_job_id")).filter(|&a| a > 0);
        let array_task_id = array_job_id.and(number(j.get("array_task_id")));
        let nodes = text(j.get("nodes")).unwrap_or_default();
        let nodes = hostlist::expand(&nodes).map_err(|e| at(&format!("job {id}: nodes: {e}")))?;
        let gpus = tres_gpus(
            j.get("tres_alloc_str")
                .and_then(Value::as_str)
                .unwrap_or(""),
        )
        .or_else(|| {
            let detail = j.get("gres_detail")?.as_array()?;
            let counts: Vec<u64> = detail
                .iter()
                .filter_map(Value::as_str)
                .filter_map(gres_gpus)
                .collect();
            (!counts.is_empty()).then(|| counts.iter().sum())
        })
        .unwrap_or(0);
        jobs.push(Job {
            id,
            array_job_id: array_job_id.map(|a| a as u64),
            array_task_id: array_task_id.map(|a| a as u64),
            name: text(j.get("name")).unwrap_or_default(),
            user: text(j.get("user_name"))
                .or_else(|| number(j.get("user_id")).map(|u| u.to_string()))
                .unwrap_or_default(),
            account: text(j.get("account")).unwrap_or_default(),
            partition: text(j.get("partition")).unwrap_or_default(),
            state,
            state_flags: all_states,
            reason: text(j.get("state_reason")).filter(|r| r != "None"),
            nodes,
            gpus,
            submit_time: number(j.get("submit_time")).filter(|&t| t > 0),
            start_time: number(j.get("start_time")).filter(|&t| t > 0),
            time_limit_seconds: number(j.get("time_limit")).map(|m| m as u64 * 60),
            stdout: text(j.get("standard_output")),
            stderr: text(j.get("standard_error")),
            cwd: text(j.get("current_working_directory")),
        });
    }
    Ok(jobs)
}

/// Parses `sinfo --json` (or slurmrestd's nodes body).
pub fn parse_sinfo_json(text_in: &str) -> Result<Vec<Node>, ParseError> {
    let items = parse_document(text_in, "nodes")?;
    let mut nodes = Vec::with_capacity(items.len());
    for (i, n) in items.iter().enumerate() {
        let name = text(n.get("name"))
            .or_else(|| text(n.get("hostname")))
            .ok_or_else(|| doc_error(format!("nodes[{i}]: no name")))?;
        let mut st: Vec<String> = states(n.get("state"))
            .into_iter()
            .chain(states(n.get("state_flags")))
            .map(|s| s.to_ascii_lowercase())
            .collect();
        st.dedup();
        if st.is_empty() {
            return Err(doc_error(format!("nodes[{i}] ({name}): no state")));
        }
        let partitions = match n.get("partitions") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        nodes.push(Node {
            states: order_states(st),
            reason: text(n.get("reason")),
            cpus: number(n.get("cpus")).map(|c| c as u64),
            cpus_allocated: number(n.get("alloc_cpus")).map(|c| c as u64),
            gpus: n
                .get("gres")
                .and_then(Value::as_str)
                .and_then(gres_list_gpus),
            partitions,
            name,
        });
    }
    Ok(nodes)
}

/// The base state first, flags after, in their order.
fn order_states(mut st: Vec<String>) -> Vec<String> {
    if let Some(b) = st
        .iter()
        .position(|s| NODE_BASE_STATES.contains(&s.as_str()))
    {
        let base = st.remove(b);
        st.insert(0, base);
    }
    st
}

/// GPUs in a TRES string (`cpu=2,mem=1G,gres/gpu=8,gres/gpu:h100=8`): the
/// untyped `gres/gpu` count if given, else the sum of the typed ones.
pub fn tres_gpus(tres: &str) -> Option<u64> {
    let mut typed: Option<u64> = None;
    for part in tres.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        let Ok(n) = value.trim().parse::<u64>() else {
            continue;
        };
        match key {
            "gres/gpu" => return Some(n),
            k if k.starts_with("gres/gpu:") => typed = Some(typed.unwrap_or(0) + n),
            _ => {}
        }
    }
    typed
}

/// GPUs in one gres entry: `gpu:h100:4(IDX:0-3)`, `gres/gpu:4`,
/// `gres:gpu:mi100:2`, `gpu` (one); None for other resources.
pub fn gres_gpus(entry: &str) -> Option<u64> {
    let entry = entry.trim();
    let entry = entry.split('(').next().unwrap_or(entry);
    let entry = entry
        .strip_prefix("gres/")
        .or_else(|| entry.strip_prefix("gres:"))
        .unwrap_or(entry);
    let mut parts = entry.split([':', '=']);
    if parts.next() != Some("gpu") {
        return None;
    }
    let rest: Vec<&str> = parts.collect();
    match rest.last() {
        None => Some(1),
        Some(last) => Some(last.parse().unwrap_or(1)),
    }
}

/// GPUs in a node's gres list (`gpu:h100:4(S:0-1),shard:8`); None when
/// the node has no GPU gres.
fn gres_list_gpus(list: &str) -> Option<u64> {
    // Commas also appear inside `(S:0-1,3)`; split outside parentheses.
    let mut total: Option<u64> = None;
    let (mut depth, mut start) = (0i32, 0);
    let mut entries = Vec::new();
    for (i, c) in list.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth <= 0 => {
                entries.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    entries.push(&list[start..]);
    for e in entries {
        if let Some(n) = gres_gpus(e) {
            total = Some(total.unwrap_or(0) + n);
        }
    }
    total
}

/// A SLURM duration: `UNLIMITED`, `30` (minutes), `30:00`, `1:00:00`,
/// `2-00:00:00`, `2-3`; None for unlimited or not given.
pub fn parse_duration(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if matches!(
        s,
        "" | "UNLIMITED" | "INFINITE" | "NOT_SET" | "N/A" | "Partition_Limit"
    ) {
        return Ok(None);
    }
    let bad = || format!("{s:?} is not a SLURM duration");
    let (days, clock) = match s.split_once('-') {
        Some((d, c)) => (d.parse::<u64>().map_err(|_| bad())?, Some(c)),
        None => (0, Some(s)),
    };
    let fields: Vec<u64> = clock
        .unwrap_or("")
        .split(':')
        .map(|f| f.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let secs = match (s.contains('-'), fields.as_slice()) {
        (false, [m]) => m * 60,
        (false, [m, sec]) => m * 60 + sec,
        (_, [h, m, sec]) => h * 3600 + m * 60 + sec,
        (true, [h]) => h * 3600,
        (true, [h, m]) => h * 3600 + m * 60,
        _ => return Err(bad()),
    };
    Ok(Some(days * 86_400 + secs))
}

/// `N/A`, `(null)` and empty are absent.
fn present(s: &str) -> Option<&str> {
    let s = s.trim();
    (!matches!(s, "" | "N/A" | "(null)" | "None" | "n/a")).then_some(s)
}

/// Parses `squeue -h -o SQUEUE_FORMAT` output (and the one-JSON-object-per-
/// line form). Lines starting with `#` are skipped.
pub fn parse_squeue_text(text_in: &str) -> Result<Vec<Job>, ParseError> {
    let mut jobs = Vec::new();
    for (i, line) in text_in.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('{') {
            jobs.push(job_from_json_line(n, line)?);
            continue;
        }
        let f: Vec<&str> = line.splitn(14, '|').collect();
        let [
            id,
            array,
            task,
            user,
            account,
            partition,
            state,
            reason,
            nodes,
            gres,
            submit,
            start,
            limit,
            name,
        ] = f.as_slice()
        else {
            return Err(ParseError::new(
                n,
                format!(
                    "{} fields where the format {SQUEUE_FORMAT:?} gives 14",
                    f.len()
                ),
            ));
        };
        let num = |what: &str, s: &str| -> Result<Option<u64>, ParseError> {
            match present(s) {
                None => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| ParseError::new(n, format!("{what} {v:?} is not a number"))),
            }
        };
        let id = num("job id", id)?.ok_or_else(|| ParseError::new(n, "no job id"))?;
        let array_task_id = num("array task id", task)?;
        let array_job_id = array_task_id.and(num("array job id", array)?);
        let (state, state_flags) = text_state(state);
        let nodes = hostlist::expand(present(nodes).unwrap_or(""))
            .map_err(|e| ParseError::new(n, format!("nodes: {e}")))?;
        let per_node = present(gres).and_then(gres_list_gpus).unwrap_or(0);
        let started = !matches!(state.as_str(), "PENDING");
        let time = |what: &str, s: &str| -> Result<Option<i64>, ParseError> {
            Ok(num(what, s)?.map(|t| t as i64).filter(|&t| t > 0))
        };
        jobs.push(Job {
            id,
            array_job_id,
            array_task_id,
            name: name.trim().to_string(),
            user: user.trim().to_string(),
            account: present(account).unwrap_or("").to_string(),
            partition: partition.trim().to_string(),
            state,
            state_flags,
            reason: present(reason).map(str::to_string),
            gpus: if started {
                per_node * (nodes.len().max(1) as u64)
            } else {
                0
            },
            nodes,
            submit_time: time("submit time", submit)?,
            start_time: time("start time", start)?,
            time_limit_seconds: parse_duration(limit)
                .map_err(|e| ParseError::new(n, format!("time limit: {e}")))?,
            stdout: None,
            stderr: None,
            cwd: None,
        });
    }
    Ok(jobs)
}

/// `RUNNING`, `COMPLETING`, `PENDING+REQUEUED` → base state and flags.
fn text_state(s: &str) -> (String, Vec<String>) {
    let mut all: Vec<String> = s
        .split('+')
        .map(|p| p.trim().to_ascii_uppercase())
        .filter(|p| !p.is_empty())
        .collect();
    if all.is_empty() {
        return ("UNKNOWN".into(), Vec::new());
    }
    let base = all
        .iter()
        .position(|s| JOB_BASE_STATES.contains(&s.as_str()))
        .unwrap_or(0);
    let state = all.remove(base);
    (state, all)
}

fn json_line(n: usize, line: &str) -> Result<serde_json::Map<String, Value>, ParseError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ParseError::new(n, "not a JSON object")),
        Err(e) => Err(ParseError::new(n, format!("not valid JSON: {e}"))),
    }
}

/// `{"a": account, "id": %A, "u": user, "state": %T, "p": partition,
/// "array_id": %K, "r": reason or nodes}`.
fn job_from_json_line(n: usize, line: &str) -> Result<Job, ParseError> {
    let o = json_line(n, line)?;
    let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let id = number(o.get("id")).ok_or_else(|| ParseError::new(n, "no numeric \"id\""))? as u64;
    let (state, state_flags) = text_state(&s("state"));
    // `%R`: the reason in parentheses for a waiting job, else its nodes.
    let r = s("r");
    let (reason, nodes) = match r.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        Some(reason) => (Some(reason.to_string()), Vec::new()),
        None => (
            None,
            hostlist::expand(present(&r).unwrap_or(""))
                .map_err(|e| ParseError::new(n, format!("nodes: {e}")))?,
        ),
    };
    Ok(Job {
        id,
        array_task_id: present(&s("array_id")).and_then(|a| a.parse().ok()),
        name: s("name"),
        user: s("u"),
        account: s("a"),
        partition: s("p"),
        state,
        state_flags,
        reason,
        nodes,
        ..Job::default()
    })
}

/// Parses `sinfo -h -N -o SINFO_FORMAT` output (and the one-JSON-object-
/// per-line form). A node listed once per partition becomes one node.
pub fn parse_sinfo_text(text_in: &str) -> Result<Vec<Node>, ParseError> {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for (i, line) in text_in.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let node = if line.starts_with('{') {
            let o = json_line(n, line)?;
            let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let (alloc, total) = cpu_state(&s("cstate"));
            Node {
                name: s("n"),
                states: text_node_states(&s("s")),
                cpus: total,
                cpus_allocated: alloc,
                partitions: present(&s("p")).map(str::to_string).into_iter().collect(),
                ..Node::default()
            }
        } else {
            let f: Vec<&str> = line.splitn(6, '|').collect();
            let [name, state, cstate, gres, partition, reason] = f.as_slice() else {
                return Err(ParseError::new(
                    n,
                    format!(
                        "{} fields where the format {SINFO_FORMAT:?} gives 6",
                        f.len()
                    ),
                ));
            };
            let (alloc, total) = cpu_state(cstate);
            Node {
                name: name.trim().to_string(),
                states: text_node_states(state),
                reason: present(reason).map(str::to_string),
                cpus: total,
                cpus_allocated: alloc,
                gpus: present(gres).and_then(gres_list_gpus),
                partitions: present(partition)
                    .map(|p| p.trim_end_matches('*').to_string())
                    .into_iter()
                    .collect(),
            }
        };
        if node.name.is_empty() {
            return Err(ParseError::new(n, "no node name"));
        }
        if node.states.is_empty() {
            return Err(ParseError::new(n, format!("{}: no state", node.name)));
        }
        match nodes.get_mut(&node.name) {
            Some(seen) => seen.partitions.extend(node.partitions),
            None => {
                nodes.insert(node.name.clone(), node);
            }
        }
    }
    Ok(nodes.into_values().collect())
}

/// `%C`: allocated/idle/other/total → (allocated, total).
fn cpu_state(s: &str) -> (Option<u64>, Option<u64>) {
    let f: Vec<Option<u64>> = s.split('/').map(|x| x.trim().parse().ok()).collect();
    match f.as_slice() {
        [a, _, _, t] => (*a, *t),
        _ => (None, None),
    }
}

/// sinfo's `%T`: `idle`, `mixed+drain`, `down*`, `drained`, `draining`.
/// `*` (not responding) becomes the flag `not_responding`; `drained` and
/// `draining` become `drain` (the text form does not say the base state).
fn text_node_states(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in s.split('+') {
        let part = part.trim().to_ascii_lowercase();
        let not_responding = part.ends_with('*');
        let base = part.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-']);
        match base {
            "" => {}
            "drained" | "draining" | "drng" | "drain" => out.push("drain".to_string()),
            "alloc" => out.push("allocated".to_string()),
            "mix" => out.push("mixed".to_string()),
            "comp" => out.push("completing".to_string()),
            other => out.push(other.to_string()),
        }
        if not_responding {
            out.push("not_responding".to_string());
        }
    }
    out.dedup();
    order_states(out)
}
