//! LoRA key layouts and their mapping onto the diffusers Linear names this port loads.
//!
//! Three layouts circulate for FLUX.2 [klein] adapters; a file may only use one of them for the
//! transformer, but every key is classified on its own so the error names the first key that fits
//! none:
//!
//! * **diffusers / PEFT**: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, an
//!   optional `transformer.<module>.alpha`; text-encoder keys `text_encoder.<HF module>…`.
//! * **kohya**: `lora_unet_<BFL module, dots as underscores>.lora_down.weight` / `.lora_up.weight`
//!   / `.alpha`; text encoder `lora_te_…` / `lora_te1_…` over the HF module names.
//! * **BFL**: `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight` (or
//!   `lora_down`/`lora_up`), optional `.alpha`. BFL modules fuse what diffusers splits (the
//!   double blocks' `qkv`); the down matrix is shared and the up matrix is split by rows, exactly
//!   as the fused weight is split in `weights::bfl`.
//!
//! Underscored kohya names are not parsed by guessing where the dots were: every module the
//! base model has is enumerated from its config and looked up by its underscored form.

use std::collections::HashMap;

use crate::flux2::config::Qwen3Config;
use crate::flux2::transformer::Flux2TransformerConfig;
use crate::flux2::weights::{BflRows, bfl_rows_of};

/// Which layout a key is written in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LoraFormat {
    Diffusers,
    Kohya,
    Bfl,
}

impl LoraFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Kohya => "kohya",
            LoraFormat::Bfl => "bfl",
        }
    }
}

/// The model component a LoRA target lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Transformer,
    TextEncoder,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Transformer => "transformer",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// Which tensor of a LoRA pair a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// `lora_A` / `lora_down`: [rank, in].
    Down,
    /// `lora_B` / `lora_up`: [out, rank].
    Up,
    /// Scalar alpha: the pair is scaled by alpha / rank (1 when absent).
    Alpha,
}

/// What a file key refers to: a module of the base model (in the key's own naming) and a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub format: LoraFormat,
    pub component: Component,
    /// Module name in the naming of `format` (diffusers/HF name or BFL name).
    pub module: String,
    pub part: Part,
}

/// How a module's up matrix becomes a diffusers Linear's: all rows, a chunk (fused qkv), or
/// the two halves swapped (BFL's final-layer [shift; scale]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpRows {
    All,
    Chunk { index: usize, parts: usize },
    SwapHalves,
}

/// One diffusers Linear a module's LoRA lands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub component: Component,
    /// diffusers / HF module name (the Linear's weight is `<name>.weight`).
    pub name: String,
    pub rows: UpRows,
    /// The Linear's `[out, in]`.
    pub shape: (usize, usize),
}

/// Every Linear of the base model, by component, with its shape; the names LoRA keys must map to.
#[derive(Debug, Clone, Default)]
pub struct BaseLinears {
    /// diffusers name -> (out, in).
    pub transformer: HashMap<String, (usize, usize)>,
    /// HF name (`model.layers.{i}.self_attn.q_proj`, …) -> (out, in).
    pub text_encoder: HashMap<String, (usize, usize)>,
    /// Describes the base model in error messages (model id and sizes).
    pub description: String,
}

