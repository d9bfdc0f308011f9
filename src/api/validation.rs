//! Request validation with FastAPI/pydantic-style errors.
//!
//! Requests are validated from a `serde_json::Value` by hand so that every error carries the
//! pydantic `type`, `loc`, `msg`, `input` and `ctx` the original clients see, and so that
//! pydantic's lax coercions (`"512"` and `512.0` for an int) keep working. Every bound comes
//! from [`crate::limits`].

use serde_json::{Map, Value, json};

use super::schemas::{GenerateRequest, LoraRef, ReferenceImage, UpscaleRequest, ValidationDetail};
use crate::io::OutputFormat;
use crate::limits::{
    DEFAULT_GUIDANCE, DEFAULT_REFERENCE_WEIGHT, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_UPSCALE_SCALE,
    MAX_GUIDANCE, MAX_PROMPTS, MAX_REFERENCE_WEIGHT, MAX_REFERENCES, MAX_SEED, MAX_SIZE, MAX_STEPS,
    MIN_SIZE, MIN_STEPS, UPSCALE_FACTORS,
};
use crate::limits::{LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_LORAS_PER_REQUEST};

/// A request body that validates itself (the [`super::extract::Validated`] extractor uses it).
pub trait Validate: Sized {
    fn validate(body: &[u8]) -> Result<Self, Vec<ValidationDetail>>;
}

impl Validate for GenerateRequest {
    fn validate(body: &[u8]) -> Result<Self, Vec<ValidationDetail>> {
        parse_generate(body)
    }
}

impl Validate for UpscaleRequest {
    fn validate(body: &[u8]) -> Result<Self, Vec<ValidationDetail>> {
        parse_upscale(body)
    }
}

/// Collects errors while reading fields; `None` results mean "invalid, already reported".
struct Checker {
    errors: Vec<ValidationDetail>,
}

type Loc = Vec<Value>;

fn loc(base: &Loc, part: impl Into<Value>) -> Loc {
    let mut l = base.clone();
    l.push(part.into());
    l
}

impl Checker {
    fn push(
        &mut self,
        kind: &str,
        loc: Loc,
        msg: impl Into<String>,
        input: &Value,
        ctx: Option<Value>,
    ) {
        self.errors.push(ValidationDetail {
            kind: kind.to_string(),
            loc,
            msg: msg.into(),
            input: input.clone(),
            ctx,
        });
    }

    fn missing(&mut self, loc: Loc, parent: &Value) {
        self.push("missing", loc, "Field required", parent, None);
    }

