//! Script helpers: command-line arguments and number formatting.
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map, Position, FLOAT, INT};

use super::api::{Api, DocEntry};
use super::value::{rerr, RResult};

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Script helpers");
    api.f(
        "parse_args",
        "args, defaults",
        "Parse `--key value`, `--key=value`, `--flag` and `--no-flag` from `args` (usually `ARGS`) over a map of defaults; values take the type of the default; `-` and `_` are interchangeable; `--help` lists the options and ends the script.",
        |args: Array, defaults: Map| parse_args(&args, &defaults),
    );
    api.f("exit", "", "End the script successfully.", || -> RResult<()> { Err(exit_with(0)) });
    api.f("exit", "code", "End the script with exit status `code`.", |c: INT| -> RResult<()> {
        Err(exit_with(c))
    });
    api.f("assert", "condition", "Fail the script unless `condition` is true.", |c: bool| -> RResult<()> {
        if c {
            Ok(())
        } else {
            Err(rerr("assertion failed"))
        }
    });
    api.f(
        "assert",
        "condition, message",
        "Fail the script with `message` unless `condition` is true.",
        |c: bool, m: ImmutableString| -> RResult<()> {
            if c {
                Ok(())
            } else {
                Err(rerr(format!("assertion failed: {m}")))
            }
        },
    );
    api.f(
        "assert_eq",
        "a, b",
        "Fail unless `a == b` (numbers, strings, bools, arrays of them).",
        |a: Dynamic, b: Dynamic| -> RResult<()> {
            if same(&a, &b) {
                Ok(())
            } else {
                Err(rerr(format!("assertion failed: {} != {}", show(&a), show(&b))))
            }
        },
    );
    api.f("assert_close", "a, b, tol", "Fail unless tensors or numbers `a` and `b` agree within `tol` everywhere (same shape for tensors).", |a: Dynamic, b: Dynamic, tol: FLOAT| -> RResult<()> {
        let (x, y) = (as_tensor(&a)?, as_tensor(&b)?);
        if x.size() != y.size() {
            return Err(rerr(format!("assertion failed: shapes {:?} and {:?} differ", x.size(), y.size())));
        }
        let diff = x.f_sub(&y).and_then(|d| d.f_abs()).and_then(|d| crate::tensor::to_vec_f64(&d)).map_err(|e| rerr(crate::tensor::torch_error(&e)))?;
        let worst = diff.iter().cloned().fold(0.0f64, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) });
        if worst <= tol {
            Ok(())
        } else {
            Err(rerr(format!("assertion failed: values differ by up to {worst:e} (tolerance {tol:e})\n  left:  {}\n  right: {}", show(&a), show(&b))))
        }
    });
    api.f(
        "fmt",
        "value, decimals",
        "A number as text with a fixed number of decimals.",
        |v: FLOAT, d: INT| format!("{v:.*}", d.clamp(0, 17) as usize),
    );
    api.f(
        "fmt",
        "value, decimals",
        "An int as text; `decimals` is accepted so `fmt` takes either number type.",
        |v: INT, _d: INT| v.to_string(),
    );
    api.f(
        "pad",
        "text, width",
        "Left-align `text` in a field of `width` characters.",
        |s: ImmutableString, w: INT| format!("{s:<w$}", w = w.max(0) as usize),
    );
    api.f(
        "lpad",
        "text, width",
        "Right-align `text` in a field of `width` characters.",
        |s: ImmutableString, w: INT| format!("{s:>w$}", w = w.max(0) as usize),
    );
}

/// The error that ends a script with an exit status (see errors::ending).
pub fn exit_with(code: INT) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorTerminated(Dynamic::from(format!("exit:{code}")), Position::NONE))
}

fn show(v: &Dynamic) -> String {
    super::display_value(v)
}

fn same(a: &Dynamic, b: &Dynamic) -> bool {
    if let (Ok(x), Ok(y)) = (a.as_int(), b.as_int()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.read_lock::<Array>(), b.read_lock::<Array>()) {
        return x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| same(p, q));
    }
    if a.is_string() && b.is_string() {
        return a.to_string() == b.to_string();
    }
    if let (Ok(x), Ok(y)) = (a.as_bool(), b.as_bool()) {
        return x == y;
    }
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn num(v: &Dynamic) -> Option<f64> {
    v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64))
}

fn as_tensor(v: &Dynamic) -> RResult<tch::Tensor> {
    if let Some(t) = v.read_lock::<super::value::RTensor>() {
        return t.0.f_to_kind(tch::Kind::Double).map_err(|e| rerr(crate::tensor::torch_error(&e)));
    }
    match num(v) {
        Some(x) => Ok(tch::Tensor::from(x)),
        None => Err(rerr(format!("assert_close(): expected a tensor or a number, got {}", v.type_name()))),
    }
}

fn norm_key(k: &str) -> String {
    k.replace('-', "_")
}

