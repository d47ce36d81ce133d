//! Compile every fused kernel for a given architecture without a GPU, and
//! read ptxas's report: registers, spills and shared memory per entry
//! point, and whether the block size each entry is launched with fits the
//! register file. This is what `make test` can check on a CPU-only machine
//! (a source that NVRTC rejects, an entry point renamed in one place only,
//! a specialization that spills or cannot launch), ahead of any GPU run.
use anyhow::{bail, Result};

use super::nvrtc;

/// One source a kernel family compiles, with the entry points it launches
/// and the most threads per block it launches each with.
pub struct Source {
    pub family: &'static str,
    /// The specialization, e.g. `COLS 768`.
    pub variant: String,
    pub src: String,
    pub entries: Vec<(&'static str, u32)>,
}

/// ptxas's report on one entry point.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    pub name: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub smem_bytes: u32,
    /// The block size it is launched with.
    pub threads: u32,
}

impl Entry {
    /// Registers a block of its launch size takes ([`block_registers`]).
    pub fn block_registers(&self) -> u32 {
        block_registers(self.registers, self.threads)
    }
}

/// Registers a block of `threads` takes at `registers` per thread:
/// allocated per warp in units of 256, to warps in groups of four (one per
/// SM sub-partition; the occupancy calculator's hardware check, sm_75 to
/// sm_90). At most [`BLOCK_REGISTERS`] for the launch to succeed.
pub fn block_registers(registers: u32, threads: u32) -> u32 {
    let per_warp = (registers * 32).div_ceil(256) * 256;
    threads.div_ceil(32).next_multiple_of(4) * per_warp
}

/// One compiled source.
pub struct Report {
    pub family: &'static str,
    pub variant: String,
    pub arch: i32,
    pub entries: Vec<Entry>,
    /// Problems found: missing or undeclared entry points, spills, a block
    /// that does not fit.
    pub problems: Vec<String>,
}