    fn string(&mut self, v: &Value, at: Loc) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.push("string_type", at, "Input should be a valid string", v, None);
                None
            }
        }
    }

    /// An integer with pydantic's lax rules: integral floats and numeric strings are accepted.
    fn int(&mut self, v: &Value, at: Loc) -> Option<i128> {
        match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(i as i128)
                } else if let Some(u) = n.as_u64() {
                    Some(u as i128)
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.fract() == 0.0 && f.is_finite() {
                        Some(f as i128)
                    } else {
                        self.push(
                            "int_from_float",
                            at,
                            "Input should be a valid integer, got a number with a fractional part",
                            v,
                            None,
                        );
                        None
                    }
                }
            }
            Value::Bool(b) => Some(*b as i128),
            Value::String(s) => match s.trim().parse::<i128>() {
                Ok(i) => Some(i),
                Err(_) => {
                    self.push(
                        "int_parsing",
                        at,
                        "Input should be a valid integer, unable to parse string as an integer",
                        v,
                        None,
                    );
                    None
                }
            },
            _ => {
                self.push("int_type", at, "Input should be a valid integer", v, None);
                None
            }
        }
    }

    fn float(&mut self, v: &Value, at: Loc) -> Option<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(*b as u8 as f64),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Some(f),
                _ => {
                    self.push(
                        "float_parsing",
                        at,
                        "Input should be a valid number, unable to parse string as a number",
                        v,
                        None,
                    );
                    None
                }
            },
            _ => {
                self.push("float_type", at, "Input should be a valid number", v, None);
                None
            }
        }
    }

    fn bounds<T: PartialOrd + Copy + Into<Value> + std::fmt::Display>(
        &mut self,
        value: T,
        min: T,
        max: T,
        v: &Value,
        at: Loc,
    ) -> Option<T> {
        if value < min {
            self.push(
                "greater_than_equal",
                at,
                format!("Input should be greater than or equal to {min}"),
                v,
                Some(json!({ "ge": min.into() })),
            );
            None
        } else if value > max {
            self.push(
                "less_than_equal",
                at,
                format!("Input should be less than or equal to {max}"),
                v,
                Some(json!({ "le": max.into() })),
            );
            None
        } else {
            Some(value)
        }
    }

    fn int_in(&mut self, v: &Value, at: Loc, min: i128, max: i128) -> Option<i128> {
        let i = self.int(v, at.clone())?;
        if i < min {
            self.push(
                "greater_than_equal",
                at,
                format!("Input should be greater than or equal to {min}"),
                v,
                Some(json!({ "ge": min as i64 })),
            );
            None
        } else if i > max {
            let le: Value = u64::try_from(max).map(Value::from).unwrap_or(Value::Null);
            self.push(
                "less_than_equal",
                at,
                format!("Input should be less than or equal to {max}"),
                v,
                Some(json!({ "le": le })),
            );
            None
        } else {
            Some(i)
        }
    }

    fn float_in(&mut self, v: &Value, at: Loc, min: f64, max: f64) -> Option<f64> {
        let f = self.float(v, at.clone())?;
        self.bounds(f, min, max, v, at)
    }

    fn list<'v>(
        &mut self,
        v: &'v Value,
        at: &Loc,
        min: usize,
        max: usize,
    ) -> Option<&'v Vec<Value>> {
        let Value::Array(items) = v else {
            self.push(
                "list_type",
                at.clone(),
                "Input should be a valid list",
                v,
                None,
            );
            return None;
        };
        let n = items.len();
        if n < min {
            let s = if min == 1 { "item" } else { "items" };
            self.push(
                "too_short",
                at.clone(),
                format!("List should have at least {min} {s} after validation, not {n}"),
                v,
                Some(json!({"field_type": "List", "min_length": min, "actual_length": n})),
            );
            None
        } else if n > max {
            self.push(
                "too_long",
                at.clone(),
                format!("List should have at most {max} items after validation, not {n}"),
                v,
                Some(json!({"field_type": "List", "max_length": max, "actual_length": n})),
            );
            None
        } else {
            Some(items)
        }
    }

    fn strings(&mut self, v: &Value, at: &Loc, max: usize) -> Option<Vec<String>> {
        let items = self.list(v, at, 1, max)?;
        let before = self.errors.len();
        let out: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.string(item, loc(at, i)))
            .collect();
        (self.errors.len() == before).then(|| out.into_iter().flatten().collect())
    }

    fn output_format(&mut self, v: &Value, at: Loc) -> Option<OutputFormat> {
        match v.as_str() {
            Some("png") => Some(OutputFormat::Png),
            Some("jpeg") => Some(OutputFormat::Jpeg),
            Some("webp") => Some(OutputFormat::Webp),
            _ => {
                self.push(
                    "literal_error",
                    at,
                    "Input should be 'png', 'jpeg' or 'webp'",
                    v,
                    Some(json!({"expected": "'png', 'jpeg' or 'webp'"})),
                );
                None
            }
        }
    }

    /// `Literal[2, 4]`: 2 and 2.0 pass, "2" does not (pydantic literal semantics).
    fn scale(&mut self, v: &Value, at: Loc) -> Option<u32> {
        let [a, b] = UPSCALE_FACTORS;
        match v.as_f64() {
            Some(f) if UPSCALE_FACTORS.iter().any(|&k| f64::from(k) == f) => Some(f as u32),
            _ => {
                self.push(
                    "literal_error",
                    at,
                    format!("Input should be {a} or {b}"),
                    v,
                    Some(json!({"expected": format!("{a} or {b}")})),
                );
                None
            }
        }
    }
}

