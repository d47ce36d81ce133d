//! `knlp`: the command-line front end. Each subcommand is a thin call into
//! the library.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use knlp::script::{self, Limits, Runtime};

#[derive(Parser)]
#[command(
    name = "knlp",
    version,
    about = "Kernel-style ML research shell: Rhai scripts over libtorch",
    after_help = "Kconfig commands, with kconfiglib's arguments and environment (KCONFIG_CONFIG, srctree):\n  \
                  olddefconfig, alldefconfig, allnoconfig, allyesconfig, allmodconfig, listnewconfig,\n  \
                  savedefconfig, defconfig, setconfig, config get|set SYMBOL [VALUE], menuconfig [KCONFIG];\n  \
                  conf --alldefconfig|--defconfig FILE|... KCONFIG, with Linux's conf arguments and output.\n  \
                  --allow-shell lets $(shell,...) run (see docs/config.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum JupyterCommand {
    /// Write the kernelspec where `jupyter kernelspec list` finds it.
    Install(SpecArgs),
    /// Remove an installed kernelspec.
    Uninstall(SpecArgs),
    /// Run the kernel (Jupyter starts this with its connection file).
    Kernel {
        /// The connection file Jupyter wrote
        #[arg(short = 'f', long = "connection-file")]
        connection_file: PathBuf,
    },
}

#[derive(Args)]
struct SpecArgs {
    /// Into the user's Jupyter data folder (the default)
    #[arg(long, conflicts_with = "prefix")]
    user: bool,
    /// Into PREFIX/share/jupyter (a virtual environment)
    #[arg(long)]
    prefix: Option<PathBuf>,
    /// The kernel's name
    #[arg(long, default_value = "knlp")]
    name: String,
    /// The name notebooks show
    #[arg(long, default_value = "knlp (Rhai)")]
    display_name: String,
}

