//! Data-frame operations shared by the CLI and the script bindings: build
//! from rows, filter, sort, select, group and aggregate, back to rows.
//! Column names are checked first so that errors list the valid ones.
use anyhow::{anyhow, bail, Result};
use polars::prelude::*;
use serde_json::Value;

/// One value of a table, independent of polars and of Rhai.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Cell {
    /// From JSON; arrays and objects become their JSON text.
    pub fn from_json(v: &Value) -> Cell {
        match v {
            Value::Null => Cell::Null,
            Value::Bool(b) => Cell::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Cell::Int(i),
                None => n.as_f64().map(Cell::Float).unwrap_or(Cell::Null),
            },
            Value::String(s) => Cell::Str(s.clone()),
            other => Cell::Str(other.to_string()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Cell::Int(i) => Some(*i as f64),
            Cell::Float(f) => Some(*f),
            _ => None,
        }
    }

    fn from_any(v: AnyValue) -> Cell {
        match v {
            AnyValue::Null => Cell::Null,
            AnyValue::Boolean(b) => Cell::Bool(b),
            AnyValue::Int8(x) => Cell::Int(x.into()),
            AnyValue::Int16(x) => Cell::Int(x.into()),
            AnyValue::Int32(x) => Cell::Int(x.into()),
            AnyValue::Int64(x) => Cell::Int(x),
            AnyValue::UInt8(x) => Cell::Int(x.into()),
            AnyValue::UInt16(x) => Cell::Int(x.into()),
            AnyValue::UInt32(x) => Cell::Int(x.into()),
            AnyValue::UInt64(x) => Cell::Int(x as i64),
            AnyValue::Float32(x) => Cell::Float(x.into()),
            AnyValue::Float64(x) => Cell::Float(x),
            AnyValue::String(s) => Cell::Str(s.to_string()),
            AnyValue::StringOwned(s) => Cell::Str(s.to_string()),
            other => Cell::Str(other.to_string()),
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Null => write!(f, "null"),
            Cell::Bool(b) => write!(f, "{b}"),
            Cell::Int(i) => write!(f, "{i}"),
            Cell::Float(x) => write!(f, "{x}"),
            Cell::Str(s) => write!(f, "{s}"),
        }
    }
}

/// A frame from rows of `(column, value)`. Columns appear in first-seen
/// order; a column is bool, int, float (ints and floats mixed) or string
/// (anything else mixed); a row without a column gets null.
pub fn from_rows(rows: &[Vec<(String, Cell)>]) -> Result<DataFrame> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        for (k, _) in r {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let mut cols = Vec::with_capacity(names.len());
    for name in &names {
        let vals: Vec<Cell> = rows
            .iter()
            .map(|r| r.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or(Cell::Null))
            .collect();
        cols.push(column_of(name, &vals));
    }
    DataFrame::new(rows.len(), cols).map_err(|e| anyhow!("building a frame: {e}"))
}

/// A column from values, with the type rule of [`from_rows`].
pub fn column_of(name: &str, vals: &[Cell]) -> Column {
    let (mut b, mut i, mut f, mut s) = (false, false, false, false);
    for v in vals {
        match v {
            Cell::Null => {}
            Cell::Bool(_) => b = true,
            Cell::Int(_) => i = true,
            Cell::Float(_) => f = true,
            Cell::Str(_) => s = true,
        }
    }
    let name = PlSmallStr::from(name);
    if b && !(i || f || s) {
        let v: Vec<Option<bool>> =
            vals.iter().map(|c| if let Cell::Bool(x) = c { Some(*x) } else { None }).collect();
        Column::new(name, v)
    } else if i && !(b || f || s) {
        let v: Vec<Option<i64>> =
            vals.iter().map(|c| if let Cell::Int(x) = c { Some(*x) } else { None }).collect();
        Column::new(name, v)
    } else if (i || f) && !(b || s) {
        let v: Vec<Option<f64>> = vals.iter().map(Cell::as_f64).collect();
        Column::new(name, v)
    } else {
        let v: Vec<Option<String>> =
            vals.iter().map(|c| if *c == Cell::Null { None } else { Some(c.to_string()) }).collect();
        Column::new(name, v)
    }
}