/// A block's registers and static shared memory on every architecture
/// knlp targets (sm_75 and later): 64 K registers, 48 KiB of static
/// shared memory.
pub const BLOCK_REGISTERS: u32 = 65_536;
const STATIC_SMEM: u32 = 48 * 1024;

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// The entry points of a ptxas `-v` log, in the order reported.
pub fn parse_ptxas(log: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    // ptxas reports a non-inlined device function's properties after the
    // entry that calls it: a stack line counts only under its entry's name.
    let mut props_of = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Entry { name, ..Entry::default() });
            continue;
        }
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            props_of = rest.trim().to_string();
            continue;
        }
        let Some(e) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            if props_of != e.name {
                continue;
            }
            e.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            e.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            e.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains("registers") {
            e.registers = number_before(line, "registers").unwrap_or(0);
            e.smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// What is wrong with `entries` (ptxas's report) for a source declaring
/// `declared` (entry, threads per block).
fn problems(declared: &[(&'static str, u32)], entries: &mut [Entry]) -> Vec<String> {
    let mut p = Vec::new();
    for (name, threads) in declared {
        match entries.iter_mut().find(|e| e.name == *name) {
            None => p.push(format!("entry point {name} is not in the compiled source")),
            Some(e) => e.threads = *threads,
        }
    }
    for e in entries.iter() {
        if !declared.iter().any(|(n, _)| *n == e.name) {
            p.push(format!("entry point {} is compiled but not declared", e.name));
            continue;
        }
        if e.spill_stores > 0 || e.spill_loads > 0 {
            p.push(format!("{} spills ({} bytes stored, {} loaded)", e.name, e.spill_stores, e.spill_loads));
        }
        if e.block_registers() > BLOCK_REGISTERS {
            p.push(format!(
                "{}: {} registers x {} threads need {} registers, a block has {BLOCK_REGISTERS}",
                e.name,
                e.registers,
                e.threads,
                e.block_registers()
            ));
        }
        if e.smem_bytes > STATIC_SMEM {
            p.push(format!("{}: {} bytes of static shared memory", e.name, e.smem_bytes));
        }
    }
    p
}

/// Compile `sources` for compute capability `arch` (a real architecture
/// this NVRTC knows, e.g. 90) and report on each.
pub fn run(sources: &[Source], arch: i32) -> Result<Vec<Report>> {
    let rtc = nvrtc::get().map_err(anyhow::Error::msg)?;
    let archs = rtc.archs()?;
    if !archs.contains(&arch) {
        bail!("NVRTC {:?} has no sm_{arch} (it knows {archs:?})", rtc.version());
    }
    sources
        .iter()
        .map(|s| {
            let c = rtc.compile(s.family, &s.src, arch, true)?;
            let mut entries = parse_ptxas(&c.log);
            let problems = problems(&s.entries, &mut entries);
            Ok(Report { family: s.family, variant: s.variant.clone(), arch, entries, problems })
        })
        .collect()
}

/// An architecture as `90`, `sm_90` or `compute_90`.
pub fn parse_arch(s: &str) -> Result<i32> {
    let digits = s.trim().trim_start_matches("sm_").trim_start_matches("compute_");
    match digits.parse::<i32>() {
        Ok(a) if (10..=999).contains(&a) => Ok(a),
        _ => bail!("--arch: expected an architecture such as 90 or sm_90, got {s:?}"),
    }
}

/// The reports as a table, one line per entry point, problems after.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<6} {:<7} {:<22} {:<12} {:>5} {:>7} {:>6} {:>6} {:>6}\n",
        "arch", "family", "variant", "entry", "regs", "threads", "smem", "stack", "spill"
    );
    for r in reports {
        for e in &r.entries {
            out += &format!(
                "sm_{:<3} {:<7} {:<22} {:<12} {:>5} {:>7} {:>6} {:>6} {:>6}\n",
                r.arch,
                r.family,
                r.variant,
                e.name,
                e.registers,
                e.threads,
                e.smem_bytes,
                e.stack_bytes,
                e.spill_stores + e.spill_loads
            );
        }
        for p in &r.problems {
            out += &format!("  problem: sm_{} {} {}: {p}\n", r.arch, r.family, r.variant);
        }
    }
    out
}

/// Every source the kernel families compile, at the specializations knlp
/// uses: `scores` are the mask update's scorer expressions (name, CUDA
/// expression; `prune::score` owns them), the others are listed by the
/// families themselves.
pub fn sources(scores: &[(String, String)]) -> Vec<Source> {
    let mut v = super::prune::check_sources(scores);
    v.extend(super::xent::check_sources());
    v.extend(super::norm::check_sources());
    v.extend(super::mla::check_sources());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'add_ln_bwd' for 'sm_90'
ptxas info    : Function properties for add_ln_bwd
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 212 registers, used 1 barriers, 16384 bytes smem
ptxas info    : Compile time = 41.982 ms
ptxas info    : Compiling entry function 'add_ln_fwd' for 'sm_90'
ptxas info    : Function properties for add_ln_fwd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 66 registers, used 0 barriers
ptxas info    : Compile time = 21.715 ms";

    #[test]
    fn parses_ptxas_reports() {
        let e = parse_ptxas(LOG);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            Entry {
                name: "add_ln_bwd".into(),
                registers: 212,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12,
                smem_bytes: 16384,
                threads: 0
            }
        );
        assert_eq!((e[1].name.as_str(), e[1].registers, e[1].smem_bytes), ("add_ln_fwd", 66, 0));
    }

    #[test]
    fn a_device_functions_properties_stay_its_own() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for _Z6helperv
ptxas         .     64 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers";
        let e = parse_ptxas(log);
        assert_eq!((e.len(), e[0].spill_stores, e[0].stack_bytes, e[0].registers), (1, 0, 0, 40));
    }

    #[test]
    fn blocks_take_registers_in_groups_of_four_warps() {
        // 108 registers: 3584 per warp. 17 warps round to 20: 71,680.
        let e = Entry { registers: 108, threads: 17 * 32, ..Entry::default() };
        assert_eq!(e.block_registers(), 20 * 3584);
        let e = Entry { registers: 108, threads: 16 * 32, ..Entry::default() };
        assert_eq!(e.block_registers(), 16 * 3584);
    }

    #[test]
    fn finds_spills_missing_entries_and_oversized_blocks() {
        let mut e = parse_ptxas(LOG);
        let p = problems(&[("add_ln_fwd", 1024), ("add_ln_gone", 32)], &mut e);
        assert!(p.iter().any(|p| p.contains("add_ln_gone is not in")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("add_ln_bwd is compiled but not declared")), "{p:?}");
        // 66 registers round to 72 per thread: 2304 per warp, 73,728 for 32 warps.
        assert!(p.iter().any(|p| p.contains("add_ln_fwd: 66 registers x 1024 threads need 73728")), "{p:?}");
        let mut e = parse_ptxas(LOG);
        let p = problems(&[("add_ln_fwd", 256), ("add_ln_bwd", 128)], &mut e);
        assert_eq!(p, vec!["add_ln_bwd spills (4 bytes stored, 12 loaded)".to_string()]);
    }
}
