//! The project's Kconfig tree: every symbol is read by the code, every
//! preset loads cleanly, overrides apply with Kconfig's rules.
use std::path::PathBuf;
use std::process::Command;

use knlp::config::{self, Experiment, Reader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tree() -> kconfig::Kconfig {
    kconfig::Kconfig::load(&root().join("Kconfig"), Some(&root())).unwrap()
}

#[test]
fn every_symbol_is_consumed_and_every_read_is_defined() {
    let kc = tree();
    let r = Reader::new(&kc);
    // Reading a symbol Kconfig does not define is an error, so this also
    // proves every key the code reads exists.
    Experiment::read(&r).unwrap();
    // `knlp mechint` reads the interpretability menu.
    knlp::mechint::kv_circuit::Settings::read(&r).unwrap();
    let read = r.read();
    let defined: Vec<String> = kc.symbols().map(|s| s.name().to_string()).collect();
    let unread: Vec<&String> = defined.iter().filter(|s| !read.contains(*s)).collect();
    assert!(unread.is_empty(), "Kconfig symbols no code reads: {unread:?}");
    for name in &read {
        assert!(defined.contains(name), "the code reads {name}, which Kconfig does not define");
    }
}

#[test]
fn every_preset_checks_out() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("defconfigs")).unwrap() {
        let p = e.unwrap().path();
        let first = std::fs::read_to_string(&p).unwrap();
        assert!(first.starts_with("# "), "{}: the first line describes the preset", p.display());
        let cells = knlp::matrix::check_file(&root().join("Kconfig"), &p)
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        assert!(cells > 0);
        n += 1;
    }
    assert!(n >= 20, "{n} presets");
}