impl SpecArgs {
    fn target(&self) -> knlp::jupyter::install::Target {
        match &self.prefix {
            Some(p) => knlp::jupyter::install::Target::Prefix(p.clone()),
            None => knlp::jupyter::install::Target::User,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a Rhai script; arguments after FILE reach it as ARGS.
    Run {
        #[command(flatten)]
        limits: LimitArgs,
        /// Run the script as N ranks of a data-parallel job on this host (docs/distributed.md)
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// The script (.rhai)
        file: PathBuf,
        /// Arguments for the script (available as ARGS)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print the scripting API reference (markdown), or the entries for NAME.
    Doc {
        /// A function name
        name: Option<String>,
    },
    /// Jupyter: install the "knlp (Rhai)" kernelspec, or run the kernel (docs/notebooks.md).
    #[command(subcommand)]
    Jupyter(JupyterCommand),
    /// Start the interactive shell (same as knlp-shell).
    Shell {
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Tokenise text files with GPT-2's BPE into train.bin/val.bin (nanoGPT format).
    PrepareText {
        /// Text files; each is one document (end-of-text tokens separate them)
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder for train.bin, val.bin and meta.json
        #[arg(long)]
        out: PathBuf,
        /// Fraction of documents (or tokens, for a single document) held out for validation
        #[arg(long, default_value_t = knlp::data::DEFAULT_VAL_FRACTION)]
        val_fraction: f64,
    },
    /// Compile every fused GPU kernel with NVRTC for ARCH, no GPU needed; print ptxas's
    /// registers, spills and shared memory per entry point (docs/gpu.md).
    Kernels {
        /// Architectures, as 90 or sm_90
        #[arg(long = "arch", value_name = "ARCH", default_values_t = ["sm_80".to_string(), "sm_90".to_string()])]
        archs: Vec<String>,
    },
    /// Every NVIDIA GPU's utilisation, memory, temperature, power and clocks (q quits).
    Gputop {
        /// JSON lines (one per GPU per round) instead of the terminal view
        #[arg(long)]
        json: bool,
        /// Seconds between rounds
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// With --json: stop after N rounds (0: until interrupted)
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Serve a page of live training curves and a JSON API of the runs (docs/serve.md).
    Serve {
        /// Folder of projects (or of runs)
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Port; 0 picks a free one (printed)
        #[arg(long, default_value_t = knlp::serve::DEFAULT_PORT)]
        port: u16,
        /// Address to listen on; anything but localhost is reachable from other machines
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The access token (default: $KNLP_SERVE_TOKEN, else a random one, printed)
        #[arg(long)]
        token: Option<String>,
    },
    /// Make a token corpus from a source tree: `linux` (the kernel) or `linux-docs` (docs/data.md).
    PrepareCorpus {
        /// The corpus preset: linux or linux-docs
        corpus: String,
        /// The extracted source tree (make prepare-kernel-corpus unpacks Debian's linux-source-6.1)
        #[arg(long)]
        src: PathBuf,
        /// Output folder for train.bin, val.bin and meta.json
        #[arg(long)]
        out: PathBuf,
        /// Stop adding files at this many tokens, train and val together
        #[arg(long, value_name = "N")]
        max_tokens: Option<u64>,
        /// Fraction of files held out for validation
        #[arg(long, default_value_t = knlp::data::corpus::DEFAULT_CORPUS_VAL_FRACTION)]
        val_fraction: f64,
        /// Leave out files larger than this (generated tables)
        #[arg(long, default_value_t = knlp::data::corpus::DEFAULT_MAX_FILE_BYTES)]
        max_file_bytes: u64,
        /// The source package's version, recorded in meta.json
        #[arg(long)]
        source_version: Option<String>,
        /// Rebuild even when the folder is up to date
        #[arg(long)]
        force: bool,
    },
    /// Run what .config describes: one experiment, or the test matrix of its cells.
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Move an existing run of this configuration aside and start over
        #[arg(long)]
        fresh: bool,
        /// Train each cell as N data-parallel ranks on this host (as NPROC=N)
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// List the cells that would run, what each computes and its state, then exit
        #[arg(long)]
        dry_run: bool,
        /// Do not ask before a large matrix (YES=1)
        #[arg(long)]
        yes: bool,
    },
    /// Run every configuration of a sweep file over a base .config, as cells of
    /// one project (docs/workflow.md#9-sweeps).
    Sweep {
        /// Lines CONFIG_X=start:step:end (inclusive range), CONFIG_X=a|b|c or CONFIG_X=value
        file: PathBuf,
        /// The base configuration (default: $KCONFIG_CONFIG, else .config)
        #[arg(long, value_name = "FILE")]
        base: Option<PathBuf>,
        /// The Kconfig tree
        #[arg(long, default_value = "Kconfig")]
        kconfig: PathBuf,
        /// Override a setting of every configuration, as `make VAR=value` (see `train --help`);
        /// PROJECT=name names the sweep's project
        #[arg(long = "set", value_name = "VAR=VALUE")]
        overrides: Vec<String>,
        /// Check every configuration and list the cells that would run, then exit
        #[arg(long)]
        dry_run: bool,
        /// Do not ask before a large sweep (YES=1)
        #[arg(long)]
        yes: bool,
        /// Allow more than 10000 configurations
        #[arg(long)]
        force: bool,
        /// Train each cell as N data-parallel ranks on this host (as NPROC=N)
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Continue the most recent matrix (or PROJECT): done cells are skipped,
    /// interrupted cells resume from their last checkpoint, the rest run.
    Continue {
        /// A project name under the runs folder, or a project folder
        project: Option<String>,
        /// Also run failed cells again
        #[arg(long)]
        retry_failed: bool,
        /// Folder of projects
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Cells at once (default: as recorded)
        #[arg(long)]
        jobs: Option<usize>,
        /// Ranks per cell (default: as recorded; a run resumes on any number)
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Dry run: validate .config, build every cell's model and take one step of each on the CPU.
    Check {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Validate configurations: .config and every defconfig (unknown symbols,
    /// unmet dependencies, out-of-range values, an empty matrix are errors).
    CheckConfig {
        /// The Kconfig tree
        #[arg(long, default_value = "Kconfig")]
        kconfig: PathBuf,
        /// Files to check (default: $KCONFIG_CONFIG or .config if present, and defconfigs/*)
        files: Vec<PathBuf>,
    },
    /// Run one cell of a matrix (what `knlp train` starts per cell).
    #[command(hide = true)]
    Cell {
        project_dir: PathBuf,
        cell: String,
        #[arg(long)]
        resume: bool,
        /// Run the cell as N ranks (the matrix passes NPROC)
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Print the table of a project's runs (default: the most recently modified under the runs folder).
    Results {
        /// A project name under the runs folder, or a project folder
        project: Option<String>,
        /// Sort by COL, `-COL` for descending; repeat (or comma-separate) for more keys
        #[arg(long, value_name = "COL", allow_hyphen_values = true)]
        sort: Vec<String>,
        /// Keep rows where COL=VALUE (also !=, <, <=, >, >=; `70%` is 0.7; `null` is missing); repeatable
        #[arg(long, value_name = "COL=VALUE")]
        filter: Vec<String>,
        /// Show exactly these columns, comma separated
        #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
        columns: Option<Vec<String>>,
        /// Show every column
        #[arg(long)]
        all: bool,
        /// Also write the table (raw values) to this CSV file
        #[arg(long, value_name = "FILE")]
        csv: Option<PathBuf>,
        /// Also write the table (raw values) to this Parquet file
        #[arg(long, value_name = "FILE")]
        parquet: Option<PathBuf>,
        /// Folder of projects
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Keep projects' results (not checkpoints) with graphs, report.md and an
    /// index.md in <OUT>/<NAME>/.
    Archive {
        /// The archive's name (a folder under --out)
        name: String,
        /// Project names under the runs folder, or project folders (default: the most recent)
        projects: Vec<String>,
        /// Folder of projects
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Folder of archives
        #[arg(long, default_value = "key_results")]
        out: PathBuf,
    },
    /// Draw a project's graphs (PNG and SVG) and report.md into <project>/graphs/.
    Graphs {
        /// A project name under the runs folder, or a project folder (default: the most recent)
        project: Option<String>,
        /// Folder of projects
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Scaling curves of GPT-2 runs (docs/scaling.md): validation loss
    /// against the MLP:attention ratio and latency against depth, measured
    /// where the projects hold runs at two or more x, the seed's analytic
    /// curve otherwise.
    Scaling {
        /// Project names under the runs folder, or project folders (default: the most recent)
        projects: Vec<String>,
        /// Folder of projects
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Output folder (default: <project>/graphs, or runs/scaling for several)
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// KV circuit discovery on GPT-2 checkpoints (docs/kv-circuits.md): the
    /// MECHINT settings of .config, overridden by these options; then the
    /// V0/V1 comparison of any pair of results in the output folder.
    Mechint(Box<MechintArgs>),
    /// Versions, devices and threads.
    Info,
}

#[derive(Args)]
struct MechintArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// A checkpoint file, a glob of them, or a run folder
    #[arg(long, conflicts_with = "runs")]
    checkpoint: Option<String>,
    /// A project folder: every run of it with a checkpoint
    #[arg(long)]
    runs: Option<String>,
    /// Token folder (train.bin, val.bin) or `brown`; empty: the checkpoint's own data
    #[arg(long)]
    dataset: Option<String>,
    /// Results go to <DIR>/<checkpoint's run or name>/
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    #[arg(long)]
    target_sparsity: Option<f64>,
    #[arg(long)]
    steps: Option<i64>,
    #[arg(long)]
    lr: Option<f64>,
    /// type:start:end with type constant, linear or exp
    #[arg(long)]
    temperature: Option<String>,
    /// linear, exponential or cosine
    #[arg(long)]
    sparsity_schedule: Option<String>,
    #[arg(long)]
    init_keep_prob: Option<f64>,
    #[arg(long)]
    eval_every: Option<i64>,
    #[arg(long)]
    eval_batches: Option<i64>,
    #[arg(long)]
    batch_size: Option<i64>,
    /// Tokens per window (0: the model's block size)
    #[arg(long)]
    block_size: Option<i64>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long)]
    device: Option<String>,
    /// Do not write final_masks.safetensors
    #[arg(long)]
    no_save_masks: bool,
    /// Only compare two result folders (V0 then V1) into --output-dir
    #[arg(long, num_args = 2, value_names = ["V0_DIR", "V1_DIR"])]
    compare: Option<Vec<PathBuf>>,
}

#[derive(Args)]
struct ConfigArgs {
    /// The Kconfig tree
    #[arg(long, default_value = "Kconfig")]
    kconfig: PathBuf,
    /// The configuration (default: $KCONFIG_CONFIG, else .config)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a setting for this invocation, as `make VAR=value` does: TIME, EPOCHS, STEPS,
    /// SEED, LR, BATCH_SIZE, PARALLEL_JOBS, BASELINE, PROJECT, DEVICE, TRACKER, MODELS,
    /// OPTIMIZERS, PRUNING, SPARSITY, VARIANTS (repeatable)
    #[arg(long = "set", value_name = "VAR=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn dot_config(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| {
            PathBuf::from(std::env::var("KCONFIG_CONFIG").unwrap_or_else(|_| ".config".into()))
        })
    }
}

#[derive(Args)]
struct LimitArgs {
    /// Stop a script after N Rhai operations (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_operations)]
    max_operations: u64,
    /// Maximum depth of nested function calls
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_call_levels)]
    max_call_levels: usize,
    /// Largest array a script may build
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_array_size)]
    max_array_size: usize,
    /// Longest string a script may build, in bytes
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_string_size)]
    max_string_size: usize,
    /// Stop a script after this many seconds of wall time (0 = none)
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    timeout: f64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_operations: self.max_operations,
            max_call_levels: self.max_call_levels,
            max_array_size: self.max_array_size,
            max_string_size: self.max_string_size,
            timeout_secs: self.timeout.max(0.0),
            ..Limits::default()
        }
    }
}