impl BaseLinears {
    /// The Linears of a FLUX.2 transformer and (optionally) its Qwen3 text encoder.
    pub fn new(
        t: &Flux2TransformerConfig,
        te: Option<&Qwen3Config>,
        description: impl Into<String>,
    ) -> Self {
        let d = t.inner_dim();
        let f = t.mlp_hidden();
        let mut tr = HashMap::new();
        let mut put = |n: String, out: usize, inp: usize| {
            tr.insert(n, (out, inp));
        };
        put("x_embedder".into(), d, t.in_channels);
        put("context_embedder".into(), d, t.joint_attention_dim);
        let te_p = "time_guidance_embed.timestep_embedder";
        put(format!("{te_p}.linear_1"), d, t.timestep_guidance_channels);
        put(format!("{te_p}.linear_2"), d, d);
        put("double_stream_modulation_img.linear".into(), 6 * d, d);
        put("double_stream_modulation_txt.linear".into(), 6 * d, d);
        put("single_stream_modulation.linear".into(), 3 * d, d);
        put("norm_out.linear".into(), 2 * d, d);
        put("proj_out".into(), t.out_channels(), d);
        for i in 0..t.num_layers {
            let p = format!("transformer_blocks.{i}");
            for n in [
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
            ] {
                put(format!("{p}.{n}"), d, d);
            }
            for ff in ["ff", "ff_context"] {
                put(format!("{p}.{ff}.linear_in"), 2 * f, d);
                put(format!("{p}.{ff}.linear_out"), d, f);
            }
        }
        for i in 0..t.num_single_layers {
            let p = format!("single_transformer_blocks.{i}.attn");
            put(format!("{p}.to_qkv_mlp_proj"), 3 * d + 2 * f, d);
            put(format!("{p}.to_out"), d, d + f);
        }
        let mut text = HashMap::new();
        if let Some(c) = te {
            let (h, hd) = (c.hidden_size, c.head_dim());
            let (nq, nkv, inter) = (
                c.num_attention_heads,
                c.num_key_value_heads,
                c.intermediate_size,
            );
            for i in 0..c.num_hidden_layers {
                let p = format!("model.layers.{i}");
                text.insert(format!("{p}.self_attn.q_proj"), (nq * hd, h));
                text.insert(format!("{p}.self_attn.k_proj"), (nkv * hd, h));
                text.insert(format!("{p}.self_attn.v_proj"), (nkv * hd, h));
                text.insert(format!("{p}.self_attn.o_proj"), (h, nq * hd));
                text.insert(format!("{p}.mlp.gate_proj"), (inter, h));
                text.insert(format!("{p}.mlp.up_proj"), (inter, h));
                text.insert(format!("{p}.mlp.down_proj"), (h, inter));
            }
        }
        Self {
            transformer: tr,
            text_encoder: text,
            description: description.into(),
        }
    }

    /// BFL module name -> the diffusers Linears it feeds (from `weights::bfl`'s mapping).
    fn bfl_modules(&self) -> HashMap<String, Vec<Target>> {
        let mut out: HashMap<String, Vec<Target>> = HashMap::new();
        for (name, &shape) in &self.transformer {
            let Some((bfl, rows)) = bfl_rows_of(&format!("{name}.weight")) else {
                continue;
            };
            let module = bfl.strip_suffix(".weight").unwrap_or(&bfl).to_string();
            let rows = match rows {
                BflRows::All => UpRows::All,
                BflRows::Chunk(index, parts) => UpRows::Chunk { index, parts },
                BflRows::SwapHalves => UpRows::SwapHalves,
            };
            out.entry(module).or_default().push(Target {
                component: Component::Transformer,
                name: name.clone(),
                rows,
                shape,
            });
        }
        for targets in out.values_mut() {
            targets.sort_by_key(|t| match t.rows {
                UpRows::Chunk { index, .. } => index,
                _ => 0,
            });
        }
        out
    }
}

/// Resolves parsed module names to the Linears they target; built once per base model.
pub struct KeyResolver {
    base: BaseLinears,
    bfl: HashMap<String, Vec<Target>>,
    /// Underscored name -> dotted name, for kohya keys.
    kohya_unet: HashMap<String, String>,
    kohya_te: HashMap<String, String>,
}

const PART_SUFFIXES: [(&str, Part); 6] = [
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".lora_A.default.weight", Part::Down),
];

impl KeyResolver {
    pub fn new(base: BaseLinears) -> Self {
        let bfl = base.bfl_modules();
        let kohya_unet = bfl
            .keys()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        let kohya_te = base
            .text_encoder
            .keys()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        Self {
            base,
            bfl,
            kohya_unet,
            kohya_te,
        }
    }

    pub fn base(&self) -> &BaseLinears {
        &self.base
    }

