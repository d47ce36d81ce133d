//! The seed's RAMLA ablation step grammar (spec 5.16) as matrix cells.
//!
//! A step is `<ARCH><digit>`: the digit picks the learning rate (0 → 6e-4,
//! 1 → 1.2e-3), the prefix the architecture. Every step uses the same
//! optimizer settings otherwise (the seed gave B0 and MLA* different ones).
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// (prefix, GPT-2 options, what it is), longest prefixes first.
const ARCHS: &[(&str, &str, &str)] = &[
    (
        "RAMLAKVME",
        r#"{"attention":"ra_mla_kvsplice","mlp":"splice","embed_latent":256}"#,
        "RA+MLA+KVSplice, latent MLP and 256-d embeddings",
    ),
    ("RAMLAKVM", r#"{"attention":"ra_mla_kvsplice","mlp":"splice"}"#, "RA+MLA+KVSplice with the latent MLP"),
    ("RAMLAKV", r#"{"attention":"ra_mla_kvsplice"}"#, "RA+MLA with KVSplice"),
    ("RAMLA", r#"{"attention":"ra_mla"}"#, "RA alternation over a token latent"),
    ("RALEARN", r#"{"attention":"ra"}"#, "GPT-2 with learned RA alternation"),
    ("MLAKV", r#"{"attention":"mla_kvsplice"}"#, "token latent + KVSplice"),
    ("MLA", r#"{"attention":"mla"}"#, "multi-head latent attention"),
    ("SBA", r#"{"attention":"sba"}"#, "causal symmetric bidirectional attention"),
    ("RA", r#"{"attention":"ra_route"}"#, "RA compute routing"),
    ("B", r#"{"attention":"mha"}"#, "baseline GPT-2"),
];

/// Options, learning rate and description of one step.
pub fn parse(step: &str) -> Result<(Value, f64, &'static str)> {
    let s = step.trim().to_ascii_uppercase();
    let Some(digit) = s.chars().last() else { bail!("empty ablation step") };
    let lr = match digit {
        '0' => 6e-4,
        '1' => 1.2e-3,
        _ => bail!("ablation step '{step}': must end in 0 (lr 6e-4) or 1 (lr 1.2e-3)"),
    };
    let prefix = &s[..s.len() - 1];
    if matches!(prefix, "SBASS" | "SBAKV") {
        bail!("ablation step '{step}': SBA's shared_skew and k_eq_v K/V modes are not implemented (SBA0/SBA1 are)");
    }
    match ARCHS.iter().find(|a| a.0 == prefix) {
        Some((_, opts, about)) => Ok((serde_json::from_str(opts)?, lr, about)),
        None => {
            let valid: Vec<&str> = ARCHS.iter().map(|a| a.0).collect();
            bail!(
                "ablation step '{step}': unknown architecture '{prefix}' (valid: {}; then 0 or 1)",
                valid.join(", ")
            )
        }
    }
}

/// A comma- or space-separated list of steps.
pub fn parse_list(list: &str) -> Result<Vec<(String, Value, f64)>> {
    let mut out = Vec::new();
    for s in list.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()) {
        let (v, lr, _) = parse(s)?;
        let id = s.to_ascii_uppercase();
        if out.iter().any(|(i, _, _): &(String, Value, f64)| *i == id) {
            bail!("ablation step '{id}' is listed twice");
        }
        out.push((id, v, lr));
    }
    Ok(out)
}

/// The default GPT-2 options of a plain preset name (matrix axis).
pub fn preset_options(name: &str) -> Value {
    json!({ "attention": name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let (v, lr, _) = parse("ramlakv1").unwrap();
        assert_eq!(v["attention"], "ra_mla_kvsplice");
        assert_eq!(lr, 1.2e-3);
        assert_eq!(parse("B0").unwrap().0["attention"], "mha");
        assert_eq!(parse("RA0").unwrap().0["attention"], "ra_route");
        assert_eq!(parse("RAMLAKVME0").unwrap().0["embed_latent"], 256);
        assert!(parse("MLA2").unwrap_err().to_string().contains("end in 0"));
        assert!(parse("XYZ0").unwrap_err().to_string().contains("valid: RAMLAKVME"));
        assert!(parse("SBASS0").unwrap_err().to_string().contains("not implemented"));
        let l = parse_list("B0, MLA0 RAMLA0").unwrap();
        assert_eq!(l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["B0", "MLA0", "RAMLA0"]);
        assert!(parse_list("B0,b0").is_err());
    }
}
