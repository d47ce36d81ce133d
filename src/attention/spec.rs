//! What an attention layer is, as independent axes, and the seed's named
//! variants as presets over them.
//!
//! | axis      | values                                                        |
//! |-----------|---------------------------------------------------------------|
//! | direction | standard `softmax(q_i·k_j)`, reciprocal `softmax(k_i·q_j)`,   |
//! |           | alternate (odd layers reciprocal, fixed), learned (a gate)    |
//! | kv        | proj (per-token K,V), latent (cached latent c), splice        |
//! |           | (latent through a learned KVSplice bottleneck), tied (K = V), |
//! |           | tied_t (K = x·W_v, the value weight transposed)               |
//! | q         | proj (its own d→d projection) or latent (from the latent c)   |
//! | mixer     | softmax (SDPA), sba (causal symmetric bidirectional), route   |
//! |           | (per-token compute routing between head groups)               |
//! | rope      | rotary position embedding on Q and K, besides `wpe`: off,     |
//! |           | full (over the whole head), or decoupled (a separate          |
//! |           | rotated part, DeepSeek-V2's, so latent decoding absorbs)      |
use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Standard,
    Reciprocal,
    /// Odd layers reciprocal, even layers standard, fixed.
    Alternate,
    /// A per-layer logit; p = σ(logit) > 0.5 picks reciprocal, and a
    /// straight-through estimator carries the loss's gradient to the logit.
    Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvSource {
    Proj,
    Latent,
    Splice,
    Tied,
    TiedT,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QSource {
    Proj,
    Latent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixer {
    Softmax,
    Sba,
    Route,
}

/// Where RoPE acts. Options take `false` (off), `true` (full) or the names
/// `"off"` (also `"none"`, `"false"`), `"full"` (also `"on"`, `"true"`)
/// and `"decoupled"`; a config writes `false`, `true` or `"decoupled"`, so
/// older checkpoints' booleans still load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    Off,
    /// Q and K rotated over the whole head (the seed's MLA: K rotated after
    /// the up-projection, so decoding must expand every cached latent).
    Full,
    /// Q = [q_c; rope(q_r)], K = [k_c; rope(k_r)] with k_r one rotated key
    /// of `hs/2` dims shared by the heads and cached beside the latent; k_c
    /// is unrotated, so the up-projection folds into the query.
    Decoupled,
}

impl Rope {
    pub fn on(self) -> bool {
        self != Rope::Off
    }

    fn parse(v: &str) -> Option<Rope> {
        match v.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "false" => Some(Rope::Off),
            "full" | "on" | "true" => Some(Rope::Full),
            "decoupled" => Some(Rope::Decoupled),
            _ => None,
        }
    }
}

impl Serialize for Rope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rope::Off => s.serialize_bool(false),
            Rope::Full => s.serialize_bool(true),
            Rope::Decoupled => s.serialize_str("decoupled"),
        }
    }
}

