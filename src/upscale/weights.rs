//! Weight files: where they live, how each format is read, which architecture they hold, and
//! the one-time verified download of the official release files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use super::rrdbnet::RrdbConfig;
use super::srvgg::SrvggConfig;
use super::{UpscaleError, UpscaleModel};

/// Official release file of a model: cache name, URL and sha256 of the exact bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseFile {
    pub file_name: &'static str,
    pub url: &'static str,
    pub sha256: &'static str,
}

impl UpscaleModel {
    /// The file downloaded into the cache when nothing usable is there. `x4plus.pth` is the
    /// name the original service (and its Dockerfile) used.
    pub fn release_file(self) -> ReleaseFile {
        match self {
            UpscaleModel::X4Plus => ReleaseFile {
                file_name: "x4plus.pth",
                url: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
                sha256: "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            },
            UpscaleModel::X2Plus => ReleaseFile {
                file_name: "x2plus.pth",
                url: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
                sha256: "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            },
            UpscaleModel::GeneralX4V3 => ReleaseFile {
                file_name: "general-x4v3.pth",
                url: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth",
                sha256: "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
            },
        }
    }

    /// File names accepted in the cache folder, in order of preference (safetensors first,
    /// then `.pth`, then ncnn `.param` whose `.bin` sits next to it).
    pub fn cache_candidates(self) -> &'static [&'static str] {
        match self {
            UpscaleModel::X4Plus => &[
                "x4plus.safetensors",
                "RealESRGAN_x4plus.safetensors",
                "x4plus.pth",
                "RealESRGAN_x4plus.pth",
                "realesrgan-x4plus.param",
                "REALESRGAN_X4PLUS_UP4X.param",
            ],
            UpscaleModel::X2Plus => &[
                "x2plus.safetensors",
                "RealESRGAN_x2plus.safetensors",
                "x2plus.pth",
                "RealESRGAN_x2plus.pth",
            ],
            UpscaleModel::GeneralX4V3 => &[
                "general-x4v3.safetensors",
                "realesr-general-x4v3.safetensors",
                "general-x4v3.pth",
                "realesr-general-x4v3.pth",
                "realesrgan-x4fast.param",
                "realesr-general-x4v3.param",
            ],
        }
    }
}

/// Default cache folder: `~/.cache/realesrgan`, as in the original service.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("realesrgan")
}

/// The architecture a set of tensors describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arch {
    Rrdb(RrdbConfig),
    Compact(SrvggConfig),
}

impl Arch {
    /// Scale of one network pass.
    pub fn netscale(&self) -> u32 {
        match self {
            Arch::Rrdb(c) => c.scale as u32,
            Arch::Compact(c) => c.upscale as u32,
        }
    }

    /// Every state-dict key of this architecture (a checkpoint must hold exactly these).
    pub fn expected_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut conv = |n: &str| {
            keys.push(format!("{n}.weight"));
            keys.push(format!("{n}.bias"));
        };
        match self {
            Arch::Rrdb(c) => {
                conv("conv_first");
                for b in 0..c.num_block {
                    for r in 1..=3 {
                        for i in 1..=5 {
                            conv(&format!("body.{b}.rdb{r}.conv{i}"));
                        }
                    }
                }
                for n in ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"] {
                    conv(n);
                }
            }
            Arch::Compact(c) => {
                for i in 0..=c.num_conv {
                    conv(&format!("body.{}", 2 * i));
                }
                conv(&format!("body.{}", 2 * c.num_conv + 2));
                for i in 0..=c.num_conv {
                    keys.push(format!("body.{}.weight", 2 * i + 1));
                }
            }
        }
        keys
    }
}

fn dims(map: &HashMap<String, Tensor>, key: &str) -> Option<Vec<usize>> {
    map.get(key).map(|t| t.dims().to_vec())
}

/// Infers the architecture from tensor names and shapes (BasicSR names).
pub fn detect_arch(map: &HashMap<String, Tensor>) -> Result<Arch, String> {
    if let Some(first) = dims(map, "conv_first.weight") {
        let [num_feat, in_c, 3, 3] = first[..] else {
            return Err(format!(
                "conv_first.weight has shape {first:?}, expected [F, C, 3, 3]"
            ));
        };
        let (scale, num_in_ch) = match in_c {
            c if c % 48 == 0 && c >= 48 => (1, c / 16),
            12 => (2, 3),
            c => (4, c),
        };
        let num_block = (0..)
            .take_while(|b| map.contains_key(&format!("body.{b}.rdb1.conv1.weight")))
            .count();
        let num_grow_ch = dims(map, "body.0.rdb1.conv1.weight")
            .map(|d| d[0])
            .ok_or("no body.0.rdb1.conv1.weight: not an RRDBNet")?;
        let num_out_ch = dims(map, "conv_last.weight").ok_or("no conv_last.weight")?[0];
        return Ok(Arch::Rrdb(RrdbConfig {
            num_in_ch,
            num_out_ch,
            scale,
            num_feat,
            num_block,
            num_grow_ch,
        }));
    }
    if let Some(first) = dims(map, "body.0.weight") {
        let [num_feat, num_in_ch, 3, 3] = first[..] else {
            return Err(format!(
                "body.0.weight has shape {first:?}, expected [F, C, 3, 3]"
            ));
        };
        let n_layers = (0..)
            .take_while(|i| map.contains_key(&format!("body.{i}.weight")))
            .count();
        // conv, prelu, num_conv × (conv, prelu), conv
        if n_layers < 3 || n_layers % 2 == 0 {
            return Err(format!(
                "{n_layers} body layers do not form an SRVGGNetCompact"
            ));
        }
        let num_conv = (n_layers - 3) / 2;
        let last = dims(map, &format!("body.{}.weight", n_layers - 1)).unwrap_or_default();
        let out_c = last.first().copied().unwrap_or(0);
        // out_c = num_out_ch · upscale²; the official models are 3-channel.
        let num_out_ch = 3;
        let upscale = (1..=8)
            .find(|u| num_out_ch * u * u == out_c)
            .ok_or_else(|| format!("last conv has {out_c} outputs, not 3·r² for any r"))?;
        return Ok(Arch::Compact(SrvggConfig {
            num_in_ch,
            num_out_ch,
            num_feat,
            num_conv,
            upscale,
        }));
    }
    Err("neither conv_first.weight (RRDBNet) nor body.0.weight (SRVGGNetCompact) found".into())
}