#[test]
fn defconfig_targets_write_the_preset() {
    let d = std::env::temp_dir().join(format!("knlp-defconfig-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for name in ["lenet5-compare", "gpt2-bitter7-baseline"] {
        let cfg = d.join(format!("{name}.config"));
        let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
            .args(["defconfig", "--kconfig", "Kconfig", &format!("defconfigs/{name}")])
            .env("KCONFIG_CONFIG", &cfg)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (kc, _) = config::load(&root().join("Kconfig"), &cfg, &[]).unwrap();
        let exp = Experiment::read(&Reader::new(&kc)).unwrap();
        let cells = knlp::matrix::cells(&exp).unwrap();
        match name {
            "lenet5-compare" => assert_eq!(cells.len(), 9),
            _ => {
                assert_eq!(cells.len(), 1);
                assert_eq!(cells[0].id, "gpt2_adamwprune_state-bitter7_50");
                assert_eq!(exp.gpt2["preset"], "124M");
            }
        }
    }
}

#[test]
fn overrides_apply_with_kconfig_rules_and_name_the_variable() {
    let d = std::env::temp_dir().join(format!("knlp-override-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join(".config");
    std::fs::copy(root().join("defconfigs/lenet5-compare"), &cfg).unwrap();
    let k = root().join("Kconfig");
    let ov = config::parse_overrides(&[
        "TIME=120".into(),
        "MODELS=lenet5,gpt2".into(),
        "SPARSITY=90".into(),
        "VARIANTS=bitter7".into(),
    ])
    .unwrap();
    let (kc, _) = config::load(&k, &cfg, &ov).unwrap();
    let exp = Experiment::read(&Reader::new(&kc)).unwrap();
    assert_eq!(exp.train.time_limit, 120.0);
    assert_eq!(exp.models, vec!["lenet5", "gpt2"]);
    assert_eq!(exp.sparsities, vec![0.9]);
    assert_eq!(exp.variants, vec!["bitter7"]);
    // The .config file itself is untouched.
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        std::fs::read_to_string(root().join("defconfigs/lenet5-compare")).unwrap()
    );
    let e = config::parse_overrides(&["TIMEOUT=1".into()]).unwrap_err().to_string();
    assert!(e.contains("unknown override TIMEOUT") && e.contains("TIME"), "{e}");
    let bad = config::parse_overrides(&["MODELS=lenet6".into()]).unwrap();
    let e = format!("{:#}", config::load(&k, &cfg, &bad).unwrap_err());
    assert!(e.contains("MODELS=lenet6") && e.contains("lenet5"), "{e}");
    let bad = config::parse_overrides(&["EPOCHS=-3".into()]).unwrap();
    assert!(format!("{:#}", config::load(&k, &cfg, &bad).unwrap_err()).contains("EPOCHS=-3"));
}

#[test]
fn project_names_follow_the_config_and_folder() {
    let kc = tree();
    let exp = Experiment::read(&Reader::new(&kc)).unwrap();
    let a = config::project_name(&exp, "CONFIG_A=y\n");
    let b = config::project_name(&exp, "CONFIG_A=n\n");
    assert!(a.starts_with("lenet5-") && a.len() == "lenet5-".len() + 5, "{a}");
    assert_ne!(a, b);
    assert_eq!(a, config::project_name(&exp, "# comment\nCONFIG_A=y\n"), "comments do not matter");
}

/// PROJECT names one folder under the runs folder, never a path (issue 20).
#[test]
fn project_names_that_are_paths_are_refused() {
    let d = std::env::temp_dir().join(format!("knlp-project-name-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join(".config");
    std::fs::copy(root().join("defconfigs/lenet5-compare"), &cfg).unwrap();
    let k = root().join("Kconfig");
    for bad in ["../../x", "a/b", ".hidden", "..", "x y", "a\\b"] {
        let ov = config::parse_overrides(&[format!("PROJECT={bad}")]).unwrap();
        let (kc, _) = config::load(&k, &cfg, &ov).unwrap();
        let e = format!("{:#}", Experiment::read(&Reader::new(&kc)).unwrap_err());
        assert!(
            e.contains("TRACKER_PROJECT") && e.contains("one folder under the runs folder"),
            "{bad}: {e}"
        );
    }
    for good in ["lenet5-abc12", "my_project.v2"] {
        let ov = config::parse_overrides(&[format!("PROJECT={good}")]).unwrap();
        let (kc, _) = config::load(&k, &cfg, &ov).unwrap();
        assert_eq!(Experiment::read(&Reader::new(&kc)).unwrap().project, good);
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn attention_presets_and_ablation_steps_are_matrix_axes() {
    let load = |name: &str| {
        let (kc, _) =
            config::load(&root().join("Kconfig"), &root().join("defconfigs").join(name), &[]).unwrap();
        Experiment::read(&Reader::new(&kc)).unwrap()
    };
    let exp = load("gpt2-ra-mla-ablation");
    let cells = knlp::matrix::cells(&exp).unwrap();
    let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "gpt2-B0_adamw_none",
            "gpt2-MLA0_adamw_none",
            "gpt2-MLAKV0_adamw_none",
            "gpt2-RAMLA0_adamw_none",
            "gpt2-RAMLAKV0_adamw_none"
        ]
    );
    for (c, att) in cells.iter().zip(["mha", "mla", "mla_kvsplice", "ra_mla", "ra_mla_kvsplice"]) {
        let m = knlp::matrix::build_model(&exp, c, 0, 0).unwrap();
        assert_eq!(m.config()["attention"], att, "{}", c.id);
        assert_eq!(m.config()["fisher_metrics"], true);
        // One optimizer setting for every step; the digit 0 is lr 6e-4.
        let o = knlp::matrix::opt_config(&exp, c).unwrap();
        assert_eq!((o.lr, o.beta2, o.weight_decay), (6e-4, 0.95, 0.1), "{}", c.id);
        // GPT-2 under AdamW clips at 1.0 by default, as the seed did.
        assert_eq!(o.clip_norm, 1.0, "{}", c.id);
    }
    let exp = load("gpt2-attention-small");
    let cells = knlp::matrix::cells(&exp).unwrap();
    assert_eq!(cells.len(), 6);
    assert_eq!(cells[2].id, "gpt2-mla_adamw_none");
    let m = knlp::matrix::build_model(&exp, &cells[2], 0, 0).unwrap();
    assert_eq!(m.config()["d_latent"], 64);
    // A lone mha keeps the plain cell ids and options of earlier runs, so
    // projects started before the attention menu existed still continue.
    let exp = load("gpt2-brown-small");
    assert_eq!(knlp::matrix::cells(&exp).unwrap()[0].id, "gpt2_adamw_none");
    assert!(exp.attentions.is_empty());
    let keys: Vec<&String> = exp.gpt2.as_object().unwrap().keys().collect();
    for k in &keys {
        assert!(
            ["bias", "tie_weights", "block_size", "dropout", "n_layer", "n_head", "n_embd", "preset"]
                .contains(&k.as_str()),
            "a default attention knob is recorded: {k}"
        );
    }
    assert!(!serde_json::to_string(&exp).unwrap().contains("attentions"));
    // A bad step names the symbol.
    let d = std::env::temp_dir().join(format!("knlp-steps-{}.config", std::process::id()));
    std::fs::write(&d, "CONFIG_MODEL_GPT2=y\nCONFIG_RA_ABLATION_STEPS=\"B0,MLA7\"\n").unwrap();
    let (kc, _) = config::load(&root().join("Kconfig"), &d, &[]).unwrap();
    let e = Experiment::read(&Reader::new(&kc)).unwrap_err().to_string();
    assert!(e.contains("CONFIG_RA_ABLATION_STEPS") && e.contains("MLA7"), "{e}");
    let _ = std::fs::remove_file(&d);
}

#[test]
fn gradient_clipping_follows_the_seed_unless_set() {
    let (kc, _) =
        config::load(&root().join("Kconfig"), &root().join("defconfigs/gpt2-brown-small"), &[]).unwrap();
    let mut exp = Experiment::read(&Reader::new(&kc)).unwrap();
    assert_eq!(exp.clip_norm, None, "GRAD_CLIP_NORM defaults to auto");
    let gpt2 = knlp::matrix::cells(&exp).unwrap().remove(0);
    let with = |model: &str, opt: &str| knlp::matrix::Cell {
        model: model.into(),
        optimizer: opt.into(),
        ..gpt2.clone()
    };
    let clip = |e: &Experiment, c: &knlp::matrix::Cell| knlp::matrix::opt_config(e, c).unwrap().clip_norm;
    // auto: GPT-2 clips at 1.0 under every optimizer but SGD (spec 3.6) ...
    for opt in ["adamw", "adam", "adamwadv", "adamwspam", "adamwprune"] {
        assert_eq!(clip(&exp, &with("gpt2", opt)), 1.0, "gpt2 {opt}");
    }
    assert_eq!(clip(&exp, &with("gpt2", "sgd")), 0.0);
    // ... and other models keep their optimizer's default.
    assert_eq!(clip(&exp, &with("lenet5", "adamw")), 0.0);
    assert_eq!(clip(&exp, &with("lenet5", "adamwadv")), 1.0);
    exp.clip_norm = Some(0.5);
    assert_eq!(clip(&exp, &with("lenet5", "sgd")), 0.5);
    exp.clip_norm = Some(0.0);
    assert_eq!(clip(&exp, &with("gpt2", "adamw")), 0.0);
    // A bad value names the option.
    let mut kc = kc;
    kc.set_value("GRAD_CLIP_NORM", "-1").unwrap();
    let e = Experiment::read(&Reader::new(&kc)).unwrap_err().to_string();
    assert!(e.contains("GRAD_CLIP_NORM"), "{e}");
}

/// ResNet-50 cells train on 32x32 CIFAR images: the CIFAR stem, not the
/// ImageNet one that would shrink them to 8x8 before layer1 (issue 16, bug 7).
#[test]
fn resnet50_cells_use_the_cifar_stem() {
    let (kc, _) =
        config::load(&root().join("Kconfig"), &root().join("defconfigs/gpt2-brown-small"), &[]).unwrap();
    let exp = Experiment::read(&Reader::new(&kc)).unwrap();
    let cell =
        knlp::matrix::Cell { model: "resnet50".into(), ..knlp::matrix::cells(&exp).unwrap().remove(0) };
    let mut m = knlp::matrix::build_model(&exp, &cell, 100, 3).unwrap();
    m.store_mut().finalize(tch::Device::Cpu).unwrap();
    assert_eq!(m.store().numel(), 23_705_252, "ResNet-50, CIFAR stem, 100 classes");
    let x = tch::Tensor::zeros([2, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    let y = m.forward(&x, false).unwrap();
    assert_eq!(y.size(), [2, 100]);
}

/// A magnitude cell records no pruning variant (it recorded bitter7).
#[test]
fn magnitude_cells_record_no_variant() {
    let (kc, _) =
        config::load(&root().join("Kconfig"), &root().join("defconfigs/gpt2-brown-small"), &[]).unwrap();
    let exp = Experiment::read(&Reader::new(&kc)).unwrap();
    let base = knlp::matrix::cells(&exp).unwrap().remove(0);
    let cell = knlp::matrix::Cell { pruning: "magnitude".into(), sparsity: 0.5, ..base.clone() };
    let p = knlp::matrix::prune_config(&exp, &cell).unwrap();
    assert_eq!((p.method.as_str(), p.variant.as_str()), ("magnitude", ""));
    p.validate().unwrap();
    let state = knlp::matrix::Cell { pruning: "state".into(), variant: Some("bitter3".into()), ..base };
    assert_eq!(knlp::matrix::prune_config(&exp, &state).unwrap().variant, "bitter3");
}

/// Bad values fail in the config layer with the option and what is allowed,
/// never later in a cell: every float option against non-finite, negative
/// and out-of-interval values, every integer override against its range,
/// empty lists, and line breaks (which would corrupt .config).
#[test]
fn bad_values_are_refused_with_what_is_allowed() {
    let d = std::env::temp_dir().join(format!("knlp-badvalues-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let k = root().join("Kconfig");
    let base = std::fs::read_to_string(root().join("defconfigs/gpt2-brown-small")).unwrap();
    let cfg = d.join(".config");
    let read = |text: &str| -> Result<Experiment, String> {
        std::fs::write(&cfg, text).unwrap();
        let (kc, _) = config::load(&k, &cfg, &[]).map_err(|e| format!("{e:#}"))?;
        Experiment::read(&Reader::new(&kc)).map_err(|e| format!("{e:#}"))
    };
    read(&base).unwrap();
    // Every float (string) symbol of the tree the code reads.
    let kc = tree();
    let floats: Vec<String> = kc
        .symbols()
        .filter(|s| {
            s.orig_type() == kconfig::SymbolType::String
                && s.defaults().first().is_some_and(|d| d.value.trim_matches('"').parse::<f64>().is_ok())
        })
        .map(|s| s.name().to_string())
        .collect();
    assert!(floats.len() >= 10 && floats.contains(&"LEARNING_RATE".to_string()), "{floats:?}");
    let mut tried = 0;
    for sym in &floats {
        for bad in ["nan", "inf", "-inf", "-1", "1e400", "abc"] {
            // Symbols behind a disabled menu are not read: enable what the
            // symbol needs by trying it in a preset where it is visible.
            let text = format!("{base}CONFIG_{sym}=\"{bad}\"\nCONFIG_OPTIMIZER_SGD=y\nCONFIG_OPTIMIZER_ADAMWSPAM=y\nCONFIG_PRUNING_MAGNITUDE=y\nCONFIG_PRUNING_MOVEMENT=y\n");
            let (kc, _) = {
                std::fs::write(&cfg, &text).unwrap();
                config::load(&k, &cfg, &[]).unwrap()
            };
            if kc.symbol(sym).unwrap().str_value() != bad {
                continue; // not visible in this configuration
            }
            tried += 1;
            let e = Experiment::read(&Reader::new(&kc)).err().map(|e| format!("{e:#}"));
            let e = e.unwrap_or_else(|| panic!("CONFIG_{sym}=\"{bad}\" was accepted"));
            assert!(e.contains(&format!("CONFIG_{sym}")), "{sym}={bad}: {e}");
        }
    }
    eprintln!("{tried} bad float values tried over {} float options", floats.len());
    assert!(tried >= 40, "only {tried} bad floats were visible");
    for bad in ["0", "-3e-3", "nan"] {
        let ov = config::parse_overrides(&[format!("LR={bad}")]).unwrap();
        std::fs::write(&cfg, &base).unwrap();
        let (kc, _) = config::load(&k, &cfg, &ov).unwrap();
        let e = format!("{:#}", Experiment::read(&Reader::new(&kc)).unwrap_err());
        assert!(e.contains("LEARNING_RATE") && (e.contains("> 0") || e.contains("finite")), "LR={bad}: {e}");
    }
    // Integer overrides name their range.
    for (var, bad, range) in [
        ("EPOCHS", "-3", "0 to"),
        ("BATCH_SIZE", "0", "1 to"),
        ("STEPS", "-1", "0 to"),
        ("PARALLEL_JOBS", "0", "1 to 64"),
        ("NPROC", "-2", "0 to 1024"),
    ] {
        let ov = config::parse_overrides(&[format!("{var}={bad}")]).unwrap();
        std::fs::write(&cfg, &base).unwrap();
        let e = format!("{:#}", config::load(&k, &cfg, &ov).unwrap_err());
        assert!(
            e.contains(&format!("{var}={bad}"))
                && e.contains("outside the allowed range")
                && e.contains(range),
            "{e}"
        );
    }
    for var in ["SPARSITY", "MODELS", "OPTIMIZERS", "PRUNING", "VARIANTS"] {
        let ov = config::parse_overrides(&[format!("{var}=")]).unwrap();
        let e = format!("{:#}", config::load(&k, &cfg, &ov).unwrap_err());
        assert!(e.contains(&format!("{var}= is empty")), "{e}");
    }
    let ov = config::parse_overrides(&["PROJECT=a\nCONFIG_X=y".into()]).unwrap();
    assert!(format!("{:#}", config::load(&k, &cfg, &ov).unwrap_err()).contains("line break"));
    // `knlp config set` refuses a line break and leaves .config as it was.
    std::fs::write(&cfg, &base).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
        .args(["config", "set", "--kconfig"])
        .arg(&k)
        .args(["TRACKER_PROJECT", "x\nCONFIG_SEED=5"])
        .env("KCONFIG_CONFIG", &cfg)
        .env("srctree", root())
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("line break"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), base);
    // `knlp check-config` checks $KCONFIG_CONFIG, not only ./.config.
    std::fs::write(&cfg, format!("{base}CONFIG_LEARNING_RATE=\"nan\"\n")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
        .args(["check-config", "--kconfig"])
        .arg(&k)
        .env("KCONFIG_CONFIG", &cfg)
        .env("srctree", root())
        .current_dir(root())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success() && out.contains("FAIL") && out.contains("LEARNING_RATE"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn allyesconfig_checks_out() {
    let d = std::env::temp_dir().join(format!("knlp-allyes-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join("allyes.config");
    let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
        .args(["allyesconfig", "Kconfig"])
        .env("KCONFIG_CONFIG", &cfg)
        .env("srctree", root())
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&cfg).unwrap();
    for on in ["CONFIG_MODEL_RESNET50=y", "CONFIG_MODEL_GPT2=y", "CONFIG_PRUNING_STATE=y", "CONFIG_MECHINT=y"]
    {
        assert!(text.lines().any(|l| l == on), "allyesconfig lacks {on}");
    }
    // What `make check-config` runs, on this file only.
    let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
        .args(["check-config", "--kconfig", "Kconfig"])
        .arg(&cfg)
        .current_dir(root())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("  ok ") && !out.contains("FAIL"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}
