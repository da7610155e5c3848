//! What a training log line says: an error of a class (GPU out of memory,
//! NCCL/RCCL, data I/O, segfault, Python traceback) or progress (step,
//! epoch, loss, throughput). Defaults cover PyTorch, the Hugging Face
//! Trainer, Lightning and DeepSpeed; `[sources.joblog]` adds patterns
//! (tried before the defaults) or turns the defaults off. Pure: tested on
//! log lines as data.

use regex::Regex;

/// Default error classes, in the order they are tried (the first match
/// names the line's class).
pub const DEFAULT_ERRORS: &[(&str, &str)] = &[
    (
        "gpu_oom",
        r"(?i)\b(?:cuda|hip)\b.*out of memory|OutOfMemoryError|hipErrorOutOfMemory|CUBLAS_STATUS_ALLOC_FAILED|\bout of memory\b.*\b(?:GPU|device)\b",
    ),
    (
        "nccl",
        r"(?i)\b(?:nccl|rccl)\w*\b.*\b(?:error|timeout|timed out|failure|failed|abort)|ProcessGroupNCCL.*(?:timeout|timed out)|Watchdog caught collective operation timeout|DistBackendError",
    ),
    (
        "data_io",
        r"(?i)Input/output error|Stale file handle|No such file or directory|FileNotFoundError|\[Errno (?:5|116|2)\]|ESTALE",
    ),
    (
        "segfault",
        r"(?i)segmentation fault|\bSIGSEGV\b|signal 11\b|core dumped",
    ),
    ("traceback", r"^Traceback \(most recent call last\):"),
];

/// A number: integer, decimal, exponent.
const NUM: &str = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?";
/// A loss value: a number, or NaN/Inf as Python, C and Rust print them.
const LOSS_VALUE: &str =
    r"(?i:[-+]?nan|[-+]?inf(?:inity)?|[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)";

/// Default progress patterns: each has one capture group, the value.
pub fn default_progress() -> Progress<&'static str> {
    Progress {
        step: vec![
            // `step 10`, `step=10`, `global_step: 10`, DeepSpeed `steps: 10`,
            // `iter 10`, `iteration 10/1000`.
            r"(?i)(?:^|[^a-z_])(?:global_step|steps?|iter(?:ation)?)['\x22]?\s*[=:]?\s*\[?(\d+)\b",
            // tqdm bars (Trainer, Lightning): `| 450/1000 [00:30<00:36`.
            r"\|\s*(\d+)/\d+\s*\[",
        ],
        epoch: vec![r"(?i)(?:^|[^a-z_])epoch['\x22]?\s*[=:]?\s*\[?(\d+(?:\.\d+)?)"],
        loss: vec![
            // `loss 0.5`, `loss=0.5`, `'loss': 0.5`, `train_loss: nan`,
            // Megatron's `lm loss: 2.3E+00`.
            r"(?i)(?:^|[^a-z_])(?:train_|training_|lm )?loss['\x22]?\s*[=:]?\s*(LOSS)",
        ],
        throughput: vec![
            // `samples/s 123`, `samples/sec: 123`, `'train_samples_per_second': 12.3`,
            // `tokens_per_sec=4000`, `tok/s: 4000`.
            r"(?i)(?:samples|tokens|tok|it)(?:/s(?:ec)?|_per_sec(?:ond)?|/second)['\x22]?\s*[=:]?\s*(NUM)",
            // `12.5 samples/s`, tqdm's `5.0it/s`.
            r"(?i)(NUM)\s*(?:samples|tokens|tok|it)/s\b",
        ],
    }
}

/// Progress patterns (or values) by quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress<T> {
    pub step: Vec<T>,
    pub epoch: Vec<T>,
    pub loss: Vec<T>,
    pub throughput: Vec<T>,
}

impl<T> Default for Progress<T> {
    fn default() -> Self {
        Progress {
            step: Vec::new(),
            epoch: Vec::new(),
            loss: Vec::new(),
            throughput: Vec::new(),
        }
    }
}

/// The last progress values read from one job's log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Values {
    pub step: Option<f64>,
    pub epoch: Option<f64>,
    pub loss: Option<f64>,
    pub throughput: Option<f64>,
}

/// Compiled patterns.
#[derive(Debug, Clone)]
pub struct Patterns {
    pub errors: Vec<(String, Regex)>,
    progress: Progress<Regex>,
}

fn compile(pattern: &str) -> Result<Regex, String> {
    let p = pattern.replace("LOSS", LOSS_VALUE).replace("NUM", NUM);
    Regex::new(&p).map_err(|e| format!("{pattern:?}: {e}"))
}

