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
    /// 1-minute load averages sampled before and after every round.
    pub load_samples: Vec<f64>,
}

impl Machine {
    pub fn max_load(&self) -> f64 {
        self.load_samples.iter().copied().fold(0.0, f64::max)
    }

    /// Busy when the load exceeded half the cores at any sample: a figure taken then is not a
    /// figure (OpenMP threads suffer more than rayon's, which flatters candle).
    pub fn loaded(&self) -> bool {
        self.max_load() > self.cores as f64 / 2.0
    }
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
            "**LOADED MACHINE (load up to {:.2} on {} cores): these figures are not comparable.**\n\n",
            m.max_load(),
            m.cores
        );
    }
    out += &format!(
        "candle vs PyTorch {torch_version}, CPU f32, {} threads, interleaved · {} ({} cores) · \
         load {:.2}-{:.2}\n\n",
        m.threads,
        m.cpu,
        m.cores,
        m.load_samples.iter().copied().fold(f64::INFINITY, f64::min),
        m.max_load(),
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

    fn machine(loads: &[f64]) -> Machine {
        Machine {
            cpu: "test cpu".into(),
            cores: 2,
            threads: 2,
            load_samples: loads.to_vec(),
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
        let quiet = table(&pairs, &machine(&[0.4, 0.9]), "2.x");
        assert!(!quiet.contains("LOADED"), "{quiet}");
        assert!(
            quiet.contains("| vae | 210.0 (200.0-220.0) | 100.0 (100.0-140.0) | 2.10 | ≤ 1.5 |"),
            "{quiet}"
        );
        assert!(quiet.contains("load 0.40-0.90"), "{quiet}");
        // One sample above half the cores is enough.
        let busy = table(&pairs, &machine(&[0.4, 1.2]), "2.x");
        assert!(
            busy.starts_with("**LOADED MACHINE (load up to 1.20 on 2 cores)"),
            "{busy}"
        );
    }
}
