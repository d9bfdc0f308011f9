//! Property tests of the body parsers: random JSON, valid bodies with mutated fields, and
//! truncated or corrupted bytes never panic; a refusal always carries field paths rooted at
//! `body`, and a refusal caused by one mutated field names that field.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::{parse_generate, parse_upscale};
use crate::api::schemas::ValidationDetail;

/// Any JSON value, a few levels deep, with the strings and numbers validation cares about.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(2),
            Just(4),
            Just(256),
            Just(2048),
            Just(4096)
        ]
        .prop_map(|n| json!(n)),
        ".{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("http://x/1"),
            Just("png"),
            Just("webp"),
            Just("1e3"),
            Just("")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn valid_generate() -> Value {
    json!({"prompts": ["a fox", "a cat"], "upload_urls": ["http://x/1", "http://x/2"],
           "width": 512, "height": 512, "num_steps": 4, "guidance_scale": 1.0, "seed": 7,
           "output_format": "png", "upscale": 2,
           "images": [{"url": "http://x/r.png", "weight": 0.5}]})
}

fn valid_upscale() -> Value {
    json!({"image_url": "http://x/in.png", "upload_url": "http://x/out.png", "scale": 4,
           "output_format": "webp"})
}

/// Every detail is a field path rooted at `body`, with a message.
fn well_formed(details: &[ValidationDetail]) -> Result<(), TestCaseError> {
    prop_assert!(!details.is_empty(), "a refusal without details");
    for d in details {
        prop_assert_eq!(d.loc.first(), Some(&json!("body")), "{:?}", d);
        prop_assert!(!d.msg.is_empty(), "{:?}", d);
        prop_assert!(!d.kind.is_empty(), "{:?}", d);
    }
    Ok(())
}

/// A refusal of a body whose only change is `field` names that field (or the body as a whole,
/// for the prompts/upload_urls length check).
fn names_field(details: &[ValidationDetail], field: &str) -> Result<(), TestCaseError> {
    let named = details
        .iter()
        .any(|d| d.loc.get(1) == Some(&json!(field)) || d.loc == vec![json!("body")]);
    prop_assert!(
        named,
        "{field} changed but the errors name {:?}",
        details.iter().map(|d| &d.loc).collect::<Vec<_>>()
    );
    Ok(())
}

const GENERATE_FIELDS: &[&str] = &[
    "prompts",
    "upload_urls",
    "width",
    "height",
    "num_steps",
    "guidance_scale",
    "seed",
    "output_format",
    "upscale",
    "images",
];
const UPSCALE_FIELDS: &[&str] = &["image_url", "upload_url", "scale", "output_format"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn random_json_never_panics_and_refusals_carry_field_paths(v in any_json()) {
        let bytes = v.to_string().into_bytes();
        if let Err(d) = parse_generate(&bytes) {
            well_formed(&d)?;
        }
        if let Err(d) = parse_upscale(&bytes) {
            well_formed(&d)?;
        }
    }

    #[test]
    fn a_mutated_generate_field_is_named_in_the_refusal(
        i in 0..GENERATE_FIELDS.len(), value in any_json(), remove in any::<bool>()
    ) {
        let field = GENERATE_FIELDS[i];
        let mut body = valid_generate();
        if remove {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        match parse_generate(body.to_string().as_bytes()) {
            Ok(_) => {}
            Err(d) => {
                well_formed(&d)?;
                names_field(&d, field)?;
            }
        }
    }

    #[test]
    fn a_mutated_reference_or_prompt_item_is_named_by_index(
        value in any_json(), which in 0..3usize
    ) {
        let mut body = valid_generate();
        let (list, index) = match which {
            0 => ("prompts", 1),
            1 => ("upload_urls", 0),
            _ => ("images", 0),
        };
        body[list][index] = value;
        if let Err(d) = parse_generate(body.to_string().as_bytes()) {
            well_formed(&d)?;
            prop_assert!(
                d.iter().any(|e| e.loc.get(1) == Some(&json!(list)) && e.loc.get(2) == Some(&json!(index))
                    || e.loc == vec![json!("body")]),
                "{:?}", d.iter().map(|e| &e.loc).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_mutated_upscale_field_is_named_in_the_refusal(
        i in 0..UPSCALE_FIELDS.len(), value in any_json(), remove in any::<bool>()
    ) {
        let field = UPSCALE_FIELDS[i];
        let mut body = valid_upscale();
        if remove {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        if let Err(d) = parse_upscale(body.to_string().as_bytes()) {
            well_formed(&d)?;
            names_field(&d, field)?;
        }
    }

    #[test]
    fn truncated_and_corrupted_bytes_never_panic(
        cut in 0..400usize, flips in prop::collection::vec((0..400usize, any::<u8>()), 0..4)
    ) {
        for valid in [valid_generate(), valid_upscale()] {
            let mut bytes = valid.to_string().into_bytes();
            for (at, b) in &flips {
                let n = bytes.len();
                bytes[at % n] = *b;
            }
            bytes.truncate(cut.min(bytes.len()));
            if let Err(d) = parse_generate(&bytes) {
                well_formed(&d)?;
            }
            if let Err(d) = parse_upscale(&bytes) {
                well_formed(&d)?;
            }
        }
    }
}