fn compile_all(list: &[String]) -> Result<Vec<Regex>, String> {
    list.iter().map(|p| compile(p)).collect()
}

impl Patterns {
    /// Configured patterns first, then (if `defaults`) the built-in ones.
    /// In progress patterns `NUM` stands for a number and `LOSS` for a
    /// loss value (NaN and Inf included).
    pub fn new(
        errors: &[(String, String)],
        progress: &Progress<String>,
        defaults: bool,
    ) -> Result<Patterns, String> {
        let mut err = Vec::new();
        for (class, p) in errors {
            err.push((class.clone(), compile(p)?));
        }
        let mut prog = Progress {
            step: compile_all(&progress.step)?,
            epoch: compile_all(&progress.epoch)?,
            loss: compile_all(&progress.loss)?,
            throughput: compile_all(&progress.throughput)?,
        };
        if defaults {
            for (class, p) in DEFAULT_ERRORS {
                err.push((class.to_string(), compile(p)?));
            }
            let d = default_progress();
            for (into, from) in [
                (&mut prog.step, d.step),
                (&mut prog.epoch, d.epoch),
                (&mut prog.loss, d.loss),
                (&mut prog.throughput, d.throughput),
            ] {
                for p in from {
                    into.push(compile(p)?);
                }
            }
        }
        Ok(Patterns {
            errors: err,
            progress: prog,
        })
    }

    /// The built-in patterns only.
    pub fn defaults() -> Patterns {
        // The built-in patterns are tested to compile.
        Patterns::new(&[], &Progress::default(), true).unwrap_or(Patterns {
            errors: Vec::new(),
            progress: Progress::default(),
        })
    }

    /// Every error class, in order, each once.
    pub fn classes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (c, _) in &self.errors {
            if !out.contains(&c.as_str()) {
                out.push(c);
            }
        }
        out
    }

    /// The error class of a line, if it is an error.
    pub fn error(&self, line: &str) -> Option<&str> {
        self.errors
            .iter()
            .find(|(_, re)| re.is_match(line))
            .map(|(c, _)| c.as_str())
    }

    /// Updates `v` with the progress the line reports.
    pub fn progress(&self, line: &str, v: &mut Values) {
        let first = |list: &[Regex]| {
            list.iter().find_map(|re| {
                re.captures(line)?
                    .get(1)
                    .and_then(|m| parse_value(m.as_str()))
            })
        };
        if let Some(x) = first(&self.progress.step) {
            v.step = Some(x);
        }
        if let Some(x) = first(&self.progress.epoch) {
            v.epoch = Some(x);
        }
        if let Some(x) = first(&self.progress.loss) {
            v.loss = Some(x);
        }
        if let Some(x) = first(&self.progress.throughput) {
            v.throughput = Some(x);
        }
    }
}