/// Options of `knlp run` that take a value (so the script file is found).
const RUN_VALUE_OPTIONS: &[&str] = &[
    "--max-operations",
    "--max-call-levels",
    "--max-array-size",
    "--max-string-size",
    "--timeout",
    "--nproc",
];

/// The command line without `--nproc N` (what each rank runs), up to the
/// script file of `knlp run`; the script's own arguments are kept as given.
fn without_nproc(head: &[String], tail: &[String]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < head.len() {
        let a = &head[i];
        if a == "--nproc" {
            i += 2;
            continue;
        }
        if !a.starts_with("--nproc=") {
            out.push(a.into());
        }
        i += 1;
    }
    out.extend(tail.iter().map(Into::into));
    out
}

/// Launch `argv` minus `--nproc` as `n` ranks (`knlp run/cell --nproc N`).
fn launch(n: usize, head: &[String], tail: &[String]) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("knlp: cannot find this executable to launch ranks: {e}");
            return 2;
        }
    };
    match knlp::dist::launch::run(n, &exe, &without_nproc(head, tail)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("knlp: {e:#}");
            2
        }
    }
}

/// A rank checks torchrun's variables before any work.
fn check_rank_env() -> Result<(), i32> {
    match knlp::dist::Env::from_env() {
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!("knlp: distributed environment: {e:#}");
            Err(2)
        }
    }
}

