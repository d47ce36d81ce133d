//! The experiment configuration: the project's Kconfig tree evaluated with a
//! `.config`, plus `make VAR=value` overrides, read into typed settings.
//!
//! Every symbol is read through [`Reader`], which records what it read; a
//! test fails for a Kconfig symbol no code reads and for a read of a symbol
//! Kconfig does not define.
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use kconfig::{Kconfig, SymbolType, Tristate};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::optim::{OptConfig, OptKind, SinkConfig, SpamConfig};
use crate::prune::PruneConfig;
use crate::train::TrainConfig;

/// Reads symbols by name, recording each read.
pub struct Reader<'a> {
    kc: &'a Kconfig,
    read: RefCell<BTreeSet<String>>,
}

impl<'a> Reader<'a> {
    pub fn new(kc: &'a Kconfig) -> Self {
        Reader { kc, read: RefCell::new(BTreeSet::new()) }
    }

    fn sym(&self, name: &str, want: &[SymbolType]) -> Result<kconfig::Symbol<'a>> {
        self.read.borrow_mut().insert(name.to_string());
        let s = self
            .kc
            .symbol(name)
            .filter(|s| s.is_defined())
            .ok_or_else(|| anyhow!("Kconfig defines no symbol {name}"))?;
        if !want.contains(&s.orig_type()) {
            bail!("Kconfig symbol {name} has type {:?}, expected {want:?}", s.orig_type());
        }
        Ok(s)
    }

    pub fn bool(&self, name: &str) -> Result<bool> {
        Ok(self.sym(name, &[SymbolType::Bool, SymbolType::Tristate])?.tri_value() != Tristate::N)
    }

    pub fn int(&self, name: &str) -> Result<i64> {
        let s = self.sym(name, &[SymbolType::Int, SymbolType::Hex])?;
        let v = s.str_value();
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(h) => i64::from_str_radix(h, 16),
            None => v.parse(),
        };
        parsed.map_err(|_| anyhow!("CONFIG_{name}={v}: not an integer"))
    }

    pub fn string(&self, name: &str) -> Result<String> {
        Ok(self.sym(name, &[SymbolType::String])?.str_value())
    }

    /// A float kept in a string symbol (`"3e-3"`): finite, and inside the
    /// symbol's interval in [`FLOAT_RULES`].
    pub fn float(&self, name: &str) -> Result<f64> {
        let v = self.string(name)?;
        let x = v.trim().parse::<f64>().map_err(|_| anyhow!("CONFIG_{name}=\"{v}\": not a number"))?;
        check_float(name, x).map_err(|why| anyhow!("CONFIG_{name}=\"{v}\": {why}"))?;
        Ok(x)
    }

    /// An int, or None when the symbol has no value (its menu is disabled).
    pub fn int_opt(&self, name: &str) -> Result<Option<i64>> {
        if self.sym(name, &[SymbolType::Int, SymbolType::Hex])?.str_value().is_empty() {
            return Ok(None);
        }
        self.int(name).map(Some)
    }

    /// A float string, or None when the symbol is disabled.
    pub fn float_opt(&self, name: &str) -> Result<Option<f64>> {
        let s = self.sym(name, &[SymbolType::String])?;
        if s.visibility() == Tristate::N && s.str_value().is_empty() {
            return Ok(None);
        }
        self.float(name).map(Some)
    }

    /// Names of every symbol read so far.
    pub fn read(&self) -> BTreeSet<String> {
        self.read.borrow().clone()
    }
}

/// The interval each float option must lie in: (symbol, low, high, high
/// included). Every float is also finite; a symbol not listed only needs
/// to be >= 0.
pub const FLOAT_RULES: &[(&str, f64, f64, bool)] = &[
    ("LEARNING_RATE", f64::MIN_POSITIVE, f64::MAX, true),
    ("ADAM_EPS", f64::MIN_POSITIVE, f64::MAX, true),
    ("ADAM_BETA1", 0.0, 1.0, false),
    ("ADAM_BETA2", 0.0, 1.0, false),
    ("SGD_MOMENTUM", 0.0, 1.0, false),
    ("GPT2_DROPOUT", 0.0, 1.0, false),
    ("PRUNING_SAMPLE_FRACTION", 0.0, 1.0, true),
    ("KVSPLICE_RATIO", f64::MIN_POSITIVE, 1.0, true),
    ("RA_ROUTE_HEAD_FRAC", 0.0, 1.0, true),
    ("RA_ROUTE_WARMUP_DROP", 0.0, 1.0, true),
    ("TIERING_HBM_THRESHOLD", 0.0, 1.0, true),
    ("TIERING_CPU_THRESHOLD", 0.0, 1.0, true),
    ("KV_PRUNE_EMA", 0.0, 1.0, false),
    ("KV_PRUNE_RECON_LR", f64::MIN_POSITIVE, f64::MAX, true),
];

