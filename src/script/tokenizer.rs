//! Image tokenizers in scripts: PCA and spline-PCA tokenizers over
//! `crate::tokenizer` (docs/tokenizers.md).
use std::cell::{Ref, RefCell, RefMut};
use std::path::Path;
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};
use tch::Tensor;

use super::api::{Api, DocEntry};
use super::value::*;
use crate::tokenizer::spline::DEFAULT_SMOOTHING;
use crate::tokenizer::{PcaTokenizer, Quality, SplinePcaTokenizer, DEFAULT_CPU, DEFAULT_HBM};

/// A PCA tokenizer held by a script; copies alias it.
#[derive(Clone)]
pub struct RPca(pub Rc<RefCell<PcaTokenizer>>);

/// A spline-PCA tokenizer held by a script; copies alias it.
#[derive(Clone)]
pub struct RSplinePca(pub Rc<RefCell<SplinePcaTokenizer>>);

fn busy() -> Box<rhai::EvalAltResult> {
    rerr("the tokenizer is busy")
}

/// What the two tokenizer types share: a PCA inside.
trait Holder: Clone + 'static {
    fn pca(&self) -> RResult<Ref<'_, PcaTokenizer>>;
    fn fit(&self, x: &Tensor) -> Result<(), String>;
    fn partial_fit(&self, x: &Tensor) -> Result<(), String>;
    fn save(&self, path: &Path, target: crate::safetensors::Target) -> Result<(), String>;
}

impl Holder for RPca {
    fn pca(&self) -> RResult<Ref<'_, PcaTokenizer>> {
        self.0.try_borrow().map_err(|_| busy())
    }
    fn fit(&self, x: &Tensor) -> Result<(), String> {
        self.0.try_borrow_mut().map_err(|_| "the tokenizer is busy".to_string())?.fit(x)
    }
    fn partial_fit(&self, x: &Tensor) -> Result<(), String> {
        self.0.try_borrow_mut().map_err(|_| "the tokenizer is busy".to_string())?.partial_fit(x)
    }
    fn save(&self, path: &Path, target: crate::safetensors::Target) -> Result<(), String> {
        self.0.try_borrow().map_err(|_| "the tokenizer is busy".to_string())?.save(path, target)
    }
}

impl RSplinePca {
    fn get(&self) -> RResult<Ref<'_, SplinePcaTokenizer>> {
        self.0.try_borrow().map_err(|_| busy())
    }
    fn get_mut(&self) -> RResult<RefMut<'_, SplinePcaTokenizer>> {
        self.0.try_borrow_mut().map_err(|_| busy())
    }
}

impl Holder for RSplinePca {
    fn pca(&self) -> RResult<Ref<'_, PcaTokenizer>> {
        Ok(Ref::map(self.get()?, |s| &s.pca))
    }
    fn fit(&self, x: &Tensor) -> Result<(), String> {
        self.0.try_borrow_mut().map_err(|_| "the tokenizer is busy".to_string())?.fit(x)
    }
    fn partial_fit(&self, x: &Tensor) -> Result<(), String> {
        self.0.try_borrow_mut().map_err(|_| "the tokenizer is busy".to_string())?.partial_fit(x)
    }
    fn save(&self, path: &Path, target: crate::safetensors::Target) -> Result<(), String> {
        self.0.try_borrow().map_err(|_| "the tokenizer is busy".to_string())?.save(path, target)
    }
}

fn f64_tensor(v: &[f64]) -> RResult<RTensor> {
    tensor_result(Tensor::f_from_slice(v))
}

fn tier_array(t: Vec<&'static str>) -> Array {
    t.into_iter().map(|s| Dynamic::from(s.to_string())).collect()
}

fn quality_map(q: Quality) -> Map {
    map_of(vec![
        ("components", Dynamic::from_int(q.components)),
        ("mse", Dynamic::from_float(q.mse)),
        ("rel_mse", Dynamic::from_float(q.rel_mse)),
        ("psnr", Dynamic::from_float(q.psnr)),
        ("peak", Dynamic::from_float(q.peak)),
        ("explained", Dynamic::from_float(q.explained)),
    ])
}