/// Split `knlp run [OPTIONS] FILE ARGS...` after FILE, so that everything
/// after the script (including `--help`) reaches the script untouched.
fn split_script_args(argv: Vec<String>) -> (Vec<String>, Vec<String>) {
    if argv.get(1).map(String::as_str) != Some("run") {
        return (argv, Vec::new());
    }
    let mut i = 2;
    while i < argv.len() {
        let a = argv[i].as_str();
        if RUN_VALUE_OPTIONS.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return (argv[..=i].to_vec(), argv[i + 1..].to_vec());
        }
    }
    (argv, Vec::new())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // `knlp results | head` ends quietly, as other command-line tools do,
    // instead of panicking on a closed pipe. The Jupyter kernel and the
    // server keep SIGPIPE ignored: their sockets report a gone peer as an error.
    if !matches!(argv.get(1).map(String::as_str), Some("jupyter" | "serve")) {
        // SAFETY: restoring the default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // The Kconfig tools take kconfiglib's command lines verbatim.
    if argv.get(1).map(String::as_str) == Some("menuconfig") {
        let code = menuconfig::main_from_args(&argv[2..]);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    if argv.get(1).is_some_and(|c| kconfig::cli::COMMANDS.contains(&c.as_str())) {
        let code = kconfig::cli::run(&argv[1..], &mut std::io::stdout(), &mut std::io::stderr());
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let (head, script_args) = split_script_args(argv);
    let cli = Cli::parse_from(head.clone());
    let code = match cli.command {
        Command::Run { nproc: Some(n), .. } | Command::Cell { nproc: Some(n), .. } => {
            launch(n, &head, &script_args)
        }
        Command::Run { .. } | Command::Cell { .. } if check_rank_env().is_err() => 2,
        Command::Run { limits, file, args: _, nproc: None } => {
            let args = script_args;
            let dir = file.parent().map(PathBuf::from).filter(|p| !p.as_os_str().is_empty());
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let limits = limits.limits();
            let run = || {
                let mut rt = Runtime::new(dir, limits.clone());
                match rt.run_file(&file, &args) {
                    Ok(code) => code,
                    Err(e) => {
                        eprint!("{}", e.rendered);
                        e.exit_code()
                    }
                }
            };
            match script::on_script_thread(&limits, run) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("knlp run: error: {e}");
                    2
                }
            }
        }
        Command::Doc { name: None } => {
            print!("{}", script::api::reference_markdown(&script::reference()));
            0
        }
        Command::Doc { name: Some(n) } => {
            let docs = script::reference();
            let found = script::api::lookup(&docs, &n);
            if found.is_empty() {
                eprintln!("knlp doc: no documented function '{n}'");
                1
            } else {
                for d in found {
                    println!("{}\n    {}", d.signature, d.doc);
                }
                0
            }
        }
        Command::Jupyter(JupyterCommand::Install(a)) => {
            report(knlp::jupyter::install::install(&a.target(), &a.name, &a.display_name).map(|dir| {
                println!("installed kernelspec {} in {}", a.name, dir.display());
                0
            }))
        }
        Command::Jupyter(JupyterCommand::Uninstall(a)) => {
            report(knlp::jupyter::install::uninstall(&a.target(), &a.name).map(|dir| {
                println!("removed {}", dir.display());
                0
            }))
        }
        Command::Jupyter(JupyterCommand::Kernel { connection_file }) => {
            report(knlp::jupyter::run(&connection_file).map(|_| 0))
        }
        Command::Shell { limits } => knlp::shell::Shell::new(limits.limits()).run(),
        Command::PrepareText { inputs, out, val_fraction } => {
            match knlp::data::prepare_text(&inputs, &out, val_fraction) {
                Ok(summary) => {
                    println!("{summary}");
                    0
                }
                Err(e) => {
                    eprintln!("knlp prepare-text: {e:#}");
                    1
                }
            }
        }
        Command::Kernels { archs } => report((|| {
            let rtc = knlp::kernels::nvrtc::get().map_err(anyhow::Error::msg)?;
            let (major, minor) = rtc.version();
            println!("# NVRTC {major}.{minor} ({})", rtc.path);
            let sources = knlp::kernels::check::sources(&knlp::prune::score::cuda_scorers());
            let mut bad = 0;
            for a in &archs {
                let arch = knlp::kernels::check::parse_arch(a)?;
                let reports = knlp::kernels::check::run(&sources, arch)?;
                print!("{}", knlp::kernels::check::table(&reports));
                bad += reports.iter().map(|r| r.problems.len()).sum::<usize>();
            }
            if bad > 0 {
                eprintln!("knlp kernels: {bad} problem(s)");
            }
            Ok(i32::from(bad > 0))
        })()),
        Command::Gputop { json, interval, count } => {
            let run = || -> anyhow::Result<()> {
                if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
                    anyhow::bail!("--interval must be a number of seconds in (0, 3600], got {interval}");
                }
                let every = std::time::Duration::from_secs_f64(interval);
                if json {
                    knlp::gputop::run_json(every, count)
                } else {
                    knlp::gputop::run_tui(every)
                }
            };
            match run() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("knlp gputop: {e:#}");
                    1
                }
            }
        }
        Command::Serve { runs_dir, port, host, token } => {
            let opts = knlp::serve::Options { runs_dir, host, port, token };
            match knlp::serve::serve(&opts) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("knlp serve: {e:#}");
                    1
                }
            }
        }
        Command::PrepareCorpus {
            corpus,
            src,
            out,
            max_tokens,
            val_fraction,
            max_file_bytes,
            source_version,
            force,
        } => {
            let run = || -> anyhow::Result<knlp::data::corpus::CorpusSummary> {
                let opts = knlp::data::CorpusOptions {
                    preset: knlp::data::corpus::preset(&corpus)?,
                    src,
                    out,
                    val_fraction,
                    max_tokens,
                    max_file_bytes,
                    source_version: source_version.filter(|v| !v.is_empty()),
                    force,
                    progress: true,
                };
                knlp::data::prepare_corpus(&opts)
            };
            match run() {
                Ok(summary) => {
                    println!("{summary}");
                    0
                }
                Err(e) => {
                    eprintln!("knlp prepare-corpus: {e:#}");
                    1
                }
            }
        }
        Command::Train { mut cfg, fresh, nproc, dry_run, yes } => {
            if let Some(n) = nproc {
                cfg.overrides.push(format!("NPROC={n}"));
            }
            if dry_run {
                report(knlp_dry_run(&cfg))
            } else {
                report(knlp_train(&cfg, fresh, yes))
            }
        }
        Command::Sweep { file, base, kconfig, mut overrides, dry_run, yes, force, nproc } => {
            if let Some(n) = nproc {
                overrides.push(format!("NPROC={n}"));
            }
            let base = base.unwrap_or_else(|| {
                PathBuf::from(std::env::var("KCONFIG_CONFIG").unwrap_or_else(|_| ".config".into()))
            });
            report(knlp_sweep(&file, base, kconfig, &overrides, dry_run, yes, force))
        }
        Command::Continue { project, retry_failed, runs_dir, jobs, nproc } => {
            report(knlp_continue(project.as_deref(), retry_failed, &runs_dir, jobs, nproc))
        }
        Command::Check { cfg } => report(knlp_check(&cfg)),
        Command::CheckConfig { kconfig, files } => report(knlp_check_config(&kconfig, files)),
        Command::Cell { project_dir, cell, resume, nproc: None } => {
            // Ctrl-C (forwarded by the runner) stops at a step boundary.
            knlp::interrupt::install();
            match knlp::matrix::run_cell(&project_dir, &cell, resume) {
                Ok(s) if s.status == knlp::runs::Status::Done => 0,
                Ok(s) => {
                    eprintln!("cell {cell}: {}: {}", s.status, s.reason.unwrap_or_default());
                    1
                }
                Err(e) => {
                    eprintln!("cell {cell}: {e:#}");
                    1
                }
            }
        }
        Command::Results { project, sort, filter, columns, all, csv, parquet, runs_dir } => {
            let args = ::report::ResultsArgs {
                project,
                root: runs_dir,
                table: ::report::TableOptions { sort, filters: filter, columns, all_columns: all },
                csv,
                parquet,
            };
            report(::report::results(&args, &mut std::io::stdout()).map(|_| 0))
        }
        Command::Graphs { project, runs_dir } => report(
            ::report::graphs(project.as_deref(), &runs_dir, &mut std::io::stdout())
                .map(|set| i32::from(!set.warnings.is_empty())),
        ),
        Command::Scaling { projects, runs_dir, out } => report((|| {
            let dirs = project_dirs(&projects, &runs_dir)?;
            let out = match (out, dirs.as_slice()) {
                (Some(o), _) => o,
                (None, [one]) => one.join("graphs"),
                (None, _) => runs_dir.join("scaling"),
            };
            let r = knlp::scaling::report(&dirs, &out)?;
            for c in &r.curves {
                let n = if c.source == "measured" { c.points.len() } else { c.positions.len() };
                let what = if c.source == "measured" { "runs" } else { "positions marked" };
                println!("  {:<6} {:<9} {n} {what}", c.key, c.source);
            }
            for s in &r.skipped {
                println!("  left out: {s}");
            }
            println!("wrote {} and scaling_{{ratio,depth}}.{{png,svg}}", r.out.join(&r.markdown).display());
            Ok(0)
        })()),
        Command::Mechint(args) => report(knlp_mechint(&args)),
        Command::Archive { name, projects, runs_dir, out } => report((|| {
            let dirs = project_dirs(&projects, &runs_dir)?;
            let a = ::report::archive(&name, &dirs, &out)?;
            for (p, runs, done) in &a.projects {
                println!("  {p:<40} {runs} run(s), {done} done");
            }
            println!("archived {} file(s), {} bytes, in {} (index.md)", a.files, a.bytes, a.dir.display());
            Ok(0)
        })()),
        Command::Info => {
            println!("knlp {}", env!("CARGO_PKG_VERSION"));
            println!("libtorch {}", knlp::shim::torch_version());
            println!("cpu threads {}", tch::get_num_threads());
            let n = tch::Cuda::device_count();
            println!("cuda devices {n}");
            println!("cudnn {}", tch::Cuda::cudnn_is_available());
            let yes = |b: bool| if b { "yes" } else { "no (not built)" };
            println!(
                "distributed: gloo {}, nccl {}",
                yes(knlp::dist::has_gloo()),
                yes(knlp::dist::has_nccl())
            );
            0
        }
    };
    ExitCode::from(script::exit_status(code))
}