/// Why `x` is not a valid value of float option `name`, if it is not.
pub fn check_float(name: &str, x: f64) -> std::result::Result<(), String> {
    if !x.is_finite() {
        return Err("must be a finite number".into());
    }
    let (lo, hi, closed) =
        FLOAT_RULES.iter().find(|r| r.0 == name).map(|r| (r.1, r.2, r.3)).unwrap_or((0.0, f64::MAX, true));
    let fits = x >= lo && if closed { x <= hi } else { x < hi };
    if fits {
        return Ok(());
    }
    let low = if lo == f64::MIN_POSITIVE { "> 0".to_string() } else { format!(">= {lo}") };
    Err(match (hi == f64::MAX, closed) {
        (true, _) => format!("must be {low}"),
        (false, true) => format!("must be {low} and <= {hi}"),
        (false, false) => format!("must be {low} and < {hi}"),
    })
}

/// (suffix, name) tables for the multi-select menus.
pub const MODELS: &[(&str, &str)] =
    &[("LENET5", "lenet5"), ("RESNET18", "resnet18"), ("RESNET50", "resnet50"), ("GPT2", "gpt2")];
pub const OPTIMIZERS: &[(&str, &str)] = &[
    ("SGD", "sgd"),
    ("ADAM", "adam"),
    ("ADAMW", "adamw"),
    ("ADAMWADV", "adamwadv"),
    ("ADAMWSPAM", "adamwspam"),
    ("SINKGD", "sinkgd"),
    ("ADAMWPRUNE", "adamwprune"),
];
pub const PRUNING: &[(&str, &str)] =
    &[("NONE", "none"), ("MAGNITUDE", "magnitude"), ("MOVEMENT", "movement"), ("STATE", "state")];
pub const SPARSITIES: &[(&str, f64)] = &[("50", 0.5), ("70", 0.7), ("90", 0.9), ("95", 0.95), ("99", 0.99)];
pub const GPT2_SIZES: &[(&str, Option<&str>)] = &[
    ("CUSTOM", None),
    ("124M", Some("124M")),
    ("350M", Some("350M")),
    ("774M", Some("774M")),
    ("1558M", Some("1558M")),
];

/// The attention presets of the matrix axis: (Kconfig suffix, preset).
pub const ATTENTIONS: &[(&str, &str)] = &[
    ("MHA", "mha"),
    ("RA", "ra"),
    ("MLA", "mla"),
    ("MLA_DECOUPLED", "mla_decoupled"),
    ("RA_MLA", "ra_mla"),
    ("MLA_KVSPLICE", "mla_kvsplice"),
    ("RA_MLA_KVSPLICE", "ra_mla_kvsplice"),
    ("SBA", "sba"),
    ("RA_ROUTE", "ra_route"),
    ("KV_TYING", "kv_tying"),
    ("KV_TYING_T", "kv_tying_t"),
];

/// One value of the GPT-2 attention axis: its id in cell names, the GPT-2
/// options it sets over the shared ones, and its learning rate when the
/// ablation step fixes one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttentionAxis {
    pub id: String,
    pub gpt2: Value,
    pub lr: Option<f64>,
}

/// Data settings shared by the cells.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataSpec {
    /// `fashion_mnist`, `cifar10` or `cifar100`.
    pub image_dataset: String,
    pub image_dir: String,
    pub batch_size: i64,
    pub augment: bool,
    pub text_dir: String,
    pub eval_batches: i64,
}

/// Everything `knlp train` needs to build and run the matrix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Experiment {
    pub models: Vec<String>,
    /// Model options by architecture (GPT-2's size, block, dropout, ...).
    pub gpt2: Value,
    /// GPT-2 attention variants (a matrix axis; ablation steps included);
    /// empty for GPT-2's own attention alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attentions: Vec<AttentionAxis>,
    pub optimizers: Vec<String>,
    /// Shared optimizer settings (lr, betas, weight decay, SPAM, ...).
    pub opt: OptConfig,
    pub adamwprune_base: OptKind,
    /// GRAD_CLIP_NORM: None is `auto` (see `matrix::opt_config`).
    #[serde(default)]
    pub clip_norm: Option<f64>,
    pub pruning: Vec<String>,
    pub sparsities: Vec<f64>,
    pub variants: Vec<String>,
    /// Schedule and mask settings shared by the pruned cells.
    pub prune: PruneConfig,
    pub data: DataSpec,
    pub train: TrainConfig,
    pub seed: i64,
    pub device: String,
    pub cpu_threads: i64,
    pub deterministic: bool,
    pub trackio: bool,
    pub project: String,
    pub runs_dir: PathBuf,
    pub parallel_jobs: i64,
    pub baseline: String,
    pub auto_graphs: bool,
    /// Ranks per cell (0: one process without a process group).
    #[serde(default)]
    pub nproc: i64,
    /// Seconds a rank waits for the others.
    #[serde(default = "default_dist_timeout")]
    pub dist_timeout: i64,
    /// HYPER_PARAM_AUTO: batch size and accumulation chosen per cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_batch: Option<crate::hyperparams::AutoBatch>,
    /// Image tokenizers (a matrix axis of the image models): `none`, `pca`,
    /// `spline_pca`; empty or `none` alone is no axis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokenizers: Vec<String>,
    #[serde(default)]
    pub tokenizer: crate::tokenizer::train::Settings,
}

