//! Side-by-side CPU timing of candle against PyTorch that cannot mislead: the two run
//! interleaved in one command (A B, then B A, round after round) with the same thread count,
//! the machine's load is sampled around every round, and a table taken while the machine was busy
//! says so on its first line. `benches/cpu_vs_torch.rs` drives it; this module holds the
//! statistics and the table so they are unit-tested.

/// One case's timed runs on both sides, in ms.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Pair {
    pub case: String,
    pub candle_ms: Vec<f64>,
    pub torch_ms: Vec<f64>,
    /// The target for candle / PyTorch, if it has one.
    pub target_ratio: Option<f64>,
}

/// Median, min and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(xs: &[f64]) -> Option<Spread> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// The machine a table was measured on.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub threads: usize,
    /// 1-minute load averages sampled before the first round and after every round. They
    /// include the bench's own threads (a 2-thread bench on 2 cores reads about 2), so they are
    /// recorded, not judged.
    pub load_samples: Vec<f64>,
    /// Cores kept busy by other processes during each round: the machine's busy CPU time minus
    /// this process's and the PyTorch worker's, over the round's wall time.
    pub foreign_cores: Vec<f64>,
}

impl Machine {
    pub fn max_load(&self) -> f64 {
        self.load_samples.iter().copied().fold(0.0, f64::max)
    }

    pub fn max_foreign(&self) -> f64 {
        self.foreign_cores.iter().copied().fold(0.0, f64::max)
    }

    /// Busy when other processes used more than half the cores in any round: a figure taken
    /// then is not a figure (PyTorch's OpenMP threads suffer more than rayon's, which flatters
    /// candle).
    pub fn loaded(&self) -> bool {
        self.max_foreign() > self.cores as f64 / 2.0
    }
}

/// CPU time counters, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticks {
    /// Busy time of the whole machine (all but idle and iowait), from `/proc/stat`.
    pub machine_busy: u64,
    /// User + system time of the processes being measured, from `/proc/<pid>/stat`.
    pub ours: u64,
}

/// Cores used by everything but the measured processes between two samples `wall_s` apart
/// (`hz` ticks a second), never negative.
pub fn foreign_cores(before: Ticks, after: Ticks, wall_s: f64, hz: f64) -> f64 {
    let busy = after.machine_busy.saturating_sub(before.machine_busy);
    let ours = after.ours.saturating_sub(before.ours);
    if wall_s <= 0.0 {
        return 0.0;
    }
    busy.saturating_sub(ours) as f64 / hz / wall_s
}

/// The machine's busy ticks from `/proc/stat` text (the `cpu` line: user nice system idle
/// iowait irq softirq steal ...).
pub fn parse_proc_stat_busy(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    // guest time is already counted in user; stop at steal.
    let total: u64 = v.iter().take(8).sum();
    Some(total - v[3] - v[4])
}