/// Print an error from a command and turn it into an exit status.
/// Project folders named on the command line, or the most recent one.
fn project_dirs(projects: &[String], runs_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if projects.is_empty() {
        return Ok(vec![::report::resolve_project(None, runs_dir)?]);
    }
    projects.iter().map(|p| ::report::resolve_project(Some(p), runs_dir)).collect()
}

fn report(r: anyhow::Result<i32>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("knlp: {}", knlp::tensor::shorten_message(&format!("{e:#}")));
            1
        }
    }
}

/// The evaluated configuration and experiment of `cfg`.
fn experiment(cfg: &ConfigArgs) -> anyhow::Result<(knlp::config::Experiment, String)> {
    let overrides = knlp::config::parse_overrides(&cfg.overrides)?;
    let dot = cfg.dot_config();
    let (kc, warnings) = knlp::config::load(&cfg.kconfig, &dot, &overrides)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let exp = knlp::config::Experiment::read(&knlp::config::Reader::new(&kc))?;
    let text = std::fs::read_to_string(&dot).unwrap_or_default();
    Ok((exp, text))
}

/// Matrices larger than this ask before they start, on a terminal.
const ASK_ABOVE_CELLS: usize = 16;

/// `knlp train --dry-run`: the numbered cells `make` would run, then exit.
fn knlp_dry_run(cfg: &ConfigArgs) -> anyhow::Result<i32> {
    use knlp::runs::Status;
    let (exp, dot_text) = experiment(cfg)?;
    let cells = knlp::matrix::cells(&exp)?;
    let project = knlp::config::project_name(&exp, &dot_text);
    let dir = exp.runs_dir.join(&project);
    let ranks = if exp.nproc > 0 { format!(", {} rank(s) each", exp.nproc) } else { String::new() };
    println!(
        "dry run: project {project} ({}), {} cell(s), {} at once{ranks}, device {}",
        dir.display(),
        cells.len(),
        exp.parallel_jobs.max(1),
        exp.device
    );
    // The plan `make` itself follows, so the two cannot disagree.
    let plan = knlp::matrix::plan(&dir, &cells, false);
    let to_run = plan.iter().filter(|(_, _, run)| *run).count();
    for (i, (c, (_, st, run))) in cells.iter().zip(&plan).enumerate() {
        let state = match (st, run) {
            (Status::Done, _) => "done, would be skipped",
            (Status::Failed, false) => "failed earlier, skipped (continue --retry-failed)",
            (Status::Pending, true) => "would run",
            _ => "would resume from its checkpoint",
        };
        println!("{:>4}. {:<48} {}\n      {state}", i + 1, c.id, knlp::matrix::describe_cell(&exp, c));
    }
    println!("{to_run} of {} cell(s) would run; nothing was started", cells.len());
    Ok(0)
}