fn default_dist_timeout() -> i64 {
    300
}

fn enabled<T: Clone>(r: &Reader, prefix: &str, table: &[(&str, T)]) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (suffix, v) in table {
        if r.bool(&format!("{prefix}{suffix}"))? {
            out.push(v.clone());
        }
    }
    Ok(out)
}

/// The one enabled member of a choice whose members are `<prefix><SUFFIX>`.
fn chosen<T: Clone>(r: &Reader, prefix: &str, table: &[(&str, T)]) -> Result<Option<T>> {
    let mut pick = None;
    for (suffix, v) in table {
        if r.bool(&format!("{prefix}{suffix}"))? {
            pick = Some(v.clone());
        }
    }
    Ok(pick)
}

impl Experiment {
    /// INFERENCE_TEST and its settings.
    fn inference(r: &Reader) -> Result<Option<crate::inference::InferenceConfig>> {
        // Every symbol is read, whether the menu is on or not.
        let (on, sizes) = (r.bool("INFERENCE_TEST")?, r.string("INFERENCE_BATCH_SIZES")?);
        let (warmup, runs) = (r.int_opt("INFERENCE_WARMUP")?, r.int_opt("INFERENCE_RUNS")?);
        if !on {
            return Ok(None);
        }
        let d = crate::inference::InferenceConfig::default();
        let sizes = match sizes.trim() {
            "" => d.batch_sizes,
            s => crate::inference::parse_batch_sizes(s)
                .map_err(|e| anyhow!("CONFIG_INFERENCE_BATCH_SIZES: {e}"))?,
        };
        let c = crate::inference::InferenceConfig {
            batch_sizes: sizes,
            warmup: warmup.unwrap_or(d.warmup),
            runs: runs.unwrap_or(d.runs),
        };
        c.validate().map_err(|e| anyhow!("CONFIG_INFERENCE_BATCH_SIZES: {e}"))?;
        Ok(Some(c))
    }

    /// ENABLE_HIERARCHICAL_TIERING and its settings (docs/tiering.md).
    fn tiering(r: &Reader) -> Result<Option<crate::tiering::TieringConfig>> {
        // Every symbol is read, whether the menu is on or not.
        let on = r.bool("ENABLE_HIERARCHICAL_TIERING")?;
        let mode = chosen(r, "TIERING_MODE_", &[("EMULATED", "emulated"), ("REAL_OFFLOAD", "real")])?;
        let (hbm, cpu) = (r.float_opt("TIERING_HBM_THRESHOLD")?, r.float_opt("TIERING_CPU_THRESHOLD")?);
        let (at, every) = (r.int_opt("TIERING_ASSIGN_STEP")?, r.int_opt("TIERING_REASSIGN_EVERY")?);
        let (write, file) = (r.bool("TIERING_GENERATE_JSON")?, r.string("TIERING_JSON_OUTPUT")?);
        if !on {
            return Ok(None);
        }
        let d = crate::tiering::TieringConfig::default();
        let c = crate::tiering::TieringConfig {
            mode: mode.unwrap_or("emulated").into(),
            hbm: hbm.unwrap_or(d.hbm),
            cpu: cpu.unwrap_or(d.cpu),
            assign_step: at.unwrap_or(0),
            reassign_every: every.unwrap_or(0),
            json: if write { file } else { String::new() },
        };
        c.validate()?;
        Ok(Some(c))
    }

    /// KV_PRUNE_EVAL and its settings (docs/attention.md).
    fn kv_prune_eval(r: &Reader) -> Result<Option<crate::decode::kveval::KvEvalConfig>> {
        // Every symbol is read, whether the menu is on or not.
        let on = r.bool("KV_PRUNE_EVAL")?;
        let ratios = r.string("KV_PRUNE_KEEP_RATIOS")?;
        let (k_min, recency) = (r.int_opt("KV_PRUNE_K_MIN")?, r.int_opt("KV_PRUNE_RECENCY")?);
        let (exposure, evict) = (r.bool("KV_PRUNE_EXPOSURE")?, r.bool("KV_PRUNE_EVICT")?);
        let (ema, ema_every) = (r.float_opt("KV_PRUNE_EMA")?, r.int_opt("KV_PRUNE_EMA_EVERY")?);
        let mode = chosen(r, "KV_PRUNE_MODE_", &[("V_ONLY", "v_only"), ("SCORES_REUSE", "scores_reuse")])?;
        let (seqs, prefill) = (r.int_opt("KV_PRUNE_SEQS")?, r.int_opt("KV_PRUNE_PREFILL")?);
        let recon = r.bool("KV_PRUNE_RECON")?;
        let (steps, lr) = (r.int_opt("KV_PRUNE_RECON_STEPS")?, r.float_opt("KV_PRUNE_RECON_LR")?);
        let recon_seqs = r.int_opt("KV_PRUNE_RECON_SEQS")?;
        if !on {
            return Ok(None);
        }
        let d = crate::decode::kveval::KvEvalConfig::default();
        let c = crate::decode::kveval::KvEvalConfig {
            keep_ratios: crate::decode::kveval::parse_ratios(&ratios)
                .map_err(|e| anyhow!("CONFIG_KV_PRUNE_KEEP_RATIOS=\"{ratios}\": {e}"))?,
            k_min: k_min.unwrap_or(d.k_min),
            recency: recency.unwrap_or(d.recency),
            exposure,
            ema: ema.unwrap_or(d.ema),
            ema_every: ema_every.unwrap_or(d.ema_every),
            mode: mode.unwrap_or("v_only").into(),
            evict,
            seqs: seqs.unwrap_or(d.seqs),
            prefill: prefill.unwrap_or(d.prefill),
            recon,
            recon_steps: steps.unwrap_or(d.recon_steps),
            recon_lr: lr.unwrap_or(d.recon_lr),
            recon_seqs: recon_seqs.unwrap_or(d.recon_seqs),
        };
        c.validate().map_err(|e| anyhow!("CONFIG_KV_PRUNE_*: {e}"))?;
        Ok(Some(c))
    }