/// Removes wrapper prefixes some converters add (`module.`, `netG.`, `model.`) when every key
/// carries them.
fn strip_common_prefix(map: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    for prefix in ["module.", "netG.", "model.", "generator."] {
        if !map.is_empty() && map.keys().all(|k| k.starts_with(prefix)) {
            let map = map
                .into_iter()
                .map(|(k, v)| (k[prefix.len()..].to_string(), v))
                .collect();
            return strip_common_prefix(map);
        }
    }
    map
}

/// Reads a weight file into a BasicSR-named tensor map on the CPU.
///
/// `.pth`/`.pt`: zip-format torch checkpoints, `params_ema` preferred over `params` (as
/// RealESRGANer does), else a bare state dict. `.safetensors`: BasicSR names. `.param` or
/// `.bin`: an ncnn model; its sibling with the other extension must exist.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>, UpscaleError> {
    let bad = |reason: String| UpscaleError::BadWeights {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(UpscaleError::WeightsMissing {
            path: path.to_path_buf(),
            fix: "point --weights / weights_file at an existing .pth, .safetensors or ncnn .param file"
                .into(),
        });
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let map: HashMap<String, Tensor> = match ext.as_str() {
        "safetensors" => candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| bad(e.to_string()))?,
        "pth" | "pt" | "ckpt" => load_pth(path).map_err(bad)?,
        "param" | "bin" => {
            let param = path.with_extension("param");
            let bin = path.with_extension("bin");
            for p in [&param, &bin] {
                if !p.is_file() {
                    return Err(UpscaleError::WeightsMissing {
                        path: p.clone(),
                        fix: "ncnn models need both the .param and the .bin file side by side"
                            .into(),
                    });
                }
            }
            super::ncnn::load(&param, &bin).map_err(bad)?
        }
        other => {
            return Err(bad(format!(
                "unknown extension {other:?}: expected .pth, .safetensors, or ncnn .param/.bin"
            )));
        }
    };
    Ok(strip_common_prefix(map))
}

/// A zip-format torch checkpoint's tensors: `params_ema`, else `params`, else a bare state dict.
fn load_pth(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let mut last_err = String::new();
    for key in [Some("params_ema"), Some("params"), None] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(v) if !v.is_empty() => return Ok(v.into_iter().collect()),
            Ok(_) => last_err = format!("no tensors under {key:?}"),
            Err(e) => last_err = e.to_string(),
        }
    }
    Err(format!(
        "not a readable zip-format torch checkpoint: {last_err}"
    ))
}

/// Finds the model's weights in `dir`, downloading the official file if allowed.
pub fn resolve_in_cache(
    model: UpscaleModel,
    dir: &Path,
    allow_download: bool,
) -> Result<PathBuf, UpscaleError> {
    for name in model.cache_candidates() {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let rel = model.release_file();
    let dest = dir.join(rel.file_name);
    if !allow_download {
        return Err(UpscaleError::WeightsMissing {
            path: dest,
            fix: format!(
                "downloads are disabled; put {} (sha256 {}) there, or any of {:?} in that folder, \
                 or pass a weights file",
                rel.url,
                rel.sha256,
                model.cache_candidates()
            ),
        });
    }
    download_verified(rel.url, rel.sha256, &dest)?;
    Ok(dest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deletes the temporary file unless the download completed and was renamed into place.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads `url` to `dest` via a temporary file in the same folder, checks its sha256 and
/// renames it into place, so the cache never holds a partial or wrong file.
///
/// Blocking: it drives its own small runtime on a helper thread, so it is safe to call from the
/// GPU worker thread or from inside `spawn_blocking`.
pub fn download_verified(url: &str, sha256: &str, dest: &Path) -> Result<(), UpscaleError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| UpscaleError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let file_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("weights");
    let tmp = dir.join(format!(".{file_name}.{}.{nanos}.part", std::process::id()));
    let mut guard = TempGuard(Some(tmp.clone()));

    let url_owned = url.to_string();
    let tmp_owned = tmp.clone();
    let result = std::thread::spawn(move || fetch_to_file(&url_owned, &tmp_owned))
        .join()
        .map_err(|_| UpscaleError::Download {
            url: url.to_string(),
            reason: "download thread panicked".into(),
        })?;
    let digest = result.map_err(|reason| UpscaleError::Download {
        url: url.to_string(),
        reason,
    })?;
    if !digest.eq_ignore_ascii_case(sha256) {
        return Err(UpscaleError::Checksum {
            url: url.to_string(),
            expected: sha256.to_string(),
            actual: digest,
        });
    }
    std::fs::rename(&tmp, dest).map_err(|e| UpscaleError::Io {
        path: dest.to_path_buf(),
        source: e,
    })?;
    guard.0 = None;
    tracing::info!(url, dest = %dest.display(), "downloaded Real-ESRGAN weights");
    Ok(())
}

/// Streams the body to `tmp` while hashing it; returns the hex sha256.
fn fetch_to_file(url: &str, tmp: &Path) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .read_timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?;
        let mut resp = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        file.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(hex(&hasher.finalize()))
    })
}
