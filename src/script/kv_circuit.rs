//! KV circuit discovery in scripts (docs/kv-circuits.md): learned K/V
//! channel masks on a GPT-2, and the V0/V1 comparison of two results.
use std::path::{Path, PathBuf};

use rhai::{Array, Dynamic, Engine, Map};

use super::api::{Api, DocEntry};
use super::data::RTokens;
use super::models::RModel;
use super::value::*;
use crate::mechint::kv_circuit::{self, Circuit, KvCircuitConfig};

/// Options that are not part of [`KvCircuitConfig`].
const OUTPUT_KEYS: &[&str] = &["out", "save_masks", "progress"];

fn to_dyn(v: &serde_json::Value) -> RResult<Dynamic> {
    rhai::serde::to_dynamic(v).map_err(|e| rerr(e.to_string()))
}

/// The options map as a config (unknown keys are errors listing the valid
/// ones) plus the output options.
fn parse_options(o: &Map) -> RResult<(KvCircuitConfig, Option<PathBuf>, bool, bool)> {
    let mut rest = o.clone();
    let out = rest.remove("out").map(|v| expect_str(&v, "kv_circuit: out")).transpose()?.map(PathBuf::from);
    let flag = |v: Option<Dynamic>, k: &str, d: bool| -> RResult<bool> {
        v.map(|v| v.as_bool().map_err(|t| rerr(format!("kv_circuit: {k} must be a bool, got {t}"))))
            .unwrap_or(Ok(d))
    };
    let save = flag(rest.remove("save_masks"), "save_masks", true)?;
    let progress = flag(rest.remove("progress"), "progress", false)?;
    // Scripts write 0.9 or 1 alike; serde wants the field's own type.
    let mut json = serde_json::Map::new();
    let defaults = serde_json::to_value(KvCircuitConfig::default()).map_err(|e| rerr(e.to_string()))?;
    for (k, v) in &rest {
        let want = defaults.get(k.as_str()).ok_or_else(|| {
            let valid: Vec<String> = defaults
                .as_object()
                .map(|m| m.keys().cloned().chain(OUTPUT_KEYS.iter().map(|s| s.to_string())).collect())
                .unwrap_or_default();
            rerr(format!("kv_circuit: unknown option '{k}' (valid: {})", valid.join(", ")))
        })?;
        let val = match want {
            serde_json::Value::String(_) => serde_json::json!(expect_str(v, &format!("kv_circuit: {k}"))?),
            serde_json::Value::Number(n) if n.is_i64() => serde_json::json!(v
                .as_int()
                .map_err(|t| rerr(format!("kv_circuit: {k} must be an int, got {t}")))?),
            _ => serde_json::json!(as_number(v, &format!("kv_circuit: {k}"))?),
        };
        json.insert(k.to_string(), val);
    }
    let cfg: KvCircuitConfig = serde_json::from_value(serde_json::Value::Object(json))
        .map_err(|e| rerr(format!("kv_circuit: {e}")))?;
    cfg.validate().rt()?;
    Ok((cfg, out, save, progress))
}

