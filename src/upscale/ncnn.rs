//! Reader for realesrgan-ncnn-vulkan model files (`.param` text + `.bin` raw weights).
//!
//! These are the only real Real-ESRGAN weights reachable from package registries, so the tests
//! load the genuine x4plus through this path. The `.bin` has no names: weights follow the
//! `.param` layer order, which for both architectures is the PyTorch forward order, so names are
//! assigned by position (see `basicsr_names`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Tag before fp16 convolution weights (written by `ncnnoptimize ... 1`).
const TAG_F16: u32 = 0x0130_6B47;

/// One layer that carries weights, in file order.
#[derive(Debug)]
pub enum WeightLayer {
    Conv {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    PRelu {
        slope: Tensor,
    },
}

/// Layer types that hold no weights in `.bin`; anything else is rejected rather than misread.
const WEIGHTLESS: &[&str] = &[
    "Input",
    "Split",
    "Concat",
    "BinaryOp",
    "Eltwise",
    "Interp",
    "PixelShuffle",
    "ReLU",
    "Crop",
    "Noop",
];

struct ParamLayer {
    kind: String,
    name: String,
    params: HashMap<i32, String>,
}

fn parse_param(text: &str) -> Result<Vec<ParamLayer>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    if lines.next().map(str::trim) != Some("7767517") {
        return Err("missing ncnn magic 7767517 on line 1".into());
    }
    let counts: Vec<usize> = lines
        .next()
        .ok_or("missing layer/blob count line")?
        .split_whitespace()
        .map(|t| t.parse().map_err(|_| format!("bad count {t:?}")))
        .collect::<Result<_, _>>()?;
    let n_layers = *counts.first().ok_or("empty count line")?;
    let mut layers = Vec::with_capacity(n_layers);
    for line in lines {
        let tok: Vec<&str> = line.split_whitespace().collect();
        if tok.len() < 4 {
            return Err(format!("short layer line {line:?}"));
        }
        let n_in: usize = tok[2]
            .parse()
            .map_err(|_| format!("bad input count in {line:?}"))?;
        let n_out: usize = tok[3]
            .parse()
            .map_err(|_| format!("bad output count in {line:?}"))?;
        let first_kv = 4 + n_in + n_out;
        let mut params = HashMap::new();
        for kv in tok.iter().skip(first_kv) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("bad param {kv:?}"))?;
            let k: i32 = k.parse().map_err(|_| format!("bad param key {kv:?}"))?;
            params.insert(k, v.to_string());
        }
        layers.push(ParamLayer {
            kind: tok[0].to_string(),
            name: tok[1].to_string(),
            params,
        });
    }
    if layers.len() != n_layers {
        return Err(format!(
            "header says {n_layers} layers, found {}",
            layers.len()
        ));
    }
    Ok(layers)
}

fn int_param(layer: &ParamLayer, key: i32, default: Option<usize>) -> Result<usize, String> {
    match layer.params.get(&key) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("layer {}: param {key}={v} is not an integer", layer.name)),
        None => default.ok_or_else(|| format!("layer {}: missing param {key}", layer.name)),
    }
}