    /// Read the evaluated configuration. Every symbol of the tree is read
    /// (values of disabled menus are simply unused).
    pub fn read(r: &Reader) -> Result<Experiment> {
        let models: Vec<String> = enabled(r, "MODEL_", MODELS)?.into_iter().map(String::from).collect();
        let optimizers: Vec<String> =
            enabled(r, "OPTIMIZER_", OPTIMIZERS)?.into_iter().map(String::from).collect();
        let pruning: Vec<String> = enabled(r, "PRUNING_", PRUNING)?.into_iter().map(String::from).collect();
        let sparsities = enabled(r, "SPARSITY_", SPARSITIES)?;
        let variants: Vec<String> = crate::prune::state_variants()
            .into_iter()
            .map(|v| Ok((v.to_string(), r.bool(&format!("ADAMWPRUNE_VARIANT_{}", v.to_ascii_uppercase()))?)))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(v, _)| v)
            .collect();

        let size = chosen(r, "GPT2_SIZE_", GPT2_SIZES)?.flatten();
        // GPT-2's options have values only while GPT-2 is enabled.
        let mut gpt2 = json!({ "bias": r.bool("GPT2_BIAS")?, "tie_weights": r.bool("GPT2_TIE_WEIGHTS")? });
        if let Some(b) = r.int_opt("GPT2_BLOCK_SIZE")? {
            gpt2["block_size"] = json!(b);
        }
        if let Some(d) = r.float_opt("GPT2_DROPOUT")? {
            gpt2["dropout"] = json!(d);
        }
        let (nl, nh, ne) = (r.int_opt("GPT2_N_LAYER")?, r.int_opt("GPT2_N_HEAD")?, r.int_opt("GPT2_N_EMBD")?);
        match size {
            Some(p) => gpt2["preset"] = json!(p),
            None => {
                for (k, v) in [("n_layer", nl), ("n_head", nh), ("n_embd", ne)] {
                    if let Some(v) = v {
                        gpt2[k] = json!(v);
                    }
                }
            }
        }

        // Attention knobs (shared by every variant cell). Only values that
        // differ from the model's defaults are recorded, so a configuration
        // from before these knobs existed reads back unchanged (and its
        // projects continue).
        let gd = crate::models::gpt2::Config::default();
        for (k, sym, default) in [
            ("splice_ratio", "KVSPLICE_RATIO", gd.splice_ratio),
            ("rope_theta", "ROPE_THETA", gd.rope_theta),
            ("ra_balance_weight", "RA_BALANCE_WEIGHT", gd.ra_balance_weight),
            ("route_head_frac", "RA_ROUTE_HEAD_FRAC", gd.route_head_frac),
            ("route_penalty", "RA_ROUTE_PENALTY", gd.route_penalty),
            ("route_warmup_drop", "RA_ROUTE_WARMUP_DROP", gd.route_warmup_drop),
        ] {
            if let Some(v) = r.float_opt(sym)?.filter(|&v| v != default) {
                gpt2[k] = json!(v);
            }
        }
        if let Some(v) = r.int_opt("MLA_D_LATENT")?.filter(|&v| v != gd.d_latent) {
            gpt2["d_latent"] = json!(v);
        }
        if let Some(e) = r.int_opt("EMBED_LATENT")?.filter(|&e| e > 0) {
            gpt2["embed_latent"] = json!(e);
        }
        if let Some(h) = r.int_opt("GPT2_MLP_HIDDEN")?.filter(|&h| h > 0) {
            for (sym, what) in [("GOLDEN_RATIO", "the RATIO shape"), ("ATTN_MLP_SPLICE", "the splice MLP")] {
                if r.bool(sym)? {
                    bail!("GPT2_MLP_HIDDEN={h} and {sym} both set the MLP ({what}); give one");
                }
            }
            gpt2["mlp_hidden"] = json!(h);
        }
        for (k, sym) in [
            ("route_skip_warmup", "RA_ROUTE_SKIP_WARMUP"),
            ("golden_ratio", "GOLDEN_RATIO"),
            ("fisher_metrics", "FISHER_METRICS"),
        ] {
            if r.bool(sym)? {
                gpt2[k] = json!(true);
            }
        }
        if r.bool("ATTN_MLP_SPLICE")? {
            gpt2["mlp"] = json!("splice");
        }
        let steps = r.string("RA_ABLATION_STEPS")?;
        let attentions: Vec<AttentionAxis> = if steps.trim().is_empty() {
            let on = enabled(r, "ATTENTION_", ATTENTIONS)?;
            if on == ["mha"] {
                // GPT-2's own attention alone: no axis (plain cell ids, as before).
                Vec::new()
            } else {
                on.into_iter()
                    .map(|a| AttentionAxis {
                        id: a.to_string(),
                        gpt2: crate::attention::steps::preset_options(a),
                        lr: None,
                    })
                    .collect()
            }
        } else {
            crate::attention::steps::parse_list(&steps)
                .map_err(|e| anyhow!("CONFIG_RA_ABLATION_STEPS: {e}"))?
                .into_iter()
                .map(|(id, gpt2, lr)| AttentionAxis { id, gpt2, lr: Some(lr) })
                .collect()
        };