/// Parses a body to a JSON object, or the FastAPI error for a malformed/non-object body.
fn body_object(body: &[u8]) -> Result<(Value, Map<String, Value>), Vec<ValidationDetail>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(vec![ValidationDetail {
            kind: "missing".into(),
            loc: vec![json!("body")],
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }]);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // FastAPI reports the character offset of the error.
        let offset = offset_of(body, e.line(), e.column());
        vec![ValidationDetail {
            kind: "json_invalid".into(),
            loc: vec![json!("body"), json!(offset)],
            msg: "JSON decode error".into(),
            input: json!({}),
            ctx: Some(json!({ "error": e.to_string() })),
        }]
    })?;
    match &value {
        Value::Object(map) => {
            let map = map.clone();
            Ok((value, map))
        }
        _ => Err(vec![ValidationDetail {
            kind: "model_attributes_type".into(),
            loc: vec![json!("body")],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            input: value,
            ctx: None,
        }]),
    }
}

fn offset_of(body: &[u8], line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in body.split(|b| *b == b'\n').enumerate() {
        if i + 1 == line {
            return offset + column.saturating_sub(1);
        }
        offset += l.len() + 1;
    }
    body.len()
}

/// Validates a `/generate` body.
pub fn parse_generate(body: &[u8]) -> Result<GenerateRequest, Vec<ValidationDetail>> {
    let (whole, obj) = body_object(body)?;
    let root = vec![json!("body")];
    let mut c = Checker { errors: Vec::new() };
    let field = |name: &str| obj.get(name);

    let prompts = match field("prompts") {
        Some(v) => c.strings(v, &loc(&root, "prompts"), MAX_PROMPTS),
        None => {
            c.missing(loc(&root, "prompts"), &whole);
            None
        }
    };
    let upload_urls = match field("upload_urls") {
        Some(v) => c.strings(v, &loc(&root, "upload_urls"), MAX_PROMPTS),
        None => {
            c.missing(loc(&root, "upload_urls"), &whole);
            None
        }
    };
    let images = match field("images") {
        None => Some(Vec::new()),
        Some(v) => {
            let at = loc(&root, "images");
            c.list(v, &at, 0, MAX_REFERENCES).map(|items| {
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| reference(&mut c, item, loc(&at, i)))
                    .collect::<Vec<_>>()
            })
        }
    };
    let width = int_field(
        &mut c,
        &obj,
        &root,
        "width",
        DEFAULT_SIZE,
        MIN_SIZE,
        MAX_SIZE,
    );
    let height = int_field(
        &mut c,
        &obj,
        &root,
        "height",
        DEFAULT_SIZE,
        MIN_SIZE,
        MAX_SIZE,
    );
    let num_steps = int_field(
        &mut c,
        &obj,
        &root,
        "num_steps",
        DEFAULT_STEPS,
        MIN_STEPS,
        MAX_STEPS,
    );
    let guidance_scale = match field("guidance_scale") {
        None => Some(DEFAULT_GUIDANCE),
        Some(v) => c.float_in(v, loc(&root, "guidance_scale"), 0.0, MAX_GUIDANCE),
    };
    let seed = match field("seed") {
        None | Some(Value::Null) => Some(None),
        Some(v) => c
            .int_in(v, loc(&root, "seed"), 0, MAX_SEED as i128)
            .map(|s| Some(s as u64)),
    };
    let upscale = match field("upscale") {
        None | Some(Value::Null) => Some(None),
        Some(v) => c.scale(v, loc(&root, "upscale")).map(Some),
    };
    let output_format = match field("output_format") {
        None => Some(OutputFormat::Png),
        Some(v) => c.output_format(v, loc(&root, "output_format")),
    };
    let loras = match field("loras") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(v) => {
            let at = loc(&root, "loras");
            c.list(v, &at, 0, MAX_LORAS_PER_REQUEST).map(|items| {
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| lora_ref(&mut c, item, loc(&at, i)))
                    .collect::<Vec<_>>()
            })
        }
    };

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let (Some(prompts), Some(upload_urls), Some(images), Some(loras)) =
        (prompts, upload_urls, images, loras)
    else {
        unreachable!("every None pushed an error")
    };
    if prompts.len() != upload_urls.len() {
        return Err(vec![ValidationDetail {
            kind: "value_error".into(),
            loc: root,
            msg: "Value error, prompts and upload_urls must have same length".into(),
            input: whole,
            ctx: Some(json!({"error": {}})),
        }]);
    }
    Ok(GenerateRequest {
        prompts,
        upload_urls,
        images,
        width: width.unwrap_or_default(),
        height: height.unwrap_or_default(),
        num_steps: num_steps.unwrap_or_default(),
        guidance_scale: guidance_scale.unwrap_or_default(),
        seed: seed.flatten(),
        upscale: upscale.flatten(),
        output_format: output_format.unwrap_or_default(),
        loras,
    })
}

