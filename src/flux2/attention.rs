//! The DiT's attention backends and the self-check that picks one at model load.
//!
//! A fused kernel cannot be verified on a build machine without a GPU, so each compiled backend
//! proves itself on the device every time the model loads: it runs on the shapes the model will
//! use, in the serving dtype, is compared with `naive` computed in f32, and is timed against
//! `naive` in the serving dtype. The fastest that passes is used; one that errors, panics,
//! mismatches or is slower is not, and the report says why. `naive` (matmul, softmax, matmul in
//! query chunks) is always available and is the fallback.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::layers::chunked_attention_prescaled;

/// Most attention-score elements materialised at once by `naive` (query rows are chunked beyond
/// this): 2^27 bf16 scores are 256 MiB, plus as much again for the softmax. Chunks stay large
/// GEMMs: at 1024² (24 heads × 4608 keys) a chunk is ~1200 query rows.
pub const MAX_SCORES: usize = 1 << 27;

/// Name of the always-available backend.
pub const NAIVE: &str = "naive";

/// One way to compute scaled dot-product attention without a mask.
///
/// Inputs are `[B, H, S, D]` in the serving dtype, `q` already multiplied by 1/√D (the DiT folds
/// the scale into its f32 RoPE pass), so the softmax scale an implementation applies is 1. The
/// result is `[B, S, H·D]` in the input dtype.
pub trait AttentionKernel: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
}

/// Today's attention: matmul, softmax (f32 accumulation), matmul, in query chunks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Naive;

impl AttentionKernel for Naive {
    fn name(&self) -> &'static str {
        NAIVE
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        chunked_attention_prescaled(q, k, v, MAX_SCORES)
    }
}

/// The backend a model holds; cheap to clone.
#[derive(Clone)]
pub struct Attention(Arc<dyn AttentionKernel>);

impl Attention {
    pub fn new(kernel: Arc<dyn AttentionKernel>) -> Self {
        Self(kernel)
    }
    pub fn naive() -> Self {
        Self(Arc::new(Naive))
    }
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
    /// See [`AttentionKernel::forward`].
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.0.forward(q, k, v)
    }
}

impl Default for Attention {
    fn default() -> Self {
        Self::naive()
    }
}

impl fmt::Debug for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Attention({})", self.name())
    }
}

/// The fused backends this binary has for `device` (cargo features), besides `naive`. Empty in a
/// CPU build and on the CPU device: the self-check then has nothing to compare and is skipped.
pub fn compiled_backends(device: &Device) -> Vec<Arc<dyn AttentionKernel>> {
    // Every fused backend so far is a CUDA kernel.
    let cuda: Vec<Arc<dyn AttentionKernel>> = vec![
        #[cfg(feature = "cudnn-sdpa")]
        Arc::new(cudnn::CudnnSdpa),
    ];
    if device.is_cuda() { cuda } else { Vec::new() }
}

/// What `ATTENTION` / `--attention` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AttentionChoice {
    /// Self-check every compiled backend, use the fastest that passes, else `naive`.
    #[default]
    Auto,
    /// `naive`, no self-check.
    Naive,
    /// This backend; refuse to start if it is not compiled in or fails its self-check.
    Named(String),
}

impl FromStr for AttentionChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" | "" => Ok(Self::Auto),
            NAIVE => Ok(Self::Naive),
            name if name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                Ok(Self::Named(name.to_string()))
            }
            _ => Err(format!(
                "invalid ATTENTION {s:?}: expected auto, naive or a backend name"
            )),
        }
    }
}

impl fmt::Display for AttentionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Naive => f.write_str(NAIVE),
            Self::Named(n) => f.write_str(n),
        }
    }
}

/// clap value parser for `--attention`.
pub fn parse_attention(s: &str) -> std::result::Result<AttentionChoice, String> {
    s.parse()
}

/// One attention call the model makes: batch, heads, joint sequence length (text + image
/// tokens), head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckShape {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

/// What the self-check runs: the shapes, the serving dtype, timed iterations per shape.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    pub shapes: Vec<CheckShape>,
    pub dtype: DType,
    pub iters: usize,
}

/// Largest |fused − f32 reference| accepted, by serving dtype.
///
/// The reference is `naive` in f32 on the same (already rounded) inputs, whose values lie in
/// [−1, 1], so every output is a convex combination of such values and |out| ≤ 1. A correct
/// bf16 kernel rounds its output (≤ 2⁻⁹ ≈ 0.002) and usually its probabilities before the second
/// GEMM (each p off by ≤ 2⁻⁹ relative, partly cancelling in the sum); `naive` in bf16 also rounds
/// the scores themselves. 3e-2 is ~8 bf16 ulps at 1.0: an order above what correct kernels
/// show, an order below what a wrong tile, a missed block or a bad scale gives (≥ 0.1 on these
/// inputs). f16 has 3 more mantissa bits, hence 8× tighter; f32 only sums in another order.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 4e-3,
        _ => 1e-4,
    }
}