fn int_option(o: &Map, key: &str) -> RResult<Option<INT>> {
    o.get(key).map(|v| v.as_int().map_err(|t| rerr(format!("{key} must be an int, got {t}")))).transpose()
}

fn components_of(o: &Map, what: &str) -> RResult<INT> {
    int_option(o, "components")?.ok_or_else(|| rerr(format!("{what}: the options need `components`")))
}

fn smoothing_of(o: &Map) -> RResult<FLOAT> {
    o.get("smoothing").map(|v| as_number(v, "smoothing")).unwrap_or(Ok(DEFAULT_SMOOTHING))
}

/// Steps from a tensor or an array of numbers.
fn steps_arg(d: &Dynamic) -> RResult<Vec<f64>> {
    if let Some(t) = d.read_lock::<RTensor>() {
        return crate::tensor::to_vec_f64(&t.0).rt();
    }
    if let Some(a) = d.read_lock::<Array>() {
        return a.iter().map(|v| as_number(v, "steps")).collect();
    }
    Err(rerr(format!("steps must be a Tensor or an array of numbers, got {}", d.type_name())))
}

fn new_pca(k: INT) -> RResult<RPca> {
    Ok(RPca(Rc::new(RefCell::new(PcaTokenizer::new(k).rt()?))))
}

fn new_spline(s: SplinePcaTokenizer) -> RSplinePca {
    RSplinePca(Rc::new(RefCell::new(s)))
}

/// The methods both tokenizer types have, documented once.
fn common<T: Holder>(api: &mut Api) {
    api.f(
        "fit",
        "self, x: Tensor",
        "Exact PCA of images `x` [N, ...] (any real dtype; flattened to [N, D]): the SVD of the centred data in float64, replacing any earlier fit. Returns the tokenizer.",
        |t: &mut T, x: RTensor| -> RResult<T> {
            t.fit(&x.0).rt()?;
            Ok(t.clone())
        },
    );
    api.f(
        "partial_fit",
        "self, x: Tensor",
        "Merge a batch into the basis by incremental PCA (scikit-learn's IncrementalPCA; the first batch needs at least max(k, 2) images); with k = D it ends at the exact PCA of all batches. Returns the tokenizer.",
        |t: &mut T, x: RTensor| -> RResult<T> {
            t.partial_fit(&x.0).rt()?;
            Ok(t.clone())
        },
    );
    api.f(
        "transform",
        "self, x: Tensor",
        "Codes [N, k] of images [N, ...]: (x - mean) components^T; float64 for float64 input, else float32 (or the input's float dtype).",
        |t: &mut T, x: RTensor| -> RResult<RTensor> { t.pca()?.transform(&x.0).map(RTensor).rt() },
    );
    api.f(
        "inverse",
        "self, codes: Tensor",
        "Images [N, ...image_shape] from codes [N, j], j <= k, using the first j components: codes components[:j] + mean.",
        |t: &mut T, c: RTensor| -> RResult<RTensor> { t.pca()?.inverse(&c.0).map(RTensor).rt() },
    );
    api.f(
        "importance",
        "self",
        "Component importance: the explained-variance ratio of each component, float64 [k], largest first.",
        |t: &mut T| -> RResult<RTensor> { f64_tensor(&t.pca()?.component_importance().rt()?) },
    );
    api.f(
        "quality",
        "self, x: Tensor, j: int",
        "Quality of inverse(transform(x)) with the first j components: `#{ components, mse, rel_mse, psnr, peak, explained }`; rel_mse is the squared error over x's squared deviation from the fitted mean, psnr = 10 log10(peak^2 / mse) with peak = max(x) - min(x), explained the cumulative explained-variance ratio.",
        |t: &mut T, x: RTensor, j: INT| -> RResult<Map> {
            Ok(quality_map(t.pca()?.quality(&x.0, j, None).rt()?))
        },
    );
    api.f(
        "quality",
        "self, x: Tensor, j: int, peak: float",
        "Quality with the first j components and a given PSNR peak (1.0 for images in [0, 1], 255.0 for bytes).",
        |t: &mut T, x: RTensor, j: INT, peak: FLOAT| -> RResult<Map> {
            Ok(quality_map(t.pca()?.quality(&x.0, j, Some(peak)).rt()?))
        },
    );
    api.f(
        "save",
        "self, path: string",
        "Write the fitted tokenizer to a safetensors file, atomically, hyper-parameters in the metadata (an existing path must be a regular file).",
        |t: &mut T, path: &str| -> RResult<()> { t.save(Path::new(path), crate::safetensors::Target::STRICT).rt() },
    );
    api.f(
        "save",
        "self, path: string, options: map",
        "Write the tokenizer with `#{ mkdir, follow_symlinks }` as save() for tensors.",
        |t: &mut T, path: &str, o: Map| -> RResult<()> {
            let target = super::tensor::save_target(&o)?;
            t.save(Path::new(path), target).rt()
        },
    );
    api.get("n_components", "Components kept (k).", |t: &mut T| -> RResult<INT> {
        Ok(t.pca()?.n_components())
    });
    api.get("fitted", "Whether the tokenizer has a basis.", |t: &mut T| -> RResult<bool> {
        Ok(t.pca()?.is_fitted())
    });
    api.get("samples_seen", "Images the basis was fitted on.", |t: &mut T| -> RResult<INT> {
        Ok(t.pca()?.fitted().rt()?.n_seen)
    });
    api.get("image_shape", "Shape of one image, as fitted.", |t: &mut T| -> RResult<Array> {
        Ok(shape_to_array(&t.pca()?.fitted().rt()?.image_shape))
    });
    api.get("mean", "Mean of the images seen, float64 [D].", |t: &mut T| -> RResult<RTensor> {
        Ok(RTensor(t.pca()?.fitted().rt()?.mean.shallow_clone()))
    });
    api.get(
        "components",
        "Principal axes, float64 [k, D], orthonormal rows by decreasing variance.",
        |t: &mut T| -> RResult<RTensor> { Ok(RTensor(t.pca()?.fitted().rt()?.components.shallow_clone())) },
    );
    api.get(
        "explained_variance",
        "Variance along each component, S^2 / (N - 1), float64 [k].",
        |t: &mut T| -> RResult<RTensor> {
            Ok(RTensor(t.pca()?.fitted().rt()?.explained_variance.shallow_clone()))
        },
    );
}