fn lora_ref(c: &mut Checker, item: &Value, at: Loc) -> Option<LoraRef> {
    let Value::Object(map) = item else {
        c.push(
            "model_type",
            at,
            "Input should be a valid dictionary or instance of LoraRef",
            item,
            Some(json!({"class_name": "LoraRef"})),
        );
        return None;
    };
    let name = match map.get("name") {
        Some(v) => c.string(v, loc(&at, "name")),
        None => {
            c.missing(loc(&at, "name"), item);
            None
        }
    };
    let scale = match map.get("scale") {
        None => Some(1.0),
        Some(v) => c.float_in(v, loc(&at, "scale"), LORA_SCALE_MIN, LORA_SCALE_MAX),
    };
    Some(LoraRef {
        name: name?,
        scale: scale?,
    })
}

fn reference(c: &mut Checker, item: &Value, at: Loc) -> Option<ReferenceImage> {
    let Value::Object(map) = item else {
        c.push(
            "model_type",
            at,
            "Input should be a valid dictionary or instance of ReferenceImage",
            item,
            Some(json!({"class_name": "ReferenceImage"})),
        );
        return None;
    };
    let url = match map.get("url") {
        Some(v) => c.string(v, loc(&at, "url")),
        None => {
            c.missing(loc(&at, "url"), item);
            None
        }
    };
    let weight = match map.get("weight") {
        None => Some(DEFAULT_REFERENCE_WEIGHT),
        Some(v) => c.float_in(v, loc(&at, "weight"), 0.0, MAX_REFERENCE_WEIGHT),
    };
    Some(ReferenceImage {
        url: url?,
        weight: weight?,
    })
}