/// Ask before `cells` cells when there are many: true to go on. `--yes`,
/// `YES=1` or a standard input that is not a terminal skip the question.
fn confirm(cells: usize, yes: bool, question: &str) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    let yes = yes || std::env::var("YES").is_ok_and(|v| v == "1");
    if cells <= ASK_ABOVE_CELLS || yes || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    print!("{question} [y/N] ");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// `knlp sweep` (`make sweep SWEEP=file`): expand and check every
/// configuration, then run their cells as one matrix project.
fn knlp_sweep(
    file: &std::path::Path,
    base: PathBuf,
    kconfig: PathBuf,
    overrides: &[String],
    dry_run: bool,
    yes: bool,
    force: bool,
) -> anyhow::Result<i32> {
    use knlp::sweep;
    let sweep_file = sweep::SweepFile::read(file)?;
    let overrides = knlp::config::parse_overrides(overrides)?;
    let explicit = overrides.iter().rev().find(|(k, _)| k == "PROJECT").map(|(_, v)| v.trim().to_string());
    let opts = sweep::Options { kconfig, base, overrides, force };
    let plan = sweep::expand(&sweep_file, &opts)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let project = sweep::project_name(file, explicit.as_deref())?;
    let dir = plan.experiment.runs_dir.join(&project);
    // A baseline that fits no cell stops the sweep before anything is written.
    let baseline = &plan.experiment.baseline;
    let adopt = if baseline.is_empty() {
        None
    } else {
        Some(sweep::baseline_cells(&plan.experiment.runs_dir, baseline, &plan.matrix(&project))?)
    };
    if dry_run {
        print!("{}", plan.listing(&project, &dir));
        if let Some((_, ids)) = &adopt {
            println!("baseline {baseline} would be reused as {} cell(s): {}", ids.len(), ids.join(", "));
        }
        return Ok(0);
    }
    let n = plan.cell_count();
    let question = format!(
        "{n} cells in {} configurations of sweep {} (`make sweep-dry-run SWEEP=...` lists them). Run them?",
        plan.configs.len(),
        file.display()
    );
    if !confirm(n, yes, &question)? {
        println!("nothing started");
        return Ok(1);
    }
    let _lock = knlp::matrix::Lock::take(&dir)?;
    let (m, continuing) = plan.write(&dir, &project)?;
    if continuing {
        println!("sweep {project}: continuing");
    } else {
        println!(
            "sweep {project}: {} configuration(s), {} cell(s) in {}",
            plan.configs.len(),
            m.cells.len(),
            dir.display()
        );
    }
    if let Some((src, ids)) = adopt {
        sweep::adopt_baseline(&src, &dir, &ids)?;
        println!("baseline {baseline} reused as {} cell(s): {}", ids.len(), ids.join(", "));
    }
    run_matrix(&dir, &m, false, plan.experiment.parallel_jobs.max(1) as usize, None)
}