/// utime + stime of one process from `/proc/<pid>/stat` text (the command name in parentheses
/// may contain spaces, so fields are counted after its closing parenthesis).
pub fn parse_pid_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3) ... utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The 1-minute load average from `/proc/loadavg` text.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The CPU model from `/proc/cpuinfo` text.
pub fn parse_cpu_model(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The ratio table (candle / PyTorch medians: above 1 means candle is slower).
pub fn table(pairs: &[Pair], m: &Machine, torch_version: &str) -> String {
    let mut out = String::new();
    if m.loaded() {
        out += &format!(
            "**LOADED MACHINE (other processes used up to {:.2} of {} cores): these figures are \
             not comparable.**\n\n",
            m.max_foreign(),
            m.cores
        );
    }
    out += &format!(
        "candle vs PyTorch {torch_version}, CPU f32, {} threads, interleaved · {} ({} cores) · \
         other processes ≤ {:.2} cores · load average {:.2}-{:.2} (bench included) · candle \
         barrier-pool spin limit {}\n\n",
        m.threads,
        m.cpu,
        m.cores,
        m.max_foreign(),
        m.load_samples.iter().copied().fold(f64::INFINITY, f64::min),
        m.max_load(),
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT")
            .unwrap_or_else(|_| "25000 (candle's default)".into()),
    );
    out += "| case | candle ms (min-max) | PyTorch ms (min-max) | candle / PyTorch | target |\n";
    out += "|---|---:|---:|---:|---:|\n";
    for p in pairs {
        let fmt = |s: Option<Spread>| match s {
            Some(s) => format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max),
            None => "-".into(),
        };
        let (c, t) = (spread(&p.candle_ms), spread(&p.torch_ms));
        let ratio = match (c, t) {
            (Some(c), Some(t)) if t.median > 0.0 => format!("{:.2}", c.median / t.median),
            _ => "-".into(),
        };
        let target = p
            .target_ratio
            .map(|r| format!("≤ {r:.1}"))
            .unwrap_or_default();
        out += &format!(
            "| {} | {} | {} | {ratio} | {target} |\n",
            p.case,
            fmt(c),
            fmt(t)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_and_the_ends() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn proc_files_are_parsed() {
        assert_eq!(parse_loadavg("0.52 0.61 0.70 1/234 5678\n"), Some(0.52));
        assert_eq!(parse_loadavg(""), None);
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n";
        assert_eq!(parse_cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
    }

    #[test]
    fn foreign_time_is_what_others_used() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        // 100 + 5 + 50 + 3 + 2 busy; idle 1000 and iowait 20 are not.
        assert_eq!(parse_proc_stat_busy(stat), Some(160));
        assert_eq!(parse_proc_stat_busy("intr 5\n"), None);
        let pid = "4242 (cpu vs (torch)) R 1 2 3 4 5 6 7 8 9 10 300 45 0 0 20 0";
        assert_eq!(parse_pid_stat_ticks(pid), Some(345));
        let (a, b) = (
            Ticks {
                machine_busy: 1000,
                ours: 400,
            },
            Ticks {
                machine_busy: 1300,
                ours: 600,
            },
        );
        // 300 busy ticks in 1 s at 100 Hz, 200 of them ours: others used one core.
        assert!((foreign_cores(a, b, 1.0, 100.0) - 1.0).abs() < 1e-12);
        assert_eq!(foreign_cores(b, a, 1.0, 100.0), 0.0);
    }

    fn machine(loads: &[f64], foreign: &[f64]) -> Machine {
        Machine {
            cpu: "test cpu".into(),
            cores: 2,
            threads: 2,
            load_samples: loads.to_vec(),
            foreign_cores: foreign.to_vec(),
        }
    }

    #[test]
    fn a_busy_machine_marks_the_table() {
        let pairs = [Pair {
            case: "vae".into(),
            candle_ms: vec![200.0, 220.0, 210.0],
            torch_ms: vec![100.0, 100.0, 140.0],
            target_ratio: Some(1.5),
        }];
        // The bench's own 2 threads put the load average near 2: not a reason to mark.
        let quiet = table(&pairs, &machine(&[0.4, 2.1], &[0.05, 0.3]), "2.x");
        assert!(!quiet.contains("LOADED"), "{quiet}");
        assert!(
            quiet.contains("| vae | 210.0 (200.0-220.0) | 100.0 (100.0-140.0) | 2.10 | ≤ 1.5 |"),
            "{quiet}"
        );
        assert!(quiet.contains("other processes ≤ 0.30 cores"), "{quiet}");
        assert!(quiet.contains("load average 0.40-2.10"), "{quiet}");
        // One round where others took more than half the cores is enough.
        let busy = table(&pairs, &machine(&[0.4, 2.1], &[0.05, 1.2]), "2.x");
        assert!(
            busy.starts_with("**LOADED MACHINE (other processes used up to 1.20 of 2 cores)"),
            "{busy}"
        );
    }
}