/// The typed value of `raw` for an option whose default is `default`.
fn typed(key: &str, raw: &str, default: &Dynamic) -> RResult<Dynamic> {
    let bad = |ty: &str| rerr(format!("--{}: expected {ty}, got '{raw}'", key.replace('_', "-")));
    if default.is_int() {
        raw.parse::<INT>().map(Dynamic::from_int).map_err(|_| bad("an int"))
    } else if default.is_float() {
        raw.parse::<FLOAT>().map(Dynamic::from_float).map_err(|_| bad("a number"))
    } else if default.is_bool() {
        match raw {
            "true" | "yes" | "1" | "y" => Ok(Dynamic::TRUE),
            "false" | "no" | "0" | "n" => Ok(Dynamic::FALSE),
            _ => Err(bad("true or false")),
        }
    } else {
        Ok(Dynamic::from(raw.to_string()))
    }
}

pub fn parse_args(args: &Array, defaults: &Map) -> RResult<Map> {
    let mut out = defaults.clone();
    let strs: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let valid = || {
        let mut keys: Vec<String> = defaults.keys().map(|k| format!("--{}", k.replace('_', "-"))).collect();
        keys.sort();
        keys.join(", ")
    };
    let mut i = 0;
    while i < strs.len() {
        let arg = &strs[i];
        i += 1;
        if arg == "--help" || arg == "-h" {
            let mut lines = vec!["options (default in brackets):".to_string()];
            let mut keys: Vec<_> = defaults.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in keys {
                lines.push(format!("  --{:<24} [{}]", k.replace('_', "-"), v));
            }
            println!("{}", lines.join("\n"));
            return Err(exit_with(0));
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(rerr(format!(
                "unexpected argument '{arg}' (options look like --key value; valid: {})",
                valid()
            )));
        };
        let (key, inline) = match body.split_once('=') {
            Some((k, v)) => (norm_key(k), Some(v.to_string())),
            None => (norm_key(body), None),
        };
        let (key, negated) = match (defaults.contains_key(key.as_str()), key.strip_prefix("no_")) {
            (false, Some(base)) if defaults.get(base).is_some_and(|d| d.is_bool()) => {
                (base.to_string(), true)
            }
            _ => (key, false),
        };
        let Some(default) = defaults.get(key.as_str()) else {
            return Err(rerr(format!("unknown option --{} (valid: {})", key.replace('_', "-"), valid())));
        };
        let value = if negated {
            Dynamic::FALSE
        } else if let Some(v) = inline {
            typed(&key, &v, default)?
        } else if default.is_bool() {
            // A bare flag; an explicit true/false may follow.
            match strs.get(i).map(String::as_str) {
                Some(v @ ("true" | "false")) => {
                    i += 1;
                    typed(&key, v, default)?
                }
                _ => Dynamic::TRUE,
            }
        } else {
            let Some(v) = strs.get(i) else {
                return Err(rerr(format!("--{} needs a value", key.replace('_', "-"))));
            };
            i += 1;
            typed(&key, v, default)?
        };
        out.insert(key.into(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(v: &[&str]) -> Array {
        v.iter().map(|s| Dynamic::from(s.to_string())).collect()
    }

    fn defaults() -> Map {
        let mut m = Map::new();
        m.insert("epochs".into(), Dynamic::from_int(2));
        m.insert("lr".into(), Dynamic::from_float(0.001));
        m.insert("device".into(), Dynamic::from("cpu".to_string()));
        m.insert("compile".into(), Dynamic::FALSE);
        m.insert("max_steps".into(), Dynamic::from_int(10));
        m
    }

    #[test]
    fn typed_overrides() {
        let m =
            parse_args(&arr(&["--epochs", "5", "--lr=0.1", "--compile", "--max-steps", "3"]), &defaults())
                .unwrap();
        assert_eq!(m["epochs"].as_int().unwrap(), 5);
        assert_eq!(m["lr"].as_float().unwrap(), 0.1);
        assert!(m["compile"].as_bool().unwrap());
        assert_eq!(m["max_steps"].as_int().unwrap(), 3);
        assert_eq!(m["device"].to_string(), "cpu");
        let m = parse_args(&arr(&["--no-compile"]), &defaults()).unwrap();
        assert!(!m["compile"].as_bool().unwrap());
    }

    #[test]
    fn errors_name_the_option() {
        let e = parse_args(&arr(&["--epochs", "x"]), &defaults()).unwrap_err().to_string();
        assert!(e.contains("--epochs") && e.contains("int"), "{e}");
        let e = parse_args(&arr(&["--bogus", "1"]), &defaults()).unwrap_err().to_string();
        assert!(e.contains("unknown option --bogus") && e.contains("--lr"), "{e}");
        let e = parse_args(&arr(&["--lr"]), &defaults()).unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
    }
}