    /// Classifies one file key, or says why it fits no layout.
    pub fn parse(&self, key: &str) -> Result<ParsedKey, String> {
        let (stem, part) = PART_SUFFIXES
            .iter()
            .find_map(|(s, p)| key.strip_suffix(s).map(|stem| (stem, *p)))
            .or_else(|| {
                key.strip_suffix(".lora_B.default.weight")
                    .map(|s| (s, Part::Up))
            })
            .ok_or_else(|| {
                "not a LoRA tensor (expected a name ending in .lora_A.weight, .lora_B.weight, \
                 .lora_down.weight, .lora_up.weight or .alpha)"
                    .to_string()
            })?;
        let parsed = |format, component, module: &str| ParsedKey {
            format,
            component,
            module: module.to_string(),
            part,
        };
        if let Some(m) = stem.strip_prefix("transformer.") {
            return Ok(parsed(LoraFormat::Diffusers, Component::Transformer, m));
        }
        if let Some(m) = stem.strip_prefix("text_encoder.") {
            return Ok(parsed(LoraFormat::Diffusers, Component::TextEncoder, m));
        }
        if let Some(m) = stem
            .strip_prefix("model.diffusion_model.")
            .or_else(|| stem.strip_prefix("diffusion_model."))
        {
            return Ok(parsed(LoraFormat::Bfl, Component::Transformer, m));
        }
        if let Some(u) = stem.strip_prefix("lora_unet_") {
            let m = self.kohya_unet.get(u).ok_or_else(|| {
                format!("kohya module lora_unet_{u} is not a Linear of the base transformer")
            })?;
            return Ok(parsed(LoraFormat::Kohya, Component::Transformer, m));
        }
        if let Some(u) = stem
            .strip_prefix("lora_te1_")
            .or_else(|| stem.strip_prefix("lora_te_"))
        {
            let m = self.kohya_te.get(u).ok_or_else(|| {
                format!("kohya module {stem} is not a Linear of the base text encoder")
            })?;
            return Ok(parsed(LoraFormat::Kohya, Component::TextEncoder, m));
        }
        // PEFT files saved from the bare transformer carry no component prefix.
        if self.base.transformer.contains_key(stem) {
            return Ok(parsed(LoraFormat::Diffusers, Component::Transformer, stem));
        }
        Err(format!(
            "unknown layout for module '{stem}' (expected a transformer./text_encoder. \
             (diffusers), lora_unet_/lora_te_ (kohya) or diffusion_model. (BFL) prefix)"
        ))
    }

    /// The Linears a parsed module lands on (one, or three for BFL's fused qkv).
    pub fn targets(&self, key: &ParsedKey) -> Result<Vec<Target>, String> {
        let missing = |what: &str| {
            format!(
                "{what} '{}' is not a Linear of the base {} ({})",
                key.module,
                key.component.as_str(),
                self.base.description
            )
        };
        match (key.format, key.component) {
            (LoraFormat::Bfl | LoraFormat::Kohya, Component::Transformer) => self
                .bfl
                .get(&key.module)
                .cloned()
                .ok_or_else(|| missing("BFL module")),
            (_, Component::Transformer) => self
                .base
                .transformer
                .get(&key.module)
                .map(|&shape| {
                    vec![Target {
                        component: Component::Transformer,
                        name: key.module.clone(),
                        rows: UpRows::All,
                        shape,
                    }]
                })
                .ok_or_else(|| missing("diffusers module")),
            (_, Component::TextEncoder) => {
                if self.base.text_encoder.is_empty() {
                    return Err(format!(
                        "text-encoder LoRA module '{}' but no text encoder config is known",
                        key.module
                    ));
                }
                self.base
                    .text_encoder
                    .get(&key.module)
                    .map(|&shape| {
                        vec![Target {
                            component: Component::TextEncoder,
                            name: key.module.clone(),
                            rows: UpRows::All,
                            shape,
                        }]
                    })
                    .ok_or_else(|| missing("text-encoder module"))
            }
        }
    }
}