/// How one backend did in the self-check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidateReport {
    pub name: String,
    /// Ran without error or panic on every shape and stayed within `tolerance`.
    pub ok: bool,
    /// Mean milliseconds per call, summed over the checked shapes (None when it failed).
    pub time_ms: Option<f64>,
    /// Largest |output − f32 reference| over all shapes (None when it did not run).
    pub max_error: Option<f64>,
    pub tolerance: f64,
    /// Why it is not used (error, panic, mismatch, slower than naive), when it is not.
    pub reason: Option<String>,
}

/// The outcome of the selection, shown by /health and /metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttentionReport {
    /// The backend the DiT uses.
    pub selected: String,
    /// What was asked for (`auto`, `naive` or a name).
    pub requested: String,
    /// Serving dtype of the check (`bf16`, `f16`, `f32`).
    pub dtype: String,
    pub shapes: Vec<CheckShape>,
    /// `naive` in the serving dtype, checked and timed like the others (absent when no check ran).
    pub naive: Option<CandidateReport>,
    /// Every other backend considered, in the order checked.
    pub candidates: Vec<CandidateReport>,
}

/// Why the requested backend cannot be used; the service refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum AttentionError {
    #[error(
        "ATTENTION={name}: no such backend in this binary for this device (available: {compiled})"
    )]
    NotCompiled { name: String, compiled: String },
    #[error("ATTENTION={name} failed its self-check on the device: {reason}")]
    CheckFailed { name: String, reason: String },
}