/// Every row as `(column, value)` pairs, in column order.
pub fn to_rows(df: &DataFrame) -> Vec<Vec<(String, Cell)>> {
    let cols: Vec<(String, &Series)> =
        df.columns().iter().map(|c| (c.name().to_string(), c.as_materialized_series())).collect();
    (0..df.height())
        .map(|i| {
            cols.iter()
                .map(|(n, s)| (n.clone(), s.get(i).map(Cell::from_any).unwrap_or(Cell::Null)))
                .collect()
        })
        .collect()
}

/// The values of one column.
pub fn column_cells(df: &DataFrame, name: &str) -> Result<Vec<Cell>> {
    check_columns(df, &[name])?;
    let s = df.column(name).map_err(|e| anyhow!("{e}"))?.as_materialized_series();
    Ok((0..s.len()).map(|i| s.get(i).map(Cell::from_any).unwrap_or(Cell::Null)).collect())
}

pub fn column_names(df: &DataFrame) -> Vec<String> {
    df.get_column_names().iter().map(|s| s.to_string()).collect()
}

/// Fail on names that are not columns of `df`, listing those that are.
pub fn check_columns<S: AsRef<str>>(df: &DataFrame, names: &[S]) -> Result<()> {
    let have = column_names(df);
    for n in names {
        if !have.iter().any(|h| h == n.as_ref()) {
            bail!("unknown column '{}' (columns: {})", n.as_ref(), have.join(", "));
        }
    }
    Ok(())
}

/// Comparison of a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    pub fn parse(s: &str) -> Result<Op> {
        Ok(match s {
            "=" | "==" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => bail!("unknown comparison '{s}' (valid: ==, !=, <, <=, >, >=)"),
        })
    }
}

/// Keep rows where `column op value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    pub column: String,
    pub op: Op,
    /// Compared as the column's type: text given for a number column is
    /// parsed (`0.7`, `70%`); `null` (or an empty value) matches missing values.
    pub value: Cell,
}

impl Filter {
    /// `COL=VALUE`, `COL!=VALUE`, `COL>=VALUE`, `COL<=VALUE`, `COL>VALUE`, `COL<VALUE`.
    pub fn parse(s: &str) -> Result<Filter> {
        for op in ["!=", ">=", "<=", "==", "=", ">", "<"] {
            if let Some((c, v)) = s.split_once(op) {
                let c = c.trim();
                if c.is_empty() {
                    break;
                }
                return Ok(Filter {
                    column: c.into(),
                    op: Op::parse(op)?,
                    value: Cell::Str(v.trim().into()),
                });
            }
        }
        bail!("filter '{s}' is not COL=VALUE (or COL!=, <, <=, >, >= VALUE)")
    }
}

/// `0.7`, `70%`, `3`.
fn parse_number(s: &str) -> Option<f64> {
    let t = s.trim();
    match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|x| x / 100.0),
        None => t.parse::<f64>().ok(),
    }
}

fn is_numeric(dt: &DataType) -> bool {
    dt.is_primitive_numeric()
}