fn knlp_train(cfg: &ConfigArgs, fresh: bool, yes: bool) -> anyhow::Result<i32> {
    use knlp::matrix::{self, MatrixFile};
    let (exp, dot_text) = experiment(cfg)?;
    let cells = matrix::cells(&exp)?;
    let project = knlp::config::project_name(&exp, &dot_text);
    let dir = exp.runs_dir.join(&project);
    // A large matrix is a lot of machine time: ask on a terminal.
    let question =
        format!("{} cells in project {project} (`make dry-run` lists them). Run them?", cells.len());
    if !confirm(cells.len(), yes, &question)? {
        println!("nothing started");
        return Ok(1);
    }
    if fresh && dir.exists() {
        // Never move a project another process is writing: hold its lock
        // while moving it, then give up the moved copy's.
        let held = matrix::Lock::take(&dir)?;
        let aside = dir.with_file_name(format!("{project}.old-{}", knlp::runs::now_iso().replace(':', "")));
        std::fs::rename(&dir, &aside)?;
        drop(held);
        let _ = std::fs::remove_file(aside.join(".lock"));
        println!("moved the earlier run to {}", aside.display());
    }
    let _lock = matrix::Lock::take(&dir)?;
    let m = MatrixFile {
        project: project.clone(),
        created: knlp::runs::now_iso(),
        dot_config: dot_text,
        experiment: exp.clone(),
        cells,
    };
    match MatrixFile::read(&dir) {
        Ok(old) if old.experiment != m.experiment || old.cells != m.cells => anyhow::bail!(
            "{} holds a run of a different configuration; `make continue PROJECT={project}` continues it as recorded, `make FRESH=1` starts over",
            dir.display()
        ),
        Ok(_) => println!("project {project}: continuing"),
        Err(_) => {
            m.write(&dir)?;
            println!("project {project}: {} cell(s) in {}", m.cells.len(), dir.display());
        }
    }
    if !exp.baseline.is_empty() {
        let id = matrix::adopt_baseline(&exp.runs_dir, &exp.baseline, &dir, &m.cells)?;
        println!("baseline {} reused as cell {id}", exp.baseline);
    }
    run_matrix(&dir, &m, false, exp.parallel_jobs.max(1) as usize, None)
}

fn knlp_continue(
    project: Option<&str>,
    retry_failed: bool,
    runs_dir: &std::path::Path,
    jobs: Option<usize>,
    nproc: Option<usize>,
) -> anyhow::Result<i32> {
    use knlp::matrix::{self, MatrixFile};
    let dir = match project {
        Some(p) if std::path::Path::new(p).join(matrix::MATRIX_FILE).exists() => PathBuf::from(p),
        Some(p) => runs_dir.join(p),
        None => matrix::latest_project(runs_dir)?,
    };
    let _lock = matrix::Lock::take(&dir)?;
    let m = MatrixFile::read(&dir)?;
    println!("project {}: continuing {}", m.project, dir.display());
    let jobs = jobs.unwrap_or(m.experiment.parallel_jobs.max(1) as usize);
    run_matrix(&dir, &m, retry_failed, jobs, nproc)
}

/// The headline of a finished cell: its evaluation metric and sparsity
/// (the whole record is in summary.json and `knlp results`).
fn outcome(m: &serde_json::Map<String, serde_json::Value>) -> String {
    type Show = fn(f64) -> String;
    let show: [(&str, Show); 3] = [
        ("test_acc", |v| format!("test_acc {:.2}%", v * 100.0)),
        ("val_ppl", |v| format!("val_ppl {v:.2}")),
        ("sparsity", |v| format!("sparsity {:.1}%", v * 100.0)),
    ];
    show.iter().filter_map(|(k, f)| m.get(*k).and_then(|v| v.as_f64()).map(f)).collect::<Vec<_>>().join("  ")
}