        let sd = SpamConfig::default();
        let spam = SpamConfig {
            theta: r.float_opt("SPAM_THETA")?.unwrap_or(sd.theta),
            interval: r.int_opt("SPAM_INTERVAL")?.unwrap_or(sd.interval),
            warmup: r.int_opt("SPAM_WARMUP")?.unwrap_or(sd.warmup),
            enable_clip: r.bool("SPAM_ENABLE_CLIP")?,
            spike_threshold: r.float_opt("SPAM_SPIKE_THRESHOLD")?.unwrap_or(sd.spike_threshold),
            ..sd
        };
        let kd = SinkConfig::default();
        let sinkgd = SinkConfig {
            tau: r.float_opt("SINKGD_TAU")?.unwrap_or(kd.tau),
            n_iter: r.int_opt("SINKGD_ITERATIONS")?.unwrap_or(kd.n_iter),
        };
        let od = OptConfig::default();
        let opt = OptConfig {
            lr: r.float("LEARNING_RATE")?,
            weight_decay: r.float("WEIGHT_DECAY")?,
            beta1: r.float("ADAM_BETA1")?,
            beta2: r.float("ADAM_BETA2")?,
            eps: r.float("ADAM_EPS")?,
            momentum: r.float_opt("SGD_MOMENTUM")?.unwrap_or(od.momentum),
            nesterov: r.bool("SGD_NESTEROV")?,
            fused: r.bool("FUSED_ADAM")?,
            spam,
            sinkgd,
            ..OptConfig::default()
        };
        let base = [
            ("ADAM", OptKind::Adam),
            ("ADAMW", OptKind::AdamW),
            ("ADAMWADV", OptKind::AdamWAdv),
            ("ADAMWSPAM", OptKind::AdamWSpam),
        ];
        let adamwprune_base = chosen(r, "ADAMWPRUNE_BASE_", &base)?.unwrap_or(OptKind::AdamW);

        let movement = chosen(r, "MOVEMENT_", &[("KNLP", "knlp"), ("SANH", "sanh")])?.unwrap_or("knlp");
        let cubic = chosen(r, "PRUNING_SCHEDULE_", &[("CUBIC", true), ("LINEAR", false)])?.unwrap_or(true);
        let pd = PruneConfig::default();
        let prune = PruneConfig {
            variant: movement.to_string(),
            warmup: r.int_opt("PRUNING_WARMUP")?.unwrap_or(pd.warmup),
            ramp_end: r.int_opt("PRUNING_RAMP_END")?.unwrap_or(pd.ramp_end),
            ramp_end_epoch: r.float_opt("PRUNING_RAMP_END_EPOCH")?.unwrap_or(pd.ramp_end_epoch),
            frequency: r.int_opt("PRUNING_FREQUENCY")?.unwrap_or(pd.frequency),
            schedule: if cubic { "cubic" } else { "linear" }.into(),
            sample_fraction: r.float_opt("PRUNING_SAMPLE_FRACTION")?.unwrap_or(0.0),
            score_dtype: if r.bool("PRUNING_SCORE_FP16")? { "fp16" } else { "fp32" }.into(),
            prune_embeddings: r.bool("PRUNING_EMBEDDINGS")?,
            mask_state: r.bool("PRUNING_MASK_STATE")?,
            regrow: r.bool("PRUNING_REGROW")?,
            bitter10: crate::prune::bitter10::Bitter10Config {
                snapshot_every: r
                    .int_opt("PRUNING_BITTER10C_SNAPSHOT")?
                    .unwrap_or(pd.bitter10.snapshot_every),
                negate_m: r.bool("PRUNING_BITTER10_NEGATE_M")?,
                ..pd.bitter10.clone()
            },
            ..PruneConfig::default()
        };

        let datasets = [("FASHION_MNIST", "fashion_mnist"), ("CIFAR10", "cifar10"), ("CIFAR100", "cifar100")];
        let data = DataSpec {
            image_dataset: chosen(r, "IMAGE_DATASET_", &datasets)?.unwrap_or("fashion_mnist").to_string(),
            image_dir: r.string("IMAGE_DATA_DIR")?,
            batch_size: r.int("BATCH_SIZE")?,
            augment: r.bool("IMAGE_AUGMENT")?,
            text_dir: r.string("TEXT_DATA_DIR")?,
            eval_batches: r.int_opt("EVAL_BATCHES")?.unwrap_or(8),
        };