impl<'de> Deserialize<'de> for Rope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rope, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rope;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("false, true, \"off\", \"full\" or \"decoupled\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Rope, E> {
                Ok(if b { Rope::Full } else { Rope::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Rope, E> {
                Rope::parse(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// The resolved axes of every attention layer of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub direction: Direction,
    pub kv: KvSource,
    pub q: QSource,
    pub mixer: Mixer,
    pub rope: Rope,
}

/// (name, direction, kv, q, mixer, rope, what it is).
type Preset = (&'static str, Direction, KvSource, QSource, Mixer, Rope, &'static str);

/// The seed's variants (knlp-spec.md section 5) as presets.
pub const PRESETS: &[Preset] = &[
    (
        "mha",
        Direction::Standard,
        KvSource::Proj,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Off,
        "GPT-2's causal multi-head attention",
    ),
    (
        "ra",
        Direction::Learned,
        KvSource::Proj,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Off,
        "reciprocal attention alternation with a learned per-layer direction",
    ),
    (
        "mla",
        Direction::Standard,
        KvSource::Latent,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Full,
        "multi-head latent attention: K,V from a cached latent, RoPE",
    ),
    (
        "mla_decoupled",
        Direction::Standard,
        KvSource::Latent,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Decoupled,
        "mla with DeepSeek-V2's decoupled RoPE key: decoding reads the latent without expanding it",
    ),
    (
        "ra_mla",
        Direction::Learned,
        KvSource::Latent,
        QSource::Latent,
        Mixer::Softmax,
        Rope::Full,
        "RA alternation over a token latent (Q,K,V from one cached latent)",
    ),
    (
        "mla_kvsplice",
        Direction::Standard,
        KvSource::Splice,
        QSource::Latent,
        Mixer::Softmax,
        Rope::Full,
        "token latent through a learned KVSplice bottleneck; the cache holds the compressed latent",
    ),
    (
        "ra_mla_kvsplice",
        Direction::Learned,
        KvSource::Splice,
        QSource::Latent,
        Mixer::Softmax,
        Rope::Full,
        "ra_mla with the KVSplice bottleneck",
    ),
    (
        "sba",
        Direction::Standard,
        KvSource::Latent,
        QSource::Latent,
        Mixer::Sba,
        Rope::Full,
        "symmetric bidirectional attention, made causal",
    ),
    (
        "ra_route",
        Direction::Standard,
        KvSource::Proj,
        QSource::Proj,
        Mixer::Route,
        Rope::Off,
        "per-token compute routing between a full and a cheap head group",
    ),
    (
        "kv_tying",
        Direction::Standard,
        KvSource::Tied,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Off,
        "KV tying V1: K = V",
    ),
    (
        "kv_tying_t",
        Direction::Standard,
        KvSource::TiedT,
        QSource::Proj,
        Mixer::Softmax,
        Rope::Off,
        "KV tying V2: K = x·W_v (the value weight transposed)",
    ),
];

pub fn preset_names() -> String {
    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, v: &str, valid: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|_| anyhow::anyhow!("gpt2: unknown {what} '{v}' (valid: {valid})"))
}

impl Spec {
    /// A preset with optional per-axis overrides, validated.
    pub fn resolve(
        attention: &str,
        direction: Option<&str>,
        kv: Option<&str>,
        q: Option<&str>,
        rope: Option<Rope>,
    ) -> Result<Spec> {
        let Some(p) = PRESETS.iter().find(|p| p.0 == attention.trim().to_ascii_lowercase()) else {
            bail!("gpt2: unknown attention '{attention}' (valid: {})", preset_names());
        };
        let mut s = Spec { direction: p.1, kv: p.2, q: p.3, mixer: p.4, rope: p.5 };
        if let Some(d) = direction {
            s.direction = parse("direction", d, "standard, reciprocal, alternate, learned")?;
        }
        if let Some(k) = kv {
            s.kv = parse("kv source", k, "proj, latent, splice, tied, tied_t")?;
        }
        if let Some(qs) = q {
            s.q = parse("q source", qs, "proj, latent")?;
        }
        if let Some(r) = rope {
            s.rope = r;
        }
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        let latent = matches!(self.kv, KvSource::Latent | KvSource::Splice);
        if self.q == QSource::Latent && !latent {
            bail!("gpt2: q 'latent' needs a latent kv source (latent or splice), not {:?}", self.kv);
        }
        if self.reciprocal_possible() && latent && self.q == QSource::Proj {
            bail!(
                "gpt2: a reciprocal direction over a latent K/V needs Q from the latent too (q: \"latent\"): \
                 past queries are keys there, and only the latent is cached"
            );
        }
        if self.mixer != Mixer::Softmax && self.direction != Direction::Standard {
            bail!("gpt2: the {:?} mixer has its own direction; use direction \"standard\"", self.mixer);
        }
        if self.mixer == Mixer::Route && (self.kv != KvSource::Proj || self.q != QSource::Proj) {
            bail!("gpt2: ra_route needs kv \"proj\" and q \"proj\"");
        }
        if self.rope == Rope::Decoupled
            && (!latent || self.direction != Direction::Standard || self.mixer != Mixer::Softmax)
        {
            bail!(
                "gpt2: rope \"decoupled\" needs a latent kv source (latent or splice), direction \"standard\" \
                 and softmax mixing: it exists to fold the latent's up-projection into the query"
            );
        }
        Ok(())
    }

    /// Can a cached decode step attend over the latent without expanding
    /// it (`absorb`)? The K up-projection folds into the query only when
    /// nothing position-dependent sits between it and the score.
    pub fn absorbable(&self) -> bool {
        self.latent()
            && self.direction == Direction::Standard
            && self.mixer == Mixer::Softmax
            && self.rope != Rope::Full
    }

    pub fn reciprocal_possible(&self) -> bool {
        self.direction != Direction::Standard
    }

    pub fn latent(&self) -> bool {
        matches!(self.kv, KvSource::Latent | KvSource::Splice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_bad_combinations_are_named() {
        for p in PRESETS {
            Spec::resolve(p.0, None, None, None, None).unwrap();
        }
        let e = Spec::resolve("mla", Some("learned"), None, None, None).unwrap_err().to_string();
        assert!(e.contains("q: \"latent\""), "{e}");
        let e = Spec::resolve("mha", None, None, Some("latent"), None).unwrap_err().to_string();
        assert!(e.contains("latent kv source"), "{e}");
        let e = Spec::resolve("nope", None, None, None, None).unwrap_err().to_string();
        assert!(e.contains("valid: mha, ra"), "{e}");
        let e = Spec::resolve("mha", Some("sideways"), None, None, None).unwrap_err().to_string();
        assert!(e.contains("unknown direction 'sideways'"), "{e}");
        // A combination the seed never tried: tied K=V with reciprocal direction.
        let s = Spec::resolve("kv_tying", Some("alternate"), None, None, None).unwrap();
        assert_eq!((s.kv, s.direction), (KvSource::Tied, Direction::Alternate));
        let e = Spec::resolve("mha", None, None, None, Some(Rope::Decoupled)).unwrap_err().to_string();
        assert!(e.contains("needs a latent kv source"), "{e}");
        let e = Spec::resolve("ra_mla", None, None, None, Some(Rope::Decoupled)).unwrap_err().to_string();
        assert!(e.contains("direction \"standard\""), "{e}");
        let s = Spec::resolve("mla_kvsplice", None, None, None, Some(Rope::Decoupled)).unwrap();
        assert!(s.absorbable());
        assert!(!Spec::resolve("mla", None, None, None, None).unwrap().absorbable());
        assert!(Spec::resolve("mla", None, None, None, Some(Rope::Off)).unwrap().absorbable());
    }

    #[test]
    fn rope_reads_booleans_and_names() {
        let r: Rope = serde_json::from_str("true").unwrap();
        assert_eq!(r, Rope::Full);
        let r: Rope = serde_json::from_str("\"Decoupled\"").unwrap();
        assert_eq!(r, Rope::Decoupled);
        assert_eq!(serde_json::to_string(&Rope::Off).unwrap(), "false");
        assert_eq!(serde_json::to_string(&Rope::Decoupled).unwrap(), "\"decoupled\"");
        let e = serde_json::from_str::<Rope>("\"sideways\"").unwrap_err().to_string();
        assert!(e.contains("decoupled"), "{e}");
    }
}