fn thresholds(api: &mut Api) {
    api.f(
        "tier_counts",
        "n: int, hbm: float, cpu: float",
        "How many of n ranked items go to `#{ hbm, cpu, ssd }` by the cumulative rule: rank < floor(n hbm) is HBM, rank < floor(n cpu) is CPU, the rest SSD (0.3/0.5: 30 % HBM, 20 % CPU, 50 % SSD).",
        |n: INT, hbm: FLOAT, cpu: FLOAT| -> RResult<Map> {
            if n < 0 {
                return Err(rerr(format!("tier_counts: n must be >= 0, got {n}")));
            }
            let [h, c, s] = crate::tokenizer::tier_counts(n as usize, hbm, cpu).rt()?;
            Ok(map_of(vec![
                ("hbm", Dynamic::from_int(h as INT)),
                ("cpu", Dynamic::from_int(c as INT)),
                ("ssd", Dynamic::from_int(s as INT)),
            ]))
        },
    );
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RPca>("PcaTokenizer");
    engine.register_type_with_name::<RSplinePca>("SplinePcaTokenizer");
    engine.register_fn("to_string", |t: &mut RPca| describe_pca(&t.0.try_borrow().ok().as_deref().cloned()));
    engine.register_fn("to_debug", |t: &mut RPca| describe_pca(&t.0.try_borrow().ok().as_deref().cloned()));
    engine.register_fn("to_string", |t: &mut RSplinePca| describe_spline(t));
    engine.register_fn("to_debug", |t: &mut RSplinePca| describe_spline(t));
    let mut api = Api::new(engine, docs);
    api.group("Data");
    api.f(
        "pca_tokenizer",
        "components: int",
        "An unfitted PCA image tokenizer keeping `components` principal components (docs/tokenizers.md).",
        new_pca,
    );
    api.f(
        "pca_tokenizer",
        "options: map",
        "A PCA image tokenizer from `#{ components }`.",
        |o: Map| -> RResult<RPca> {
            check_keys(&o, &["components"], "pca_tokenizer option")?;
            new_pca(components_of(&o, "pca_tokenizer")?)
        },
    );
    api.f(
        "pca_tokenizer_load",
        "path: string",
        "Read a PCA tokenizer that save() wrote; a corrupt or foreign file is an error naming it.",
        |path: &str| -> RResult<RPca> {
            Ok(RPca(Rc::new(RefCell::new(PcaTokenizer::load(Path::new(path)).rt()?))))
        },
    );
    api.f(
        "tiers",
        "self",
        "Memory tier (\"hbm\", \"cpu\", \"ssd\") of each component by importance rank at the default thresholds hbm 0.3, cpu 0.5 (cumulative: 30 % HBM, 20 % CPU, 50 % SSD).",
        |t: &mut RPca| -> RResult<Array> { Ok(tier_array(t.pca()?.tiers(DEFAULT_HBM, DEFAULT_CPU).rt()?)) },
    );
    api.f(
        "tiers",
        "self, hbm: float, cpu: float",
        "Memory tier of each component by importance rank: rank < floor(k hbm) is \"hbm\", rank < floor(k cpu) is \"cpu\" (cpu is cumulative, >= hbm), the rest \"ssd\".",
        |t: &mut RPca, hbm: FLOAT, cpu: FLOAT| -> RResult<Array> {
            Ok(tier_array(t.pca()?.tiers(hbm, cpu).rt()?))
        },
    );
    common::<RPca>(&mut api);
    thresholds(&mut api);

    api.f(
        "spline_pca_tokenizer",
        "components: int",
        "An unfitted spline-PCA tokenizer: a PCA tokenizer that records per-step code trajectories and smooths them with a cubic smoothing spline (smoothing 1.0).",
        |k: INT| -> RResult<RSplinePca> {
            Ok(new_spline(SplinePcaTokenizer::new(k, DEFAULT_SMOOTHING).rt()?))
        },
    );
    api.f(
        "spline_pca_tokenizer",
        "options: map",
        "A spline-PCA tokenizer from `#{ components, smoothing }`; smoothing >= 0 is the spline's penalty with steps in units of their mean spacing (0 interpolates; at even steps it averages about 3.8 smoothing^(1/4) recorded steps, 4 at the default 1).",
        |o: Map| -> RResult<RSplinePca> {
            check_keys(&o, &["components", "smoothing"], "spline_pca_tokenizer option")?;
            let k = components_of(&o, "spline_pca_tokenizer")?;
            Ok(new_spline(SplinePcaTokenizer::new(k, smoothing_of(&o)?).rt()?))
        },
    );
    api.f(
        "spline_pca_tokenizer",
        "pca: PcaTokenizer",
        "A spline-PCA tokenizer over a copy of a (fitted) PCA tokenizer, smoothing 1.0.",
        |p: RPca| -> RResult<RSplinePca> {
            let pca = p.pca()?.clone();
            Ok(new_spline(SplinePcaTokenizer::from_pca(pca, DEFAULT_SMOOTHING).rt()?))
        },
    );
    api.f(
        "spline_pca_tokenizer",
        "pca: PcaTokenizer, options: map",
        "A spline-PCA tokenizer over a copy of a PCA tokenizer with `#{ smoothing }`.",
        |p: RPca, o: Map| -> RResult<RSplinePca> {
            check_keys(&o, &["smoothing"], "spline_pca_tokenizer option")?;
            let pca = p.pca()?.clone();
            Ok(new_spline(SplinePcaTokenizer::from_pca(pca, smoothing_of(&o)?).rt()?))
        },
    );
    api.f(
        "spline_pca_tokenizer_load",
        "path: string",
        "Read a spline-PCA tokenizer (basis, smoothing and recorded trajectories) that save() wrote.",
        |path: &str| -> RResult<RSplinePca> {
            Ok(new_spline(SplinePcaTokenizer::load(Path::new(path)).rt()?))
        },
    );
    common::<RSplinePca>(&mut api);
    api.f(
        "record",
        "self, step: number, codes: Tensor",
        "Record the codes of a training step, [k] or [B, k] (the batch mean is kept); steps must increase strictly. fit() and partial_fit() clear the records (they change the basis).",
        |t: &mut RSplinePca, step: Dynamic, codes: RTensor| -> RResult<()> {
            let s = as_number(&step, "step")?;
            t.get_mut()?.record(s, &codes.0).rt()
        },
    );
    api.f(
        "record_images",
        "self, step: number, x: Tensor",
        "Record the codes of images x at a step: record(step, transform(x)).",
        |t: &mut RSplinePca, step: Dynamic, x: RTensor| -> RResult<()> {
            let s = as_number(&step, "step")?;
            t.get_mut()?.record_images(s, &x.0).rt()
        },
    );
    api.get("steps", "The recorded steps, float64 [S].", |t: &mut RSplinePca| -> RResult<RTensor> {
        f64_tensor(t.get()?.steps())
    });
    api.get(
        "trajectory",
        "The recorded mean codes, float64 [S, k] (row i at steps[i]).",
        |t: &mut RSplinePca| -> RResult<RTensor> { t.get()?.trajectory().map(RTensor).rt() },
    );
    api.f(
        "smoothed",
        "self",
        "The smoothing splines at the recorded steps, float64 [S, k].",
        |t: &mut RSplinePca| -> RResult<RTensor> {
            let s = t.get()?;
            let at = s.steps().to_vec();
            s.smoothed_at(&at).map(RTensor).rt()
        },
    );
    api.f(
        "smoothed",
        "self, steps: Tensor|array",
        "The smoothing splines at any steps, float64 [len, k] (straight lines beyond the recorded range).",
        |t: &mut RSplinePca, at: Dynamic| -> RResult<RTensor> {
            let at = steps_arg(&at)?;
            t.get()?.smoothed_at(&at).map(RTensor).rt()
        },
    );
    api.f(
        "trajectory_variance",
        "self",
        "Variance over the recorded steps of each component's smoothed trajectory, float64 [k].",
        |t: &mut RSplinePca| -> RResult<RTensor> { f64_tensor(&t.get()?.trajectory_variance().rt()?) },
    );
    api.f(
        "tiers",
        "self",
        "Memory tier of each component by trajectory-variance rank at the default thresholds hbm 0.3, cpu 0.5 (cumulative).",
        |t: &mut RSplinePca| -> RResult<Array> {
            Ok(tier_array(t.get()?.tiers(DEFAULT_HBM, DEFAULT_CPU).rt()?))
        },
    );
    api.f(
        "tiers",
        "self, hbm: float, cpu: float",
        "Memory tier of each component by trajectory-variance rank with the cumulative rule (cpu >= hbm).",
        |t: &mut RSplinePca, hbm: FLOAT, cpu: FLOAT| -> RResult<Array> {
            Ok(tier_array(t.get()?.tiers(hbm, cpu).rt()?))
        },
    );
    api.get("smoothing", "The spline smoothing.", |t: &mut RSplinePca| -> RResult<FLOAT> {
        Ok(t.get()?.smoothing())
    });
    api.f(
        "set_smoothing",
        "self, smoothing: float",
        "Change the spline smoothing (>= 0); the records stay.",
        |t: &mut RSplinePca, s: FLOAT| -> RResult<()> { t.get_mut()?.set_smoothing(s).rt() },
    );
    api.get("pca", "A copy of the PCA tokenizer inside.", |t: &mut RSplinePca| -> RResult<RPca> {
        Ok(RPca(Rc::new(RefCell::new(t.get()?.pca.clone()))))
    });
}

fn describe_pca(p: &Option<PcaTokenizer>) -> String {
    match p {
        None => "PcaTokenizer(<busy>)".into(),
        Some(p) => match p.fitted() {
            Ok(f) => format!(
                "PcaTokenizer({} components, fitted on {} images of {:?})",
                p.n_components(),
                f.n_seen,
                f.image_shape
            ),
            Err(_) => format!("PcaTokenizer({} components, not fitted)", p.n_components()),
        },
    }
}

fn describe_spline(t: &RSplinePca) -> String {
    match t.0.try_borrow() {
        Ok(s) => {
            let inner = describe_pca(&Some(s.pca.clone()));
            let inner = inner.trim_start_matches("PcaTokenizer(").trim_end_matches(')');
            format!(
                "SplinePcaTokenizer({inner}, {} steps recorded, smoothing {})",
                s.steps().len(),
                s.smoothing()
            )
        }
        Err(_) => "SplinePcaTokenizer(<busy>)".into(),
    }
}