        let schedules = [
            ("AUTO", "auto"),
            ("CONSTANT", "constant"),
            ("WARMUP_COSINE", "warmup_cosine"),
            ("COSINE_EPOCH", "cosine_epoch"),
        ];
        let amps = [("BF16", "bf16"), ("FP16", "fp16"), ("NONE", "none")];
        let train = TrainConfig {
            steps: r.int("TRAIN_STEPS")?,
            epochs: r.int("TRAIN_EPOCHS")?,
            time_limit: r.int("TRAIN_TIME")? as f64,
            grad_accum: r.int("GRAD_ACCUM")?,
            eval_every: r.int("EVAL_EVERY")?,
            log_every: r.int("LOG_EVERY")?,
            checkpoint_every: r.int("CHECKPOINT_EVERY")?,
            schedule: chosen(r, "LR_SCHEDULE_", &schedules)?.unwrap_or("auto").into(),
            warmup: r.int_opt("LR_WARMUP")?.unwrap_or(0),
            min_lr: Some(r.float("MIN_LR")?),
            amp: chosen(r, "AMP_", &amps)?.unwrap_or("bf16").into(),
            tf32: r.bool("TF32")?,
            bucket_mb: r.int("DIST_BUCKET_MB")? as f64,
            fused_loss: r.bool("FUSED_LOSS")?,
            inference: Self::inference(r)?,
            gpu_monitor_ms: r.int("GPU_MONITOR_MS")?,
            tiering: Self::tiering(r)?,
            kv_prune_eval: Self::kv_prune_eval(r)?,
            ..TrainConfig::default()
        };
        let devices = [("AUTO", "auto"), ("CPU", "cpu"), ("CUDA", "cuda")];
        let clip_norm = match r.string("GRAD_CLIP_NORM")?.trim() {
            "auto" | "" => None,
            s => match s.parse::<f64>() {
                Ok(c) if c >= 0.0 && c.is_finite() => Some(c),
                _ => bail!("GRAD_CLIP_NORM must be auto, 0 or a positive number, got '{s}'"),
            },
        };
        // Tiering times GPT-2's modules and scores them by Adam's moments:
        // a matrix with anything else would fail per cell. Kconfig turns
        // the option off for such a matrix; one set to y is refused here.
        let asked =
            r.kc.symbol("ENABLE_HIERARCHICAL_TIERING").and_then(|s| s.user_value()).is_some_and(|v| v == "y");
        if train.tiering.is_some() || asked {
            let models_off: Vec<&String> = models.iter().filter(|m| *m != "gpt2").collect();
            if !models_off.is_empty() {
                bail!(
                    "CONFIG_ENABLE_HIERARCHICAL_TIERING needs GPT-2's hook points; the matrix also has {:?} \
                     (disable the tiering or those models)",
                    models_off
                );
            }
            let opts_off: Vec<&String> =
                optimizers.iter().filter(|o| matches!(o.as_str(), "sgd" | "sinkgd")).collect();
            if !opts_off.is_empty() {
                bail!(
                    "CONFIG_ENABLE_HIERARCHICAL_TIERING scores modules by Adam's moments; the matrix also has \
                     {:?}, which keep none (disable the tiering or those optimizers)",
                    opts_off
                );
            }
        }
        Ok(Experiment {
            models,
            gpt2,
            attentions,
            optimizers,
            opt,
            clip_norm,
            adamwprune_base,
            pruning,
            sparsities,
            variants,
            prune,
            data,
            train,
            seed: r.int("SEED")?,
            device: chosen(r, "DEVICE_", &devices)?.unwrap_or("auto").into(),
            cpu_threads: r.int("CPU_THREADS")?,
            deterministic: r.bool("DETERMINISTIC")?,
            trackio: r.bool("TRACKER_TRACKIO")?,
            project: {
                let p = r.string("TRACKER_PROJECT")?;
                if !p.trim().is_empty() {
                    check_project_name(p.trim()).map_err(|e| anyhow!("TRACKER_PROJECT (PROJECT=): {e}"))?;
                }
                p
            },
            runs_dir: PathBuf::from(r.string("RUNS_DIR")?),
            parallel_jobs: r.int("PARALLEL_JOBS")?,
            baseline: r.string("BASELINE")?,
            auto_graphs: r.bool("AUTO_GRAPHS")?,
            nproc: r.int("DIST_NPROC")?,
            dist_timeout: r.int("DIST_TIMEOUT")?,
            auto_batch: match (r.bool("HYPER_PARAM_AUTO")?, r.int_opt("TARGET_EFFECTIVE_BATCH")?) {
                (true, target) => Some(crate::hyperparams::AutoBatch { target: target.unwrap_or(0) }),
                (false, _) => None,
            },
            tokenizers: {
                let t: Vec<String> = enabled(r, "TOKENIZER_", crate::tokenizer::train::METHODS)?
                    .into_iter()
                    .map(String::from)
                    .collect();
                // `none` alone is no axis: the same cells as before the axis existed.
                if t == ["none"] {
                    Vec::new()
                } else {
                    t
                }
            },
            tokenizer: {
                let d = crate::tokenizer::train::Settings::default();
                let t = crate::tokenizer::train::Settings {
                    components: r.int_opt("TOKENIZER_COMPONENTS")?.unwrap_or(d.components),
                    fit_samples: r.int_opt("TOKENIZER_FIT_SAMPLES")?.unwrap_or(d.fit_samples),
                    smoothing: r.float_opt("TOKENIZER_SMOOTHING")?.unwrap_or(d.smoothing),
                };
                t.validate()?;
                t
            },
        })
    }
}

