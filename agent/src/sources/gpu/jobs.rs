//! Which SLURM job a GPU process belongs to: the `job_<id>` directory of
//! its cgroup (SLURM's cgroup plugins, v1 and v2), else `SLURM_JOB_ID`
//! and `SLURM_JOB_USER` in its environment (every process a job starts
//! inherits them, whatever the proctrack plugin). Both are read through
//! `paths.procfs`; the user of a cgroup's `uid_<n>` comes from
//! `/etc/passwd` (else the number).

use std::collections::BTreeMap;
use std::path::Path;

/// A job as a process shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobOf {
    pub job_id: String,
    pub user: String,
}

/// `job_<id>` (and `uid_<n>`) in `/proc/<pid>/cgroup`.
pub fn parse_cgroup(text: &str) -> Option<(String, Option<u32>)> {
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        let mut job = None;
        let mut uid = None;
        for part in path.split('/') {
            if let Some(id) = part.strip_prefix("job_")
                && !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
            {
                job = Some(id.to_string());
            }
            if let Some(u) = part.strip_prefix("uid_") {
                uid = u.parse().ok();
            }
        }
        if let Some(job) = job {
            return Some((job, uid));
        }
    }
    None
}

/// `SLURM_JOB_ID` and `SLURM_JOB_USER` in `/proc/<pid>/environ`.
pub fn parse_environ(bytes: &[u8]) -> Option<(String, Option<String>)> {
    let mut job = None;
    let mut user = None;
    for var in bytes.split(|&b| b == 0) {
        let var = String::from_utf8_lossy(var);
        if let Some(v) = var.strip_prefix("SLURM_JOB_ID=") {
            job = Some(v.to_string());
        } else if let Some(v) = var.strip_prefix("SLURM_JOB_USER=") {
            user = Some(v.to_string());
        }
    }
    job.filter(|j| !j.is_empty() && j.bytes().all(|b| b.is_ascii_digit()))
        .map(|j| (j, user))
}

/// The name of `uid` in an `/etc/passwd` text.
pub fn user_of_uid(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The job of process `pid`, if it runs in one.
pub fn job_of(procfs: &Path, pid: u32) -> Option<JobOf> {
    let dir = procfs.join(pid.to_string());
    if let Some((job_id, uid)) = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .as_deref()
        .and_then(parse_cgroup)
    {
        let env_user = std::fs::read(dir.join("environ"))
            .ok()
            .and_then(|b| parse_environ(&b))
            .and_then(|(_, u)| u);
        let user = env_user
            .or_else(|| {
                let uid = uid?;
                std::fs::read_to_string("/etc/passwd")
                    .ok()
                    .and_then(|p| user_of_uid(&p, uid))
                    .or_else(|| Some(uid.to_string()))
            })
            .unwrap_or_default();
        return Some(JobOf { job_id, user });
    }
    let (job_id, user) = parse_environ(&std::fs::read(dir.join("environ")).ok()?)?;
    Some(JobOf {
        job_id,
        user: user.unwrap_or_default(),
    })
}

/// The job on each GPU, by GPU index, from its processes: where processes
/// of several jobs share a GPU, the lowest job id.
pub fn jobs_by_gpu<'a>(
    procfs: &Path,
    gpus: impl Iterator<Item = (u32, &'a [super::GpuProcess])>,
) -> BTreeMap<u32, JobOf> {
    let mut out = BTreeMap::new();
    for (gpu, procs) in gpus {
        let best = procs
            .iter()
            .filter_map(|p| job_of(procfs, p.pid))
            .min_by(|a, b| {
                let n = |j: &JobOf| j.job_id.parse::<u64>().unwrap_or(u64::MAX);
                n(a).cmp(&n(b))
            });
        if let Some(j) = best {
            out.insert(gpu, j);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v1_and_v2_paths_name_the_job() {
        let v1 = "12:pids:/slurm/uid_1000/job_4242/step_0/task_0\n4:memory:/slurm/uid_1000/job_4242/step_0\n0::/\n";
        assert_eq!(parse_cgroup(v1), Some(("4242".into(), Some(1000))));
        let v2 = "0::/system.slice/slurmstepd.scope/job_77/step_batch/user/task_0\n";
        assert_eq!(parse_cgroup(v2), Some(("77".into(), None)));
        assert_eq!(parse_cgroup("0::/user.slice/session-3.scope\n"), None);
        assert_eq!(parse_cgroup("0::/job_x/\n"), None);
    }

    #[test]
    fn environ_and_passwd() {
        let env = b"PATH=/bin\0SLURM_JOB_USER=alice\0SLURM_JOB_ID=99\0";
        assert_eq!(
            parse_environ(env),
            Some(("99".into(), Some("alice".into())))
        );
        assert_eq!(parse_environ(b"PATH=/bin\0"), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_of_uid(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_of_uid(passwd, 7), None);
    }

    #[test]
    fn a_fixture_proc_tree_maps_gpus_to_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let put = |pid: u32, file: &str, body: &[u8]| {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), body).unwrap();
        };
        put(
            10,
            "cgroup",
            b"0::/system.slice/slurmstepd.scope/job_12/step_0/user/task_0\n",
        );
        put(10, "environ", b"SLURM_JOB_USER=bob\0SLURM_JOB_ID=12\0");
        put(11, "cgroup", b"0::/\n");
        put(11, "environ", b"SLURM_JOB_ID=5\0SLURM_JOB_USER=carol\0");
        put(12, "cgroup", b"0::/user.slice\n");
        let p = |pid| super::super::GpuProcess {
            pid,
            vram_bytes: None,
        };
        let g0 = [p(10), p(11)];
        let g1 = [p(12), p(404)];
        let g2 = [p(10)];
        let m = jobs_by_gpu(
            dir.path(),
            [(0, &g0[..]), (1, &g1[..]), (2, &g2[..])].into_iter(),
        );
        assert_eq!(
            m.get(&0),
            Some(&JobOf {
                job_id: "5".into(),
                user: "carol".into()
            }),
            "the lowest job id"
        );
        assert_eq!(m.get(&1), None, "not a job's, or gone");
        assert_eq!(m[&2].job_id, "12");
        assert_eq!(m[&2].user, "bob");
    }
}
