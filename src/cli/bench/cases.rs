//! The bench's case list: the original's tables (text-to-image sizes, multi-reference stress,
//! upscale) plus load, as stable ids shared with the diffusers baseline.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Pipeline load; also records memory at rest.
    Load,
    /// Text-to-image at `w`x`h`.
    T2i { w: u32, h: u32 },
    /// `n` reference images (encoded every run) composed into a `w`x`h` output.
    Refs { n: u32, w: u32, h: u32 },
    /// Real-ESRGAN x4plus from a `side`² image to `4·side`².
    UpscaleX4 { side: u32 },
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Case::Load => write!(f, "load"),
            Case::T2i { w, h } => write!(f, "t2i-{w}x{h}"),
            Case::Refs { n, w, h } => write!(f, "refs{n}-{w}x{h}"),
            Case::UpscaleX4 { side } => write!(f, "upscale-x4plus-{side}"),
        }
    }
}

/// Every case, in report order.
pub fn all_cases() -> Vec<Case> {
    let mut v = vec![Case::Load];
    for (w, h) in [
        (512, 512),
        (768, 768),
        (1024, 768),
        (768, 1024),
        (1024, 1024),
        (1280, 1280),
    ] {
        v.push(Case::T2i { w, h });
    }
    for (w, h) in [(1024, 768), (768, 768), (512, 512)] {
        for n in [2, 4, 8, 12, 16] {
            v.push(Case::Refs { n, w, h });
        }
    }
    v.push(Case::UpscaleX4 { side: 1024 });
    v
}

fn parse_wh(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// Parses one case id (`t2i-WxH`, `refsN-WxH`, `upscale-x4plus-S`, `load`), so any size can be
/// benched, not only the default list's.
pub fn parse_case(s: &str) -> Option<Case> {
    if s == "load" {
        return Some(Case::Load);
    }
    if let Some(rest) = s.strip_prefix("t2i-") {
        let (w, h) = parse_wh(rest)?;
        return Some(Case::T2i { w, h });
    }
    if let Some(rest) = s.strip_prefix("upscale-x4plus-") {
        return Some(Case::UpscaleX4 {
            side: rest.parse().ok()?,
        });
    }
    if let Some(rest) = s.strip_prefix("refs") {
        let (n, wh) = rest.split_once('-')?;
        let (w, h) = parse_wh(wh)?;
        return Some(Case::Refs {
            n: n.parse().ok()?,
            w,
            h,
        });
    }
    None
}

/// Selects cases from a comma-separated filter. Each item is an exact case id (any size), a
/// prefix of the default ids ending in `*` (`t2i-*`, `refs1*`), or `all`. Order follows the
/// filter; duplicates are dropped.
pub fn select(filter: &str) -> Result<Vec<Case>, String> {
    let mut out: Vec<Case> = Vec::new();
    for item in filter.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let matched: Vec<Case> = if item == "all" {
            all_cases()
        } else if let Some(prefix) = item.strip_suffix('*') {
            all_cases()
                .into_iter()
                .filter(|c| c.to_string().starts_with(prefix))
                .collect()
        } else {
            vec![parse_case(item).ok_or_else(|| {
                format!(
                    "--cases: unknown case '{item}' (expected load, t2i-WxH, refsN-WxH, \
                     upscale-x4plus-S, a prefix ending in '*', or all)"
                )
            })?]
        };
        if matched.is_empty() {
            return Err(format!("--cases: '{item}' matches no case"));
        }
        for c in matched {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err("--cases: no case selected".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_list_matches_the_issue() {
        let ids: Vec<String> = all_cases().iter().map(|c| c.to_string()).collect();
        assert_eq!(ids.len(), 1 + 6 + 15 + 1);
        for id in [
            "load",
            "t2i-1280x1280",
            "t2i-768x1024",
            "refs16-1024x768",
            "refs2-512x512",
            "upscale-x4plus-1024",
        ] {
            assert!(ids.iter().any(|x| x == id), "{id} missing from {ids:?}");
        }
        // Every id parses back to its case.
        for c in all_cases() {
            assert_eq!(parse_case(&c.to_string()), Some(c));
        }
    }

    #[test]
    fn filters() {
        let t2i = select("t2i-*").unwrap();
        assert_eq!(t2i.len(), 6);
        assert_eq!(
            select("t2i-64x48, refs3-64x64,t2i-64x48").unwrap(),
            vec![
                Case::T2i { w: 64, h: 48 },
                Case::Refs { n: 3, w: 64, h: 64 }
            ]
        );
        assert_eq!(select("refs*").unwrap().len(), 15);
        let err = select("t2i-big").unwrap_err();
        assert!(err.contains("t2i-big"), "{err}");
        assert!(select("nope*").unwrap_err().contains("matches no case"));
        assert!(select(" , ").is_err());
    }
}