/// `make VAR=value` overrides: (variable, what it sets, how).
type Apply = fn(&mut Kconfig, &str) -> Result<()>;
pub const OVERRIDES: &[(&str, &str, Apply)] = &[
    ("TIME", "TRAIN_TIME (seconds per run)", |kc, v| set(kc, "TRAIN_TIME", v)),
    ("EPOCHS", "TRAIN_EPOCHS", |kc, v| set(kc, "TRAIN_EPOCHS", v)),
    ("STEPS", "TRAIN_STEPS", |kc, v| set(kc, "TRAIN_STEPS", v)),
    ("SEED", "SEED", |kc, v| set(kc, "SEED", v)),
    ("LR", "LEARNING_RATE", |kc, v| set(kc, "LEARNING_RATE", v)),
    ("BATCH_SIZE", "BATCH_SIZE", |kc, v| set(kc, "BATCH_SIZE", v)),
    ("PARALLEL_JOBS", "PARALLEL_JOBS", |kc, v| set(kc, "PARALLEL_JOBS", v)),
    ("NPROC", "DIST_NPROC (ranks per run)", |kc, v| set(kc, "DIST_NPROC", v)),
    ("BASELINE", "BASELINE", |kc, v| set(kc, "BASELINE", v)),
    ("PROJECT", "TRACKER_PROJECT", |kc, v| set(kc, "TRACKER_PROJECT", v)),
    ("DEVICE", "DEVICE_AUTO|CPU|CUDA", |kc, v| set(kc, &format!("DEVICE_{}", v.to_ascii_uppercase()), "y")),
    ("TRACKER", "TRACKER_TRACKIO (trackio, local or none)", |kc, v| {
        let names: Vec<&str> = v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        for n in &names {
            if !["trackio", "local", "none"].contains(n) {
                bail!("TRACKER={v}: unknown tracker '{n}' (valid: trackio, local, none)");
            }
        }
        set(kc, "TRACKER_TRACKIO", if names.contains(&"trackio") { "y" } else { "n" })
    }),
    ("MODELS", "MODEL_* (comma list)", |kc, v| set_list(kc, "MODELS", v, "MODEL_", MODELS)),
    ("OPTIMIZERS", "OPTIMIZER_* (comma list)", |kc, v| {
        set_list(kc, "OPTIMIZERS", v, "OPTIMIZER_", OPTIMIZERS)
    }),
    ("PRUNING", "PRUNING_* (comma list)", |kc, v| set_list(kc, "PRUNING", v, "PRUNING_", PRUNING)),
    ("SPARSITY", "SPARSITY_* (comma list of 50, 70, 90, 95, 99)", |kc, v| {
        let names: Vec<(&str, &str)> = SPARSITIES.iter().map(|(s, _)| (*s, *s)).collect();
        set_list(kc, "SPARSITY", v, "SPARSITY_", &names)
    }),
    (
        "VARIANTS",
        "ADAMWPRUNE_VARIANT_* (comma list of bitter0 ... bitter9, bitter10, bitter10z/s/c)",
        |kc, v| {
            let names: Vec<(String, String)> = crate::prune::state_variants()
                .into_iter()
                .map(|v| (v.to_ascii_uppercase(), v.to_string()))
                .collect();
            let refs: Vec<(&str, &str)> = names.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            set_list(kc, "VARIANTS", v, "ADAMWPRUNE_VARIANT_", &refs)
        },
    ),
];

fn set(kc: &mut Kconfig, sym: &str, v: &str) -> Result<()> {
    if v.contains(['\n', '\r']) {
        bail!("{sym}: a value cannot hold a line break");
    }
    let Err(e) = kc.set_value(sym, v) else { return Ok(()) };
    // Say which values are allowed rather than kconfiglib's "was assigned
    // ... but got ...".
    let ranges: Vec<String> = kc
        .symbol(sym)
        .map(|s| s.ranges().into_iter().map(|r| r.value.replace(' ', " to ")).collect())
        .unwrap_or_default();
    match ranges.first() {
        Some(r) if ranges.len() == 1 => bail!("{sym}={v}: outside the allowed range {r}"),
        _ => Err(anyhow!("{e}")),
    }
}