/// Whether each row passes `f`. Rows are few (one per run, or per logged
/// record), so this is plain Rust over the values rather than polars' lazy
/// engine, which would double the dependency tree and the build time.
fn filter_rows(df: &DataFrame, f: &Filter) -> Result<Vec<bool>> {
    check_columns(df, &[&f.column])?;
    let dt = df.column(&f.column).map_err(|e| anyhow!("{e}"))?.dtype().clone();
    let cells = column_cells(df, &f.column)?;
    let null = match &f.value {
        Cell::Null => true,
        Cell::Str(s) => s.is_empty() || s == "null",
        _ => false,
    };
    if null {
        return match f.op {
            Op::Eq => Ok(cells.iter().map(|c| *c == Cell::Null).collect()),
            Op::Ne => Ok(cells.iter().map(|c| *c != Cell::Null).collect()),
            _ => bail!("filter {}: only == and != compare with null", f.column),
        };
    }
    // A missing value passes only `!=`.
    let test = |o: Option<std::cmp::Ordering>| match o {
        None => f.op == Op::Ne,
        Some(o) => match f.op {
            Op::Eq => o.is_eq(),
            Op::Ne => o.is_ne(),
            Op::Lt => o.is_lt(),
            Op::Le => o.is_le(),
            Op::Gt => o.is_gt(),
            Op::Ge => o.is_ge(),
        },
    };
    if is_numeric(&dt) {
        let v = match &f.value {
            Cell::Int(i) => *i as f64,
            Cell::Float(x) => *x,
            Cell::Str(s) => parse_number(s).ok_or_else(|| {
                anyhow!("filter {}: '{s}' is not a number (the column holds numbers)", f.column)
            })?,
            Cell::Bool(_) | Cell::Null => bail!("filter {}: the column holds numbers", f.column),
        };
        // Equal within a relative tolerance, so 0.7 matches 0.7000000001.
        let eps = 1e-9 * v.abs().max(1.0);
        let ord = |x: f64| {
            if (x - v).abs() <= eps {
                Some(std::cmp::Ordering::Equal)
            } else {
                x.partial_cmp(&v)
            }
        };
        return Ok(cells.iter().map(|c| test(c.as_f64().and_then(ord))).collect());
    }
    if dt == DataType::Boolean {
        let b = match &f.value {
            Cell::Bool(b) => *b,
            Cell::Str(s) if s.eq_ignore_ascii_case("true") => true,
            Cell::Str(s) if s.eq_ignore_ascii_case("false") => false,
            other => bail!("filter {}: '{other}' is not true or false (the column holds bools)", f.column),
        };
        return Ok(cells
            .iter()
            .map(|c| test(if let Cell::Bool(x) = c { Some(x.cmp(&b)) } else { None }))
            .collect());
    }
    let v = match &f.value {
        Cell::Str(s) => s.clone(),
        other => other.to_string(),
    };
    Ok(cells
        .iter()
        .map(|c| test(if *c == Cell::Null { None } else { Some(c.to_string().as_str().cmp(v.as_str())) }))
        .collect())
}

/// Rows that pass every filter.
pub fn filter(df: &DataFrame, filters: &[Filter]) -> Result<DataFrame> {
    if filters.is_empty() {
        return Ok(df.clone());
    }
    let mut keep = vec![true; df.height()];
    for f in filters {
        for (k, pass) in keep.iter_mut().zip(filter_rows(df, f)?) {
            *k &= pass;
        }
    }
    filter_mask(df, &keep)
}

/// Rows where `mask` is true (one entry per row).
pub fn filter_mask(df: &DataFrame, mask: &[bool]) -> Result<DataFrame> {
    if mask.len() != df.height() {
        bail!("mask has {} entries for {} rows", mask.len(), df.height());
    }
    let m = BooleanChunked::from_slice(PlSmallStr::from("mask"), mask);
    df.filter(&m).map_err(|e| anyhow!("filter: {e}"))
}

/// Parse `col`, `-col` (descending), comma separated, into sort keys.
pub fn parse_sort(spec: &str) -> Vec<(String, bool)> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.strip_prefix('-') {
            Some(c) => (c.trim().to_string(), true),
            None => (s.strip_prefix('+').unwrap_or(s).trim().to_string(), false),
        })
        .collect()
}