/// Whether `choice` names a backend among `candidates` (or `auto`/`naive`). The server asks this
/// before loading weights, so a forced backend the binary or device lacks stops it at once.
pub fn check_available(
    choice: &AttentionChoice,
    candidates: &[Arc<dyn AttentionKernel>],
) -> std::result::Result<(), AttentionError> {
    let AttentionChoice::Named(name) = choice else {
        return Ok(());
    };
    if candidates.iter().any(|c| c.name() == name) {
        return Ok(());
    }
    let mut available = vec![NAIVE.to_string()];
    available.extend(candidates.iter().map(|c| c.name().to_string()));
    Err(AttentionError::NotCompiled {
        name: name.clone(),
        compiled: available.join(", "),
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Deterministic inputs in [−1, 1] that look unstructured to a kernel (no repeated rows or
/// columns, so a wrong tile offset shows): sin(97·sin(a·s + b·d + c·h + phase)).
fn check_input(shape: CheckShape, phase: f64, device: &Device) -> Result<Tensor> {
    let CheckShape {
        batch,
        heads,
        seq,
        head_dim,
    } = shape;
    let axis = |n: usize, step: f64, dims: (usize, usize, usize, usize)| -> Result<Tensor> {
        (Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)? * step)?.reshape(dims)
    };
    let s = axis(seq, 0.618_034, (1, 1, seq, 1))?;
    let d = axis(head_dim, 1.324_718, (1, 1, 1, head_dim))?;
    let h = axis(heads, 2.236_068, (1, heads, 1, 1))?;
    let x = ((s.broadcast_add(&d)?.broadcast_add(&h)? + phase)?.sin()? * 97.0)?.sin()?;
    x.broadcast_as((batch, heads, seq, head_dim))?.contiguous()
}

/// q (pre-scaled), k, v for one shape, in the serving dtype.
fn check_inputs(shape: CheckShape, dtype: DType, device: &Device) -> Result<[Tensor; 3]> {
    let scale = 1.0 / (shape.head_dim as f64).sqrt();
    // Sharper scores than the scale alone gives, so the softmax is not nearly uniform.
    let q = (check_input(shape, 0.1, device)? * (3.0 * scale))?;
    Ok([
        q.to_dtype(dtype)?,
        check_input(shape, 0.5, device)?.to_dtype(dtype)?,
        check_input(shape, 0.9, device)?.to_dtype(dtype)?,
    ])
}

/// One shape's inputs and the f32 reference output.
struct Case {
    inputs: [Tensor; 3],
    reference: Tensor,
}

fn run_caught(
    kernel: &dyn AttentionKernel,
    inputs: &[Tensor; 3],
) -> std::result::Result<Tensor, String> {
    match catch_unwind(AssertUnwindSafe(|| {
        kernel.forward(&inputs[0], &inputs[1], &inputs[2])
    })) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(p) => Err(format!("panicked: {}", panic_message(p.as_ref()))),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b)?
        .abs()?
        .flatten_all()?
        .max(0)?;
    Ok(d.to_scalar::<f32>()? as f64)
}

/// Checks and times one backend on every case.
fn check(
    kernel: &dyn AttentionKernel,
    cases: &[Case],
    plan: &CheckPlan,
    device: &Device,
) -> CandidateReport {
    let tol = tolerance(plan.dtype);
    let mut report = CandidateReport {
        name: kernel.name().to_string(),
        ok: false,
        time_ms: None,
        max_error: None,
        tolerance: tol,
        reason: None,
    };
    let mut total_ms = 0.0;
    let mut worst: f64 = 0.0;
    for (case, shape) in cases.iter().zip(&plan.shapes) {
        // First call: correctness (and warm-up: JIT, workspace allocation).
        let out = match run_caught(kernel, &case.inputs) {
            Ok(t) => t,
            Err(e) => {
                report.reason = Some(format!("{e} (shape {shape:?})"));
                return report;
            }
        };
        let expected = (shape.batch, shape.seq, shape.heads * shape.head_dim);
        if out.dims() != [expected.0, expected.1, expected.2] {
            report.reason = Some(format!(
                "output shape {:?}, expected {expected:?}",
                out.dims()
            ));
            return report;
        }
        match max_abs_diff(&out, &case.reference) {
            Ok(e) if e.is_finite() => worst = worst.max(e),
            Ok(e) => {
                report.reason = Some(format!(
                    "non-finite output (max error {e}, shape {shape:?})"
                ));
                return report;
            }
            Err(e) => {
                report.reason = Some(format!("comparing with the reference: {e}"));
                return report;
            }
        }
        report.max_error = Some(worst);
        let started = Instant::now();
        for _ in 0..plan.iters.max(1) {
            if let Err(e) = run_caught(kernel, &case.inputs) {
                report.reason = Some(format!("{e} (timed run, shape {shape:?})"));
                return report;
            }
        }
        if let Err(e) = device.synchronize() {
            report.reason = Some(format!("device synchronize: {e}"));
            return report;
        }
        total_ms += started.elapsed().as_secs_f64() * 1000.0 / plan.iters.max(1) as f64;
    }
    if worst > tol {
        report.reason = Some(format!("max error {worst:.3e} exceeds tolerance {tol:.1e}"));
        return report;
    }
    report.ok = true;
    report.time_ms = Some(total_ms);
    report
}

fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_ascii_lowercase()
}

/// Picks the attention backend for `choice` among `candidates` (the compiled fused backends,
/// see [`compiled_backends`]; tests inject their own), running the self-check of `plan` on
/// `device`.
///
/// `auto` never fails: with no candidate, or when none passes and beats `naive`, it returns
/// `naive` and the report says why each was rejected. A named backend that is absent or fails
/// its check is an error (the service must not start on a kernel that was asked for and is
/// broken); a named backend that is merely slower is used as asked.
pub fn select(
    choice: &AttentionChoice,
    candidates: &[Arc<dyn AttentionKernel>],
    plan: &CheckPlan,
    device: &Device,
) -> std::result::Result<(Attention, AttentionReport), AttentionError> {
    let mut report = AttentionReport {
        selected: NAIVE.into(),
        requested: choice.to_string(),
        dtype: dtype_name(plan.dtype),
        shapes: plan.shapes.clone(),
        naive: None,
        candidates: Vec::new(),
    };
    let considered: Vec<&Arc<dyn AttentionKernel>> = match choice {
        AttentionChoice::Naive => return Ok((Attention::naive(), report)),
        AttentionChoice::Auto if candidates.is_empty() => return Ok((Attention::naive(), report)),
        AttentionChoice::Auto => candidates.iter().collect(),
        AttentionChoice::Named(name) => {
            check_available(choice, candidates)?;
            candidates.iter().filter(|c| c.name() == name).collect()
        }
    };

    let cases = match build_cases(plan, device) {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("the f32 reference could not be computed: {e}");
            if let AttentionChoice::Named(name) = choice {
                return Err(AttentionError::CheckFailed {
                    name: name.clone(),
                    reason,
                });
            }
            tracing::warn!(%reason, "attention self-check skipped; using naive");
            report.candidates = considered
                .iter()
                .map(|c| CandidateReport {
                    name: c.name().into(),
                    ok: false,
                    time_ms: None,
                    max_error: None,
                    tolerance: tolerance(plan.dtype),
                    reason: Some(reason.clone()),
                })
                .collect();
            return Ok((Attention::naive(), report));
        }
    };
    let naive = check(&Naive, &cases, plan, device);
    if !naive.ok {
        tracing::warn!(reason = ?naive.reason, "naive attention itself fails the self-check");
    }
    let naive_ms = naive.time_ms;
    let mut best: Option<(usize, f64)> = None;
    for (i, kernel) in considered.iter().enumerate() {
        let mut r = check(kernel.as_ref(), &cases, plan, device);
        if let (AttentionChoice::Named(name), false) = (choice, r.ok) {
            return Err(AttentionError::CheckFailed {
                name: name.clone(),
                reason: r.reason.unwrap_or_default(),
            });
        }
        if let (true, Some(t)) = (r.ok, r.time_ms) {
            let forced = matches!(choice, AttentionChoice::Named(_));
            match naive_ms {
                Some(n) if t >= n && !forced => {
                    r.reason = Some(format!("slower than naive ({t:.3} ms vs {n:.3} ms)"));
                }
                _ => {
                    if best.is_none_or(|(_, bt)| t < bt) {
                        best = Some((i, t));
                    }
                }
            }
        }
        report.candidates.push(r);
    }
    let chosen = match best {
        Some((i, t)) => {
            for (j, r) in report.candidates.iter_mut().enumerate() {
                if j != i && r.ok && r.reason.is_none() {
                    r.reason = Some(format!(
                        "slower than {} ({:.3} ms vs {t:.3} ms)",
                        considered[i].name(),
                        r.time_ms.unwrap_or(f64::NAN)
                    ));
                }
            }
            Attention::new(considered[i].clone())
        }
        None => Attention::naive(),
    };
    report.selected = chosen.name().to_string();
    report.naive = Some(naive);
    for r in &report.candidates {
        match &r.reason {
            None => {
                tracing::info!(backend = %r.name, time_ms = ?r.time_ms, max_error = ?r.max_error,
                "attention backend selected")
            }
            Some(why) => tracing::warn!(backend = %r.name, reason = %why, max_error = ?r.max_error,
                "attention backend not used"),
        }
    }
    tracing::info!(selected = %report.selected, naive_ms = ?naive_ms, "attention self-check done");
    Ok((chosen, report))
}