/// Enable exactly the listed members of a multi-select menu.
fn set_list(kc: &mut Kconfig, var: &str, v: &str, prefix: &str, table: &[(&str, &str)]) -> Result<()> {
    let wanted: Vec<&str> = v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if wanted.is_empty() {
        let valid: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
        bail!("{var}= is empty: give one or more of {} (comma separated)", valid.join(", "));
    }
    for w in &wanted {
        if !table.iter().any(|(_, n)| n == w) {
            let valid: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
            bail!("{var}={v}: unknown value '{w}' (valid: {})", valid.join(", "));
        }
    }
    // Enable first (dependencies of later entries may need them), then disable.
    for (suffix, name) in table {
        if wanted.contains(name) {
            set(kc, &format!("{prefix}{suffix}"), "y").with_context(|| format!("{var}={v}"))?;
        }
    }
    for (suffix, name) in table {
        if !wanted.contains(name) {
            set(kc, &format!("{prefix}{suffix}"), "n").with_context(|| format!("{var}={v}"))?;
        }
    }
    Ok(())
}

/// Parse `VAR=value` override arguments, checking the variable names.
pub fn parse_overrides(args: &[String]) -> Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| {
            let (k, v) = a.split_once('=').ok_or_else(|| anyhow!("override '{a}' is not VAR=value"))?;
            if !OVERRIDES.iter().any(|(n, _, _)| *n == k) {
                let valid: Vec<&str> = OVERRIDES.iter().map(|(n, _, _)| *n).collect();
                bail!("unknown override {k} (valid: {})", valid.join(", "));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The project's Kconfig tree with a `.config` and overrides applied.
/// Precedence: Kconfig defaults < `.config` < overrides.
pub fn load(
    kconfig: &Path,
    dot_config: &Path,
    overrides: &[(String, String)],
) -> Result<(Kconfig, Vec<String>)> {
    let mut kc = Kconfig::load(kconfig, None).map_err(|e| anyhow!("{e}"))?;
    if !dot_config.exists() {
        bail!(
            "{}: no configuration yet; run `make defconfig-<name>` (see `make list-defconfigs`) or `make menuconfig`",
            dot_config.display()
        );
    }
    let loaded = kc.load_config(dot_config).map_err(|e| anyhow!("{e}"))?;
    let mut warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    for (k, v) in overrides {
        let (_, _, apply) =
            OVERRIDES.iter().find(|(n, _, _)| n == k).ok_or_else(|| anyhow!("unknown override {k}"))?;
        apply(&mut kc, v).with_context(|| format!("override {k}={v}"))?;
    }
    warnings.extend(kc.take_warnings().iter().map(|w| w.to_string()));
    Ok((kc, warnings))
}

/// A short stable checksum (FNV-1a, 64 bits) as hex.
pub fn checksum(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A project name names one folder under the runs folder, never a path:
/// 1 to 100 letters, digits, `-`, `_` or `.`, not starting with `.`
/// (`PROJECT=../../x` would write outside it).
pub fn check_project_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        let shown: String = name.chars().take(60).collect();
        let more = if name.chars().count() > 60 { "..." } else { "" };
        bail!(
            "project name '{shown}{more}' must be 1-100 letters, digits, '-', '_' or '.', not starting with '.' (it names one folder under the runs folder)"
        );
    }
    Ok(())
}

/// The project name: configured, else `<first model>-<5 hex digits>` of the
/// `.config` file (before overrides, so `make TIME=...` and `make continue`
/// name the same project) and the working directory.
pub fn project_name(exp: &Experiment, dot_config_text: &str) -> String {
    if !exp.project.trim().is_empty() {
        return exp.project.trim().to_string();
    }
    let model = match exp.models.as_slice() {
        [one] => one.clone(),
        [] => "empty".to_string(),
        _ => "matrix".to_string(),
    };
    let cwd = std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default();
    let values: Vec<&str> = dot_config_text.lines().filter(|l| l.starts_with("CONFIG_")).collect();
    format!("{model}-{}", &checksum(&[&values.join("\n"), &cwd])[..5])
}

/// Check one configuration file: every line must assign a known symbol a
/// value it keeps (no unknown symbols, unmet dependencies or out-of-range
/// values). Returns the experiment it describes (`matrix::check_file` also
/// requires cells).
pub fn check_file(kconfig: &Path, file: &Path) -> Result<Experiment> {
    let mut kc = Kconfig::load(kconfig, None).map_err(|e| anyhow!("{e}"))?;
    let loaded = kc.load_config(file).map_err(|e| anyhow!("{e}"))?;
    let mut problems: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("CONFIG_") else { continue };
        let Some((name, raw)) = rest.split_once('=') else { continue };
        let Some(sym) = kc.symbol(name) else { continue };
        let want = raw.trim_matches('"');
        let got = sym.str_value();
        if got != want {
            problems.push(format!(
                "{}:{}: CONFIG_{name}={raw} does not hold (value is '{got}'; unmet dependencies: {})",
                file.display(),
                i + 1,
                sym.direct_deps()
            ));
        }
    }
    problems.extend(kc.take_warnings().iter().map(|w| w.to_string()));
    if !problems.is_empty() {
        bail!("{}", problems.join("\n        "));
    }
    Experiment::read(&Reader::new(&kc))
}