/// Sort by `(column, descending)` keys in order; nulls last; stable. Text
/// sorts naturally (`seed2` before `seed10`), numbers by value.
pub fn sort(df: &DataFrame, keys: &[(String, bool)]) -> Result<DataFrame> {
    if keys.is_empty() {
        return Ok(df.clone());
    }
    let cols: Vec<Vec<Cell>> = keys.iter().map(|(c, _)| column_cells(df, c)).collect::<Result<_>>()?;
    let mut idx: Vec<IdxSize> = (0..df.height() as IdxSize).collect();
    idx.sort_by(|&a, &b| {
        for ((_, desc), col) in keys.iter().zip(&cols) {
            let (x, y) = (&col[a as usize], &col[b as usize]);
            let o = match (x, y) {
                (Cell::Null, Cell::Null) => std::cmp::Ordering::Equal,
                (Cell::Null, _) => std::cmp::Ordering::Greater,
                (_, Cell::Null) => std::cmp::Ordering::Less,
                _ if *desc => cell_cmp(y, x),
                _ => cell_cmp(x, y),
            };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    df.take(&IdxCa::from_vec("idx".into(), idx)).map_err(|e| anyhow!("sort: {e}"))
}

/// Order of two non-null cells: numbers by value, text naturally.
fn cell_cmp(x: &Cell, y: &Cell) -> std::cmp::Ordering {
    let num = |c: &Cell| match c {
        Cell::Int(i) => Some(*i as f64),
        Cell::Float(f) => Some(*f),
        _ => None,
    };
    match (x, y, num(x), num(y)) {
        (_, _, Some(a), Some(b)) => a.total_cmp(&b),
        (Cell::Bool(a), Cell::Bool(b), _, _) => a.cmp(b),
        (Cell::Str(a), Cell::Str(b), _, _) => crate::util::natural_cmp(a, b),
        _ => crate::util::natural_cmp(&x.to_string(), &y.to_string()),
    }
}

/// Only these columns, in this order.
pub fn select<S: AsRef<str>>(df: &DataFrame, cols: &[S]) -> Result<DataFrame> {
    check_columns(df, cols)?;
    df.select(cols.iter().map(|c| c.as_ref().to_string())).map_err(|e| anyhow!("select: {e}"))
}

/// An aggregation of `group_agg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    Mean,
    Median,
    Min,
    Max,
    Sum,
    Count,
    First,
    Last,
}

pub const AGG_NAMES: &[&str] = &["mean", "median", "min", "max", "sum", "count", "first", "last"];

impl Agg {
    pub fn parse(s: &str) -> Result<Agg> {
        Ok(match s {
            "mean" => Agg::Mean,
            "median" => Agg::Median,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "sum" => Agg::Sum,
            "count" => Agg::Count,
            "first" => Agg::First,
            "last" => Agg::Last,
            _ => bail!("unknown aggregation '{s}' (valid: {})", AGG_NAMES.join(", ")),
        })
    }
}

/// Group rows by `keys` (in order of first appearance) and compute
/// `(output column, aggregation, input column)` for each group. No keys:
/// one row over the whole frame. Missing values are skipped except by
/// `first` and `last`; `count` counts the values present.
pub fn group_agg(df: &DataFrame, keys: &[String], aggs: &[(String, Agg, String)]) -> Result<DataFrame> {
    check_columns(df, keys)?;
    let inputs: Vec<&str> = aggs.iter().map(|(_, _, c)| c.as_str()).collect();
    check_columns(df, &inputs)?;
    if aggs.is_empty() {
        bail!("group_by: no aggregations given");
    }
    for (out, agg, input) in aggs {
        let dt = df.column(input).map_err(|e| anyhow!("{e}"))?.dtype().clone();
        let numeric = is_numeric(&dt) || dt == DataType::Boolean;
        if matches!(agg, Agg::Mean | Agg::Median | Agg::Sum) && !numeric {
            bail!(
                "{out}: cannot take the {agg} of '{input}', a column of {dt}",
                agg = format!("{agg:?}").to_lowercase()
            );
        }
    }
    let key_cols: Vec<Vec<Cell>> = keys.iter().map(|k| column_cells(df, k)).collect::<Result<_>>()?;
    let in_cols: Vec<Vec<Cell>> = inputs.iter().map(|c| column_cells(df, c)).collect::<Result<_>>()?;
    // Groups in order of first appearance; a key compares by type and text.
    let mut groups: Vec<(Vec<Cell>, Vec<usize>)> = Vec::new();
    let mut index: std::collections::HashMap<Vec<String>, usize> = std::collections::HashMap::new();
    for row in 0..df.height() {
        let key: Vec<Cell> = key_cols.iter().map(|c| c[row].clone()).collect();
        let text: Vec<String> = key.iter().map(|c| format!("{c:?}")).collect();
        let g = *index.entry(text).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(row);
    }
    if keys.is_empty() && groups.is_empty() {
        groups.push((Vec::new(), Vec::new()));
    }
    let rows: Vec<Vec<(String, Cell)>> = groups
        .iter()
        .map(|(key, members)| {
            let mut row: Vec<(String, Cell)> = keys.iter().cloned().zip(key.iter().cloned()).collect();
            for ((out, agg, _), col) in aggs.iter().zip(&in_cols) {
                let vals: Vec<&Cell> = members.iter().map(|&r| &col[r]).collect();
                row.push((out.clone(), aggregate(*agg, &vals)));
            }
            row
        })
        .collect();
    let out = from_rows(&rows)?;
    // An empty frame still has its columns.
    if out.width() == 0 {
        let mut names: Vec<String> = keys.to_vec();
        names.extend(aggs.iter().map(|(o, _, _)| o.clone()));
        let cols = names.iter().map(|n| column_of(n, &[])).collect();
        return DataFrame::new(0, cols).map_err(|e| anyhow!("group_by: {e}"));
    }
    Ok(out)
}

/// One aggregation over one group's values.
fn aggregate(agg: Agg, vals: &[&Cell]) -> Cell {
    let present: Vec<&Cell> = vals.iter().copied().filter(|c| **c != Cell::Null).collect();
    let num = |c: &Cell| match c {
        Cell::Bool(b) => Some(*b as i64 as f64),
        other => other.as_f64(),
    };
    let nums: Vec<f64> = present.iter().filter_map(|c| num(c)).collect();
    let ints = present.iter().all(|c| matches!(c, Cell::Int(_) | Cell::Bool(_)));
    let pick = |want: std::cmp::Ordering| {
        present
            .iter()
            .copied()
            .reduce(|a, b| {
                let o = match (num(a), num(b)) {
                    (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
                    _ => b.to_string().cmp(&a.to_string()),
                };
                if o == want {
                    b
                } else {
                    a
                }
            })
            .cloned()
            .unwrap_or(Cell::Null)
    };
    match agg {
        Agg::Mean if nums.is_empty() => Cell::Null,
        Agg::Mean => Cell::Float(nums.iter().sum::<f64>() / nums.len() as f64),
        Agg::Median if nums.is_empty() => Cell::Null,
        Agg::Median => {
            let mut v = nums.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            let n = v.len();
            Cell::Float(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
        }
        Agg::Sum if ints => Cell::Int(nums.iter().sum::<f64>() as i64),
        Agg::Sum => Cell::Float(nums.iter().sum()),
        Agg::Min => pick(std::cmp::Ordering::Less),
        Agg::Max => pick(std::cmp::Ordering::Greater),
        Agg::Count => Cell::Int(present.len() as i64),
        Agg::First => vals.first().map(|c| (*c).clone()).unwrap_or(Cell::Null),
        Agg::Last => vals.last().map(|c| (*c).clone()).unwrap_or(Cell::Null),
    }
}

#[cfg(test)]
mod sort_tests {
    use super::*;

    #[test]
    fn text_sorts_naturally_and_nulls_go_last() {
        let df = df!(
            "cell" => ["seed10", "seed2", "seed1", "x"],
            "acc" => [Some(0.5), None, Some(0.9), Some(0.7)],
        )
        .unwrap();
        let cells = |d: &DataFrame| -> Vec<String> {
            column_cells(d, "cell").unwrap().iter().map(|c| c.to_string()).collect()
        };
        assert_eq!(cells(&sort(&df, &[("cell".into(), false)]).unwrap()), ["seed1", "seed2", "seed10", "x"]);
        assert_eq!(cells(&sort(&df, &[("cell".into(), true)]).unwrap()), ["x", "seed10", "seed2", "seed1"]);
        assert_eq!(cells(&sort(&df, &[("acc".into(), true)]).unwrap()), ["seed1", "x", "seed10", "seed2"]);
        assert!(sort(&df, &[("nope".into(), false)]).is_err());
    }
}
