//! What a run ran on and from: devices, CPU, host, versions, the hash of its
//! configuration and the project's git commit (`system.json`).
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cuda` or `cpu`.
    pub kind: String,
    /// The card's name (nvidia-smi), or the CPU model.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GitInfo {
    pub commit: String,
    /// Uncommitted changes (tracked or untracked) in the working tree.
    pub dirty: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// The GPUs nvidia-smi lists, or one `cpu` entry.
    pub devices: Vec<DeviceInfo>,
    pub cuda_device_count: i64,
    pub cpu_model: String,
    /// Logical processors in /proc/cpuinfo.
    pub cpu_cores: usize,
    pub hostname: String,
    /// `linux (Debian GNU/Linux 12, kernel 6.1.0)`.
    pub os: String,
    pub knlp_version: String,
    pub libtorch_version: String,
    /// FNV-1a 64 of the configuration's canonical JSON, 16 hex digits.
    pub config_hash: String,
    /// Absent outside a git work tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitInfo>,
    pub created: String,
}

impl SystemInfo {
    /// Describe this machine and the working directory's git state.
    pub fn collect(config: &Value) -> SystemInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpu_model(&cpuinfo).unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let cpu_cores = match cpuinfo.lines().filter(|l| l.starts_with("processor")).count() {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let mut devices = gpus();
        if devices.is_empty() {
            devices.push(DeviceInfo { kind: "cpu".into(), name: cpu_model.clone(), memory_mib: None });
        }
        SystemInfo {
            devices,
            cuda_device_count: tch::Cuda::device_count(),
            cpu_model,
            cpu_cores,
            hostname: crate::runs::hostname(),
            os: os(),
            knlp_version: env!("CARGO_PKG_VERSION").to_string(),
            libtorch_version: crate::shim::torch_version(),
            config_hash: config_hash(config),
            git: git(),
            created: crate::runs::now_iso(),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    // x86 says "model name"; some ARM kernels only "Hardware" or "CPU part".
    ["model name", "Hardware", "cpu model", "Processor"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == *key && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    })
}

/// `name, memory.total` of each card nvidia-smi sees.
fn gpus() -> Vec<DeviceInfo> {
    let Some(out) = run(
        "nvidia-smi",
        &["--query-gpu=name,memory.total", "--format=csv,noheader"],
        Duration::from_secs(10),
    ) else {
        return Vec::new();
    };
    parse_gpus(&out)
}

/// Lines of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader`
/// (`NVIDIA H100 80GB HBM3, 81559 MiB`).
fn parse_gpus(out: &str) -> Vec<DeviceInfo> {
    out.lines()
        .filter_map(|l| {
            let (name, mem) = l.rsplit_once(',')?;
            let memory_mib = mem.split_whitespace().next().and_then(|m| m.parse().ok());
            Some(DeviceInfo { kind: "cuda".into(), name: name.trim().to_string(), memory_mib })
        })
        .filter(|d| !d.name.is_empty())
        .collect()
}

/// This machine's name.
fn os() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release").ok().and_then(|t| {
        t.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string());
    let detail: Vec<String> =
        pretty.into_iter().chain(kernel.map(|k| format!("kernel {k}"))).collect::<Vec<_>>();
    if detail.is_empty() {
        std::env::consts::OS.to_string()
    } else {
        format!("{} ({})", std::env::consts::OS, detail.join(", "))
    }
}

/// The commit checked out in the current directory and whether the tree
/// has changes; `None` outside a git work tree (or without git).
fn git() -> Option<GitInfo> {
    let t = Duration::from_secs(10);
    let commit = run("git", &["rev-parse", "HEAD"], t)?.trim().to_string();
    if commit.is_empty() {
        return None;
    }
    let dirty = run("git", &["status", "--porcelain"], t).is_some_and(|s| !s.trim().is_empty());
    Some(GitInfo { commit, dirty })
}

/// Stdout of a command that succeeded within `timeout`; `None` otherwise
/// (missing program, failure, time-out: the child is killed).
fn run(program: &str, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let out = reader.join().ok()?;
    status.success().then_some(out)
}

/// FNV-1a 64 of the canonical JSON of `config` (object keys sorted at every
/// level, no whitespace), as 16 hex digits: the same configuration gives the
/// same hash whatever order its keys were written in.
pub fn config_hash(config: &Value) -> String {
    let mut text = String::new();
    canonical(config, &mut text);
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

/// The 64-bit FNV-1a hash.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Canonical JSON text: sorted object keys, serde_json's number and string
/// formatting.
pub fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let mut s = String::new();
        canonical(&serde_json::json!({"b": [1, 2.5, "x"], "a": {"d": null, "c": true}}), &mut s);
        assert_eq!(s, r#"{"a":{"c":true,"d":null},"b":[1,2.5,"x"]}"#);
    }

    #[test]
    fn gpus_from_nvidia_smi() {
        let out = "NVIDIA H100 80GB HBM3, 81559 MiB\nNVIDIA A100-SXM4-40GB, 40960 MiB\n\n";
        let g = parse_gpus(out);
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].kind.as_str(), g[0].name.as_str(), g[0].memory_mib),
            ("cuda", "NVIDIA H100 80GB HBM3", Some(81559))
        );
        assert_eq!((g[1].name.as_str(), g[1].memory_mib), ("NVIDIA A100-SXM4-40GB", Some(40960)));
        assert_eq!(parse_gpus("Bad Card, [N/A]")[0].memory_mib, None);
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU\n";
        assert_eq!(cpu_model(text).as_deref(), Some("Intel(R) Xeon(R) CPU"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