struct BinReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl BinReader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        let end = self.pos + n;
        if end > self.data.len() {
            return Err(format!(
                "weights file ends inside {what} (need {end} bytes, have {})",
                self.data.len()
            ));
        }
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>, String> {
        Ok(self
            .take(4 * n, what)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Reads the weighted layers of an ncnn model, in file order. Conv weights keep their stored
/// precision (fp16 stays F16) so conversions are lossless; biases and slopes are F32.
pub fn read_layers(param: &Path, bin: &Path) -> Result<Vec<WeightLayer>, String> {
    let text = std::fs::read_to_string(param).map_err(|e| format!("{}: {e}", param.display()))?;
    let data = std::fs::read(bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    let layers = parse_param(&text)?;
    let mut rd = BinReader {
        data: &data,
        pos: 0,
    };
    let mut out = Vec::new();
    for layer in &layers {
        match layer.kind.as_str() {
            "Convolution" => {
                let num_output = int_param(layer, 0, None)?;
                let kw = int_param(layer, 1, None)?;
                let kh = int_param(layer, 11, Some(kw))?;
                let bias_term = int_param(layer, 5, Some(0))? != 0;
                let size = int_param(layer, 6, None)?;
                if int_param(layer, 7, Some(1))? != 1 {
                    return Err(format!(
                        "layer {}: grouped convolution is not supported",
                        layer.name
                    ));
                }
                let in_c = size / (num_output * kh * kw);
                if in_c * num_output * kh * kw != size {
                    return Err(format!(
                        "layer {}: weight size {size} does not factor",
                        layer.name
                    ));
                }
                let shape = (num_output, in_c, kh, kw);
                let tag = u32::from_le_bytes(rd.take(4, "a weight tag")?.try_into().unwrap());
                let weight = match tag {
                    TAG_F16 => {
                        let bytes = rd.take(2 * size, "fp16 weights")?;
                        let v: Vec<half::f16> = bytes
                            .chunks_exact(2)
                            .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                            .collect();
                        // fp16 blocks are padded to a 4-byte boundary.
                        rd.take((4 - (2 * size) % 4) % 4, "padding")?;
                        Tensor::from_vec(v, shape, &Device::Cpu)
                    }
                    0 => Tensor::from_vec(rd.f32s(size, "fp32 weights")?, shape, &Device::Cpu),
                    t => {
                        return Err(format!(
                            "layer {}: unsupported weight tag {t:#010x}",
                            layer.name
                        ));
                    }
                }
                .map_err(|e| e.to_string())?;
                let bias = if bias_term {
                    let b = rd.f32s(num_output, "biases")?;
                    Some(Tensor::from_vec(b, num_output, &Device::Cpu).map_err(|e| e.to_string())?)
                } else {
                    None
                };
                out.push(WeightLayer::Conv { weight, bias });
            }
            "PReLU" => {
                let n = int_param(layer, 0, None)?;
                let slope = Tensor::from_vec(rd.f32s(n, "PReLU slopes")?, n, &Device::Cpu)
                    .map_err(|e| e.to_string())?;
                out.push(WeightLayer::PRelu { slope });
            }
            k if WEIGHTLESS.contains(&k) => {}
            k => return Err(format!("layer {} has unsupported type {k}", layer.name)),
        }
    }
    if rd.pos != data.len() {
        return Err(format!(
            "{} has {} bytes left over after the last layer: it does not belong to this .param",
            bin.display(),
            data.len() - rd.pos
        ));
    }
    Ok(out)
}

/// Names the weighted layers with BasicSR state-dict keys.
///
/// Any PReLU means SRVGGNetCompact (`body.{i}` in ModuleList order); otherwise RRDBNet, whose
/// convolutions appear as conv_first, 15 per RRDB block, then the five tail convolutions.
pub fn basicsr_names(layers: Vec<WeightLayer>) -> Result<HashMap<String, Tensor>, String> {
    let compact = layers
        .iter()
        .any(|l| matches!(l, WeightLayer::PRelu { .. }));
    let n = layers.len();
    let names: Vec<String> = if compact {
        (0..n).map(|i| format!("body.{i}")).collect()
    } else {
        if n < 6 || !(n - 6).is_multiple_of(15) {
            return Err(format!(
                "{n} convolutions do not form an RRDBNet (6 + 15·blocks)"
            ));
        }
        let mut v = vec!["conv_first".to_string()];
        for b in 0..(n - 6) / 15 {
            for r in 1..=3 {
                for c in 1..=5 {
                    v.push(format!("body.{b}.rdb{r}.conv{c}"));
                }
            }
        }
        v.extend(["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"].map(String::from));
        v
    };
    let mut map = HashMap::new();
    for (name, layer) in names.into_iter().zip(layers) {
        match layer {
            WeightLayer::Conv { weight, bias } => {
                map.insert(format!("{name}.weight"), weight);
                if let Some(b) = bias {
                    map.insert(format!("{name}.bias"), b);
                }
            }
            WeightLayer::PRelu { slope } => {
                map.insert(format!("{name}.weight"), slope);
            }
        }
    }
    Ok(map)
}

/// Loads an ncnn model as a BasicSR-named tensor map (weights F16 or F32 as stored).
pub fn load(param: &Path, bin: &Path) -> Result<HashMap<String, Tensor>, String> {
    basicsr_names(read_layers(param, bin)?)
}