/// The result map a script gets.
fn result_map(c: &Circuit, files: Vec<PathBuf>) -> RResult<Map> {
    let masks: Array =
        c.masks().iter().map(|m| serde_json::json!(m)).map(|v| to_dyn(&v)).collect::<RResult<_>>()?;
    let importance: Array =
        c.layers.iter().map(|l| to_dyn(&serde_json::json!(l.importance))).collect::<RResult<_>>()?;
    let history: Array = c
        .history
        .iter()
        .map(|r| serde_json::to_value(r).map_err(|e| rerr(e.to_string())).and_then(|v| to_dyn(&v)))
        .collect::<RResult<_>>()?;
    let summary = to_dyn(&c.summary())?;
    let files: Array = files.iter().map(|p| Dynamic::from(p.display().to_string())).collect();
    let layer_sparsity: Array = c.layers.iter().map(|l| Dynamic::from_float(l.sparsity)).collect();
    Ok(map_of(vec![
        ("sparsity", Dynamic::from_float(c.achieved_sparsity)),
        ("target_sparsity", Dynamic::from_float(c.config.target_sparsity)),
        ("kept", Dynamic::from_int(c.kept)),
        ("channels", Dynamic::from_int(c.channels)),
        ("layer_sparsity", Dynamic::from_array(layer_sparsity)),
        ("loss_full", Dynamic::from_float(c.full.loss)),
        ("loss_initial", Dynamic::from_float(c.initial.loss)),
        ("loss_final", Dynamic::from_float(c.final_.loss)),
        ("loss_empty", Dynamic::from_float(c.empty.loss)),
        ("ppl_final", Dynamic::from_float(c.final_.ppl)),
        ("bpb_final", Dynamic::from_float(c.final_.bpb)),
        ("loss_degradation", Dynamic::from_float(c.loss_degradation)),
        ("faithfulness", Dynamic::from_float(c.faithfulness)),
        ("masks", Dynamic::from_array(masks)),
        ("importance", Dynamic::from_array(importance)),
        ("history", Dynamic::from_array(history)),
        ("summary", summary),
        ("files", Dynamic::from_array(files)),
    ]))
}

fn run(m: &RModel, data: &RTokens, o: &Map) -> RResult<Map> {
    let (cfg, out, save, progress) = parse_options(o)?;
    let model = m.borrow()?;
    let ds = data.0.try_borrow().map_err(|_| rerr("the data set is busy"))?;
    let device = model.store().device();
    let mut say = |s: &str| {
        if progress {
            println!("{s}");
        }
    };
    let c = kv_circuit::discover(model.as_ref(), &ds.val, &cfg, device, &mut say).rt()?;
    let files = match out {
        Some(dir) => c.write_outputs(&dir, &format!("script model ({})", model.arch()), save).rt()?,
        None => Vec::new(),
    };
    result_map(&c, files)
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Interpretability");
    api.f(
        "kv_circuit",
        "model, data: TokenDataset",
        "KV circuit discovery with the default options (see the three-argument form).",
        |m: RModel, d: RTokens| -> RResult<Map> { run(&m, &d, &Map::new()) },
    );
    api.f(
        "kv_circuit",
        "model, data: TokenDataset, options: map",
        "Learn binary K/V channel masks per head of a GPT-2 (frozen, eval mode) on the validation split of `data` (first 80 % to fit, last 20 % to evaluate), at exactly `target_sparsity` (docs/kv-circuits.md). Options: `target_sparsity`, `steps`, `lr`, `temperature` (\"linear:1.0:0.1\"), `sparsity_schedule` (linear, exponential, cosine), `ramp_fraction`, `init_keep_prob`, `batch_size`, `block_size`, `eval_every`, `eval_batches`, `seed`, `bytes_per_token`; `out` (a folder for masks, heatmaps and the report), `save_masks`, `progress`. Returns `#{ sparsity, kept, channels, layer_sparsity, loss_full, loss_initial, loss_final, loss_empty, faithfulness, loss_degradation, ppl_final, bpb_final, masks, importance, history, summary, files }`.",
        |m: RModel, d: RTokens, o: Map| -> RResult<Map> { run(&m, &d, &o) },
    );
    api.f(
        "kv_circuit_compare",
        "v0_dir: string, v1_dir: string, out_dir: string",
        "Compare two `kv_circuit` result folders (V0 standard, V1 KV tying): delta heatmap, bar charts and variant_comparison.md in `out_dir`; returns the files written.",
        |a: &str, b: &str, out: &str| -> RResult<Array> {
            let files = kv_circuit::compare_variants(Path::new(a), Path::new(b), Path::new(out)).rt()?;
            Ok(files.iter().map(|p| Dynamic::from(p.display().to_string())).collect())
        },
    );
}