/// A number as logs print it; `nan`, `inf`, `-inf` included.
pub fn parse_value(s: &str) -> Option<f64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_prefix('+').unwrap_or(&t);
    match t {
        "nan" | "-nan" => Some(f64::NAN),
        "inf" | "infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `line` has error class `class` (None: no error) and updates the
    /// values from nothing to `want`.
    fn check(line: &str, class: Option<&str>, want: Values) {
        let p = Patterns::defaults();
        assert_eq!(p.error(line), class, "class of {line:?}");
        let mut v = Values::default();
        p.progress(line, &mut v);
        let same = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => a == b || (a.is_nan() && b.is_nan()),
            (a, b) => a == b,
        };
        assert!(
            same(v.step, want.step)
                && same(v.epoch, want.epoch)
                && same(v.loss, want.loss)
                && same(v.throughput, want.throughput),
            "{line:?}: got {v:?}, want {want:?}"
        );
    }

    fn vals(step: Option<f64>, epoch: Option<f64>, loss: Option<f64>, tp: Option<f64>) -> Values {
        Values {
            step,
            epoch,
            loss,
            throughput: tp,
        }
    }

    #[test]
    fn the_built_in_patterns_compile() {
        assert!(Patterns::new(&[], &Progress::default(), true).is_ok());
        assert_eq!(
            Patterns::defaults().classes(),
            ["gpu_oom", "nccl", "data_io", "segfault", "traceback"]
        );
    }

    #[test]
    fn pytorch_and_plain_progress_lines() {
        check(
            "step 10 loss 0.52 samples/s 123",
            None,
            vals(Some(10.0), None, Some(0.52), Some(123.0)),
        );
        check(
            "Epoch 2 | iter 1500/20000 | loss=1.234e-01 | 812.5 samples/s",
            None,
            vals(Some(1500.0), Some(2.0), Some(0.1234), Some(812.5)),
        );
        check(
            "step 40 loss nan samples/s 120",
            None,
            vals(Some(40.0), None, Some(f64::NAN), Some(120.0)),
        );
        check(
            "step 41 loss inf",
            None,
            vals(Some(41.0), None, Some(f64::INFINITY), None),
        );
        check("loading checkpoint shards", None, Values::default());
    }

    #[test]
    fn hugging_face_trainer_lines() {
        check(
            "{'loss': 0.123, 'grad_norm': 1.5, 'learning_rate': 4.5e-05, 'epoch': 1.5}",
            None,
            vals(None, Some(1.5), Some(0.123), None),
        );
        check(
            "{'train_runtime': 120.5, 'train_samples_per_second': 33.2, 'train_steps_per_second': 4.1, 'train_loss': 0.42, 'epoch': 3.0}",
            None,
            vals(None, Some(3.0), Some(0.42), Some(33.2)),
        );
        check(
            " 45%|████▌     | 450/1000 [01:30<01:50,  5.00it/s]",
            None,
            vals(Some(450.0), None, None, Some(5.0)),
        );
        check(
            "{'loss': nan, 'learning_rate': 1e-05, 'epoch': 0.2}",
            None,
            vals(None, Some(0.2), Some(f64::NAN), None),
        );
    }

    #[test]
    fn lightning_lines() {
        check(
            "Epoch 3:  45%|████▌     | 450/1000 [00:30<00:36, 15.00it/s, loss=0.512, v_num=0]",
            None,
            vals(Some(450.0), Some(3.0), Some(0.512), Some(15.0)),
        );
    }

    #[test]
    fn deepspeed_lines() {
        check(
            "[2024-05-01 10:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 0] step=200, skipped=0, lr=[0.0001], mom=[(0.9, 0.95)]",
            None,
            vals(Some(200.0), None, None, None),
        );
        check(
            "steps: 200 loss: 2.3456 iter time (s): 0.512 samples/sec: 62.500",
            None,
            vals(Some(200.0), None, Some(2.3456), Some(62.5)),
        );
    }

    #[test]
    fn error_lines_get_their_class() {
        let none = Values::default();
        for (line, class) in [
            (
                "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 31.98 GiB",
                "gpu_oom",
            ),
            (
                "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)",
                "gpu_oom",
            ),
            ("HIP out of memory", "gpu_oom"),
            (
                "torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, unhandled system error",
                "nccl",
            ),
            (
                "[E ProcessGroupNCCL.cpp:475] [Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1234, OpType=ALLREDUCE) ran for 1800000 milliseconds before timing out.",
                "nccl",
            ),
            ("node1:1234:5678 [0] NCCL INFO comm 0x1 rank 0", ""),
            (
                "rccl: RCCL WARN NET/IB : Got completion with error 12, opcode 0",
                "nccl",
            ),
            (
                "OSError: [Errno 5] Input/output error: '/data/imagenet/train/n01440764/x.JPEG'",
                "data_io",
            ),
            (
                "OSError: [Errno 116] Stale file handle: '/data/shard-0001.tar'",
                "data_io",
            ),
            (
                "FileNotFoundError: [Errno 2] No such file or directory: '/data/tokens/part-7.bin'",
                "data_io",
            ),
            (
                "/var/spool/slurmd/job01234/slurm_script: line 12:  4321 Segmentation fault      (core dumped) python train.py",
                "segfault",
            ),
            ("Fatal Python error: Segmentation fault", "segfault"),
            ("Traceback (most recent call last):", "traceback"),
        ] {
            check(line, (!class.is_empty()).then_some(class), none);
        }
    }

    #[test]
    fn configured_patterns_come_first_and_defaults_can_go() {
        let p = Patterns::new(
            &[("gpu_oom".into(), "ALLOC FAILED".into())],
            &Progress {
                step: vec![r"it#(\d+)".into()],
                loss: vec![r"L=(LOSS)".into()],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(p.error("ALLOC FAILED on gpu"), Some("gpu_oom"));
        assert_eq!(p.error("Traceback (most recent call last):"), None);
        let mut v = Values::default();
        p.progress("it#7 L=-inf step 9", &mut v);
        assert_eq!(v.step, Some(7.0));
        assert_eq!(v.loss, Some(f64::NEG_INFINITY));
        assert!(Patterns::new(&[("x".into(), "(".into())], &Progress::default(), true).is_err());
    }
}