/// Run the cells of `m` that still need to, then print the outcome.
fn run_matrix(
    dir: &std::path::Path,
    m: &knlp::matrix::MatrixFile,
    retry_failed: bool,
    jobs: usize,
    nproc: Option<usize>,
) -> anyhow::Result<i32> {
    use knlp::runs::Status;
    let plan = knlp::matrix::plan(dir, &m.cells, retry_failed);
    for (id, st, run) in &plan {
        let what = match (st, run) {
            (Status::Done, _) => "done, skipped",
            (Status::Failed, false) => "failed earlier, skipped (--retry-failed runs it)",
            (Status::Pending, true) => "to run",
            (_, true) => "interrupted, resumes",
            _ => "skipped",
        };
        println!("  {id:<48} {what}");
    }
    let ids: Vec<String> = plan.iter().filter(|(_, _, r)| *r).map(|(i, _, _)| i.clone()).collect();
    let exe = std::env::current_exe()?;
    let runner = knlp::matrix::Runner {
        exe,
        project_dir: dir.to_path_buf(),
        jobs,
        resume: true,
        nproc: nproc.unwrap_or(m.experiment.nproc.max(0) as usize),
        dist_timeout: m.experiment.dist_timeout,
    };
    let results = runner.run(&ids)?;
    let mut failed = 0;
    println!("\nproject {}:", m.project);
    for (id, _, _) in &plan {
        let run = knlp::runs::RunDir { path: dir.join(id) };
        let st = run.status().map(|s| s.status).unwrap_or(Status::Pending);
        let summary = run.read_json(knlp::runs::SUMMARY).ok();
        let metric = summary
            .as_ref()
            .and_then(|s| s.get("final_metrics"))
            .and_then(|f| f.as_object())
            .map(outcome)
            .unwrap_or_default();
        let reason = results.iter().find(|r| &r.id == id).and_then(|r| r.reason.clone()).unwrap_or_default();
        if st != Status::Done {
            failed += 1;
        }
        println!("  {id:<48} {:<11} {metric} {reason}", st.to_string());
    }
    println!("(`knlp results` for the whole table)");
    if m.experiment.auto_graphs {
        // Graphs are a convenience: a drawing problem is reported, not fatal.
        match ::report::load_project(dir).and_then(|p| ::report::write_graphs(&p)) {
            Ok(set) => {
                println!("\ngraphs: {} files in {}", set.files.len(), dir.join("graphs").display());
                for w in &set.warnings {
                    eprintln!("knlp: warning: graphs: {w}");
                }
            }
            Err(e) => eprintln!("knlp: warning: graphs: {e:#}"),
        }
    }
    if dir.join(knlp::sweep::SWEEP_FILE).exists() {
        // The ranked summary of a sweep, after every run or continue of it.
        match knlp::sweep::write_summary(dir) {
            Ok(s) => {
                println!("\n{}", s.render(false, Some(10)).trim_end());
                println!("(sweep summary: {} and .txt, .json)", dir.join(knlp::sweep::SUMMARY_MD).display());
            }
            Err(e) => eprintln!("knlp: warning: sweep summary: {e:#}"),
        }
    }
    if knlp::interrupt::requested() {
        println!("interrupted: `make continue` (knlp continue) resumes from the checkpoints");
        return Ok(130);
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn knlp_check(cfg: &ConfigArgs) -> anyhow::Result<i32> {
    let (exp, _) = experiment(cfg)?;
    let results = knlp::matrix::check(&exp)?;
    let mut bad = 0;
    for (id, r) in &results {
        match r {
            Ok(loss) => println!("  ok    {id:<48} loss {loss:.4}"),
            Err(e) => {
                bad += 1;
                println!("  FAIL  {id:<48} {e:#}");
            }
        }
    }
    println!("{} cell(s) checked, {bad} failed", results.len());
    Ok(if bad > 0 { 1 } else { 0 })
}

fn knlp_check_config(kconfig: &std::path::Path, files: Vec<PathBuf>) -> anyhow::Result<i32> {
    let files = if files.is_empty() {
        let mut f: Vec<PathBuf> = Vec::new();
        // The configuration make uses: $KCONFIG_CONFIG, else .config.
        let dot = PathBuf::from(std::env::var("KCONFIG_CONFIG").unwrap_or_else(|_| ".config".into()));
        if dot.exists() {
            f.push(dot);
        }
        let mut defs: Vec<PathBuf> = std::fs::read_dir("defconfigs")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        defs.sort();
        f.extend(defs);
        f
    } else {
        files
    };
    let mut bad = 0;
    for f in &files {
        match knlp::matrix::check_file(kconfig, f) {
            Ok(cells) => println!("  ok    {:<40} {cells} cell(s)", f.display()),
            Err(e) => {
                bad += 1;
                println!("  FAIL  {:<40} {e:#}", f.display());
            }
        }
    }
    println!("{} configuration(s) checked, {bad} with problems", files.len());
    Ok(if bad > 0 { 1 } else { 0 })
}

/// `knlp mechint`: settings from .config (when it exists) with the
/// command line over them, then the analyses and comparisons.
fn knlp_mechint(a: &MechintArgs) -> anyhow::Result<i32> {
    use knlp::mechint::kv_circuit::{self as kv, Mode, Settings};
    let mut say = |s: &str| println!("{s}");
    if let Some(dirs) = &a.compare {
        let out = a.output_dir.clone().unwrap_or_else(|| PathBuf::from("mechint_comparison"));
        for f in kv::compare_variants(&dirs[0], &dirs[1], &out)? {
            println!("wrote {}", f.display());
        }
        return Ok(0);
    }
    let flag_mode = match (&a.checkpoint, &a.runs) {
        (Some(c), _) => Some(Mode::Posttrain(c.clone())),
        (None, Some(r)) => Some(Mode::FromRuns(r.clone())),
        _ => None,
    };
    let dot = a.cfg.dot_config();
    let mut s = if dot.exists() {
        let overrides = knlp::config::parse_overrides(&a.cfg.overrides)?;
        let (kc, warnings) = knlp::config::load(&a.cfg.kconfig, &dot, &overrides)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        let s = Settings::read(&knlp::config::Reader::new(&kc))?;
        if !s.enabled && flag_mode.is_none() {
            anyhow::bail!(
                "{}: MECHINT is off; enable it (make menuconfig) or give --checkpoint or --runs",
                dot.display()
            );
        }
        s
    } else {
        let m = flag_mode.clone().ok_or_else(|| {
            anyhow::anyhow!("{}: no configuration; give --checkpoint or --runs", dot.display())
        })?;
        Settings::defaults(m)
    };
    if let Some(m) = flag_mode {
        s.mode = m;
    }
    let c = &mut s.circuit;
    macro_rules! over {
        ($($field:ident),*) => { $(if let Some(v) = a.$field.clone() { c.$field = v; })* };
    }
    over!(target_sparsity, steps, lr, temperature, sparsity_schedule);
    over!(init_keep_prob, eval_every, eval_batches, batch_size, block_size);
    c.validate()?;
    if let Some(d) = &a.dataset {
        s.dataset = d.clone();
    }
    if let Some(o) = &a.output_dir {
        s.output_dir = o.clone();
    }
    if let Some(d) = &a.device {
        s.device = d.clone();
    }
    s.save_masks &= !a.no_save_masks;
    knlp::interrupt::install();
    let failed = kv::run_all(&s, &mut say)?;
    Ok(i32::from(failed > 0))
}