fn int_field(
    c: &mut Checker,
    obj: &Map<String, Value>,
    root: &Loc,
    name: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Option<u32> {
    match obj.get(name) {
        None => Some(default),
        Some(v) => c
            .int_in(v, loc(root, name), min as i128, max as i128)
            .map(|i| i as u32),
    }
}

/// Validates a `/upscale` body.
pub fn parse_upscale(body: &[u8]) -> Result<UpscaleRequest, Vec<ValidationDetail>> {
    let (whole, obj) = body_object(body)?;
    let root = vec![json!("body")];
    let mut c = Checker { errors: Vec::new() };
    let required_string = |c: &mut Checker, name: &str| match obj.get(name) {
        Some(v) => c.string(v, loc(&root, name)),
        None => {
            c.missing(loc(&root, name), &whole);
            None
        }
    };
    let image_url = required_string(&mut c, "image_url");
    let upload_url = required_string(&mut c, "upload_url");
    let scale = match obj.get("scale") {
        None => Some(DEFAULT_UPSCALE_SCALE),
        Some(v) => c.scale(v, loc(&root, "scale")),
    };
    let output_format = match obj.get("output_format") {
        None => Some(OutputFormat::Png),
        Some(v) => c.output_format(v, loc(&root, "output_format")),
    };
    match (image_url, upload_url, scale, output_format) {
        (Some(image_url), Some(upload_url), Some(scale), Some(output_format))
            if c.errors.is_empty() =>
        {
            Ok(UpscaleRequest {
                image_url,
                upload_url,
                scale,
                output_format,
            })
        }
        _ => Err(c.errors),
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(body: Value) -> Vec<(String, Vec<Value>)> {
        parse_generate(body.to_string().as_bytes())
            .unwrap_err()
            .into_iter()
            .map(|d| (d.kind, d.loc))
            .collect()
    }

    #[test]
    fn defaults_and_lax_coercion() {
        let r = parse_generate(
            br#"{"prompts":["a"],"upload_urls":["http://x/1"],"width":"512","height":768.0,
                "upscale":2.0,"extra":"ignored"}"#,
        )
        .unwrap();
        assert_eq!((r.width, r.height, r.num_steps), (512, 768, 4));
        assert_eq!(r.guidance_scale, 1.0);
        assert_eq!(r.upscale, Some(2));
        assert_eq!(r.seed, None);
        assert_eq!(r.output_format, OutputFormat::Png);
        assert!(r.images.is_empty());
    }

    #[test]
    fn nested_locations_and_types() {
        let got = locs(json!({
            "prompts": ["a", 3], "upload_urls": [],
            "images": [{"url": "u", "weight": 2.5}, {"weight": 1}, 7],
            "width": 512.5, "height": 100, "num_steps": "x", "seed": -1,
            "upscale": "2", "output_format": "jpg", "guidance_scale": 21
        }));
        let want: Vec<(String, Vec<Value>)> = vec![
            (
                "string_type".into(),
                vec![json!("body"), json!("prompts"), json!(1)],
            ),
            (
                "too_short".into(),
                vec![json!("body"), json!("upload_urls")],
            ),
            (
                "less_than_equal".into(),
                vec![json!("body"), json!("images"), json!(0), json!("weight")],
            ),
            (
                "missing".into(),
                vec![json!("body"), json!("images"), json!(1), json!("url")],
            ),
            (
                "model_type".into(),
                vec![json!("body"), json!("images"), json!(2)],
            ),
            ("int_from_float".into(), vec![json!("body"), json!("width")]),
            (
                "greater_than_equal".into(),
                vec![json!("body"), json!("height")],
            ),
            (
                "int_parsing".into(),
                vec![json!("body"), json!("num_steps")],
            ),
            (
                "less_than_equal".into(),
                vec![json!("body"), json!("guidance_scale")],
            ),
            (
                "greater_than_equal".into(),
                vec![json!("body"), json!("seed")],
            ),
            (
                "literal_error".into(),
                vec![json!("body"), json!("upscale")],
            ),
            (
                "literal_error".into(),
                vec![json!("body"), json!("output_format")],
            ),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn length_mismatch_is_reported_only_when_fields_are_valid() {
        let got = parse_generate(br#"{"prompts":["a","b"],"upload_urls":["u"]}"#).unwrap_err();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].kind, "value_error");
        assert_eq!(got[0].loc, vec![json!("body")]);
        assert_eq!(
            got[0].msg,
            "Value error, prompts and upload_urls must have same length"
        );
    }

    #[test]
    fn seed_bounds_keep_the_batch_in_64_bits() {
        let ok = format!(r#"{{"prompts":["a"],"upload_urls":["u"],"seed":{MAX_SEED}}}"#);
        assert_eq!(parse_generate(ok.as_bytes()).unwrap().seed, Some(MAX_SEED));
        let over = format!(
            r#"{{"prompts":["a"],"upload_urls":["u"],"seed":{}}}"#,
            MAX_SEED + 1
        );
        let err = parse_generate(over.as_bytes()).unwrap_err();
        assert_eq!(err[0].kind, "less_than_equal");
        let huge = br#"{"prompts":["a"],"upload_urls":["u"],"seed":1e30}"#;
        assert_eq!(parse_generate(huge).unwrap_err()[0].kind, "less_than_equal");
    }

    #[test]
    fn malformed_and_non_object_bodies() {
        let err = parse_generate(b"{\"prompts\": [").unwrap_err();
        assert_eq!(err[0].kind, "json_invalid");
        assert_eq!(err[0].loc[0], json!("body"));
        let err = parse_generate(b"[1]").unwrap_err();
        assert_eq!(err[0].kind, "model_attributes_type");
        let err = parse_generate(b"").unwrap_err();
        assert_eq!(
            (err[0].kind.as_str(), &err[0].loc),
            ("missing", &vec![json!("body")])
        );
        let err =
            parse_generate(br#"{"prompts":["a"],"upload_urls":["u"],"images":null}"#).unwrap_err();
        assert_eq!(err[0].kind, "list_type");
    }

    #[test]
    fn upscale_request() {
        let r = parse_upscale(br#"{"image_url":"a","upload_url":"b"}"#).unwrap();
        assert_eq!((r.scale, r.output_format), (4, OutputFormat::Png));
        let err = parse_upscale(br#"{"image_url":"a","scale":3}"#).unwrap_err();
        let kinds: Vec<_> = err
            .iter()
            .map(|d| (d.kind.as_str(), d.loc.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("missing", vec![json!("body"), json!("upload_url")]),
                ("literal_error", vec![json!("body"), json!("scale")]),
            ]
        );
    }
}