fn build_cases(plan: &CheckPlan, device: &Device) -> Result<Vec<Case>> {
    plan.shapes
        .iter()
        .map(|&shape| {
            let inputs = check_inputs(shape, plan.dtype, device)?;
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let reference = Naive.forward(&f(&inputs[0])?, &f(&inputs[1])?, &f(&inputs[2])?)?;
            Ok(Case { inputs, reference })
        })
        .collect()
}

/// The shapes the DiT runs: joint attention (512 text tokens + the image tokens) at the largest
/// side the service accepts and at a small one (256², 256 image tokens), batch 1.
pub fn model_check_shapes(
    heads: usize,
    head_dim: usize,
    text_tokens: usize,
    max_side: u32,
) -> Vec<CheckShape> {
    let tokens = |side: u32| (side as usize / 16).pow(2);
    [max_side, 256]
        .into_iter()
        .map(|side| CheckShape {
            batch: 1,
            heads,
            seq: text_tokens + tokens(side),
            head_dim,
        })
        .collect()
}

/// Prometheus lines for the report: the selected backend as an info gauge, and per candidate
/// (naive included) whether it passed, its time and its max error.
pub fn report_metrics(report: &AttentionReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP imagegen_attention_backend_info Attention backend the DiT uses (value 1).\n\
         # TYPE imagegen_attention_backend_info gauge\n\
         imagegen_attention_backend_info{{backend=\"{}\",requested=\"{}\"}} 1",
        report.selected, report.requested
    );
    let all: Vec<&CandidateReport> = report.naive.iter().chain(&report.candidates).collect();
    type Value = fn(&CandidateReport) -> Option<f64>;
    let families: [(&str, &str, Value); 3] = [
        (
            "imagegen_attention_check_ok",
            "1 if the backend passed its load-time self-check.",
            |r| Some(r.ok as u8 as f64),
        ),
        (
            "imagegen_attention_check_seconds",
            "Self-check time per call, summed over the checked shapes.",
            |r| r.time_ms.map(|t| t / 1000.0),
        ),
        (
            "imagegen_attention_check_max_error",
            "Largest |output - f32 reference| in the self-check.",
            |r| r.max_error,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in &all {
            if let Some(v) = value(r) {
                let _ = writeln!(out, "{name}{{backend=\"{}\"}} {v}", r.name);
            }
        }
    }
    out
}

#[cfg(feature = "cudnn-sdpa")]
mod cudnn;
#[cfg(test)]
mod tests;
