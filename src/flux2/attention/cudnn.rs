//! `cudnn`: cuDNN 9's fused flash attention through the C++ shim `cudnn_sdpa.cpp` (cargo
//! feature `cudnn-sdpa`, built by `make build-cuda`).
//!
//! cuDNN is opened at the first call, not linked: on a box without `libcudnn.so.9` the call
//! fails, the self-check reports why, and the DiT stays on `naive`. The score matrix never
//! exists in memory; the output is written straight in the `[B, S, H·D]` layout the output
//! projection reads.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::AttentionKernel;

/// The backend's name in `ATTENTION`, logs, /health and /metrics.
pub const NAME: &str = "cudnn";

/// The cuDNN library opened at the first call; `CUDNN_LIBRARY` overrides (a path or a soname).
const DEFAULT_LIBRARY: &str = "libcudnn.so.9";

unsafe extern "C" {
    fn imagegen_cudnn_sdpa_open(
        library: *const c_char,
        version: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn imagegen_cudnn_sdpa_prepare(
        device: c_int,
        dtype: c_int,
        b: i64,
        h: i64,
        s: i64,
        d: i64,
        may_evict: c_int,
        workspace: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn imagegen_cudnn_sdpa_run(
        device: c_int,
        stream: *mut c_void,
        dtype: c_int,
        b: i64,
        h: i64,
        s: i64,
        d: i64,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        workspace: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

const ERR_LEN: usize = 2048;

/// What `imagegen_cudnn_sdpa_prepare` returns when its graph cache must be cleared first.
const CACHE_FULL: c_int = 2;

/// Calls one shim entry point with an error buffer; a non-zero return becomes a candle error.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    call_code(what, f).and_then(|code| match code {
        0 => Ok(()),
        c => candle_core::bail!("cudnn {what}: returned {c}"),
    })
}

/// [`call`], but hands back the shim's non-error codes (0, or [`CACHE_FULL`]).
fn call_code(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<c_int> {
    let mut buf = vec![0 as c_char; ERR_LEN];
    match f(buf.as_mut_ptr(), ERR_LEN) {
        code @ (0 | CACHE_FULL) => Ok(code),
        _ => {
            // SAFETY: the shim always NUL-terminates within ERR_LEN.
            let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
            candle_core::bail!("cudnn {what}: {msg}")
        }
    }
}

/// Opens cuDNN once per process; the outcome (its version, or why not) is kept.
fn opened() -> Result<i64> {
    static OPENED: OnceLock<std::result::Result<i64, String>> = OnceLock::new();
    OPENED
        .get_or_init(|| {
            let library =
                std::env::var("CUDNN_LIBRARY").unwrap_or_else(|_| DEFAULT_LIBRARY.to_string());
            let name = CString::new(library).map_err(|e| e.to_string())?;
            let mut version = 0i64;
            call("open", |err, len| unsafe {
                imagegen_cudnn_sdpa_open(name.as_ptr(), &mut version, err, len)
            })
            .map_err(|e| e.to_string())?;
            tracing::info!(version, "cuDNN opened for fused attention");
            Ok(version)
        })
        .clone()
        .map_err(candle_core::Error::msg)
}

/// cuDNN's fused attention. See the module doc.
#[derive(Debug, Clone, Copy, Default)]
pub struct CudnnSdpa;

impl AttentionKernel for CudnnSdpa {
    fn name(&self) -> &'static str {
        NAME
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (_, _, _, d) = q.dims4()?;
        if q.dims() != k.dims() || q.dims() != v.dims() {
            candle_core::bail!(
                "cudnn attention: q {:?}, k {:?}, v {:?} differ",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if !matches!(q.dtype(), DType::BF16 | DType::F16) || !d.is_multiple_of(8) || d > 256 {
            candle_core::bail!(
                "cudnn attention takes bf16/f16 with head_dim a multiple of 8 up to 256, got {:?} d={d}",
                q.dtype()
            );
        }
        opened()?;
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &SdpaOp)
    }
}

struct SdpaOp;

impl SdpaOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        s: [&CudaStorage; 3],
        l: [&Layout; 3],
        dtype_code: c_int,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, n, d) = l[0].shape().dims4()?;
        let dev = s[0].device().clone();
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let ordinal = stream.context().ordinal() as c_int;
        let views = [0, 1, 2].map(|i| {
            let offsets = l[i].contiguous_offsets();
            (s[i].as_cuda_slice::<T>(), offsets)
        });
        let mut inputs = Vec::with_capacity(3);
        for (slice, offsets) in views {
            let Some((start, end)) = offsets else {
                candle_core::bail!("cudnn attention: input is not contiguous")
            };
            inputs.push(slice?.slice(start..end));
        }
        let dims = [b, h, n, d].map(|x| x as i64);
        let mut workspace = 0i64;
        let prepare = |may_evict: c_int, workspace: &mut i64| {
            call_code("prepare", |err, len| unsafe {
                imagegen_cudnn_sdpa_prepare(
                    ordinal, dtype_code, dims[0], dims[1], dims[2], dims[3], may_evict, workspace,
                    err, len,
                )
            })
        };
        if prepare(0, &mut workspace)? == CACHE_FULL {
            // Cached graphs may still run on the stream: let them finish before they go.
            stream.synchronize().w()?;
            if prepare(1, &mut workspace)? != 0 {
                candle_core::bail!("cudnn prepare: the graph cache is still full after clearing");
            }
        }
        // SAFETY: fully written by the kernel before anything reads it.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(b * h * n * d)? };
        let mut scratch: Option<CudaSlice<u8>> = match workspace {
            0 => None,
            w => Some(unsafe { dev.alloc::<u8>(w as usize)? }),
        };
        {
            let (q, _q) = inputs[0].device_ptr(&stream);
            let (k, _k) = inputs[1].device_ptr(&stream);
            let (v, _v) = inputs[2].device_ptr(&stream);
            let (o, _o) = out.device_ptr_mut(&stream);
            let ws = scratch.as_mut().map(|w| w.device_ptr_mut(&stream));
            let ws_ptr = ws.as_ref().map_or(0, |(p, _)| *p);
            call("run", |err, len| unsafe {
                imagegen_cudnn_sdpa_run(
                    ordinal,
                    stream.cu_stream() as *mut c_void,
                    dtype_code,
                    dims[0],
                    dims[1],
                    dims[2],
                    dims[3],
                    q as *const c_void,
                    k as *const c_void,
                    v as *const c_void,
                    o as *mut c_void,
                    ws_ptr as *mut c_void,
                    err,
                    len,
                )
            })?;
        }
        // The workspace is freed (stream-ordered) only after the kernel that uses it.
        drop(scratch);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, n, h * d)),
        ))
    }
}

impl CustomOp3 for SdpaOp {
    fn name(&self) -> &'static str {
        "cudnn-sdpa"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn attention runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (s, l) = ([s1, s2, s3], [l1, l2, l3]);
        match s1.dtype() {
            DType::BF16 => self.run::<half::bf16>(s, l, 0),
            DType::F16 => self.run::<half::f16>(s, l, 1),
            dt => candle_core::bail!("cudnn attention: unsupported dtype {dt:?}"),
        }
    }
}
