//! `knlp gputop`: every NVIDIA GPU's utilisation, memory, temperature,
//! power and clocks, as a terminal view (ratatui, like menuconfig) or as
//! JSON lines for logs (`--json`).
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Widget};

use crate::nvml::{Nvml, Sample};

/// Every device's reading, in NVML order: one GPU that does not answer
/// leaves its index and error, not a blank screen.
pub fn sample_all(nvml: &Nvml) -> Result<Vec<std::result::Result<Sample, (u32, String)>>> {
    let n = nvml.count().map_err(|e| anyhow!(e))?;
    Ok((0..n).map(|i| nvml.sample(i).map_err(|e| (i, e))).collect())
}

/// A reading as the view shows it: a failed one as its index and error.
fn shown(r: std::result::Result<Sample, (u32, String)>) -> Sample {
    r.unwrap_or_else(|(index, e)| Sample { index, name: format!("(no reading: {e})"), ..Default::default() })
}

/// NVML, or why there is nothing to show.
pub fn open() -> Result<Nvml> {
    let nvml = Nvml::open().map_err(|e| anyhow!("no NVIDIA GPU to show: {e}"))?;
    if nvml.count().map_err(|e| anyhow!(e))? == 0 {
        bail!("no NVIDIA GPU to show: the driver reports no device");
    }
    Ok(nvml)
}

/// `--json`'s line for one device's reading, with the time.
pub fn json_line(r: &std::result::Result<Sample, (u32, String)>) -> String {
    match r {
        Ok(s) => s.json_line(serde_json::json!({})),
        Err((index, e)) => serde_json::json!({ "index": index, "error": e }).to_string(),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v}{unit}"))
}

/// Draw the view of `samples` into `buf` over `area`.
pub fn render(samples: &[Sample], area: Rect, buf: &mut Buffer) {
    let title = format!(" knlp gputop: {} GPU(s)  (q quits) ", samples.len());
    let outer = Block::default().borders(Borders::ALL).title(title);
    let inner = outer.inner(area);
    outer.render(area, buf);
    let per = 5u16;
    for (i, s) in samples.iter().enumerate() {
        let y = inner.y + i as u16 * per;
        if y + per > inner.y + inner.height {
            let rest = format!("... {} more (enlarge the terminal)", samples.len() - i);
            Paragraph::new(rest)
                .render(Rect::new(inner.x, y.min(inner.bottom().saturating_sub(1)), inner.width, 1), buf);
            break;
        }
        let line = |dy: u16| Rect::new(inner.x + 1, y + dy, inner.width.saturating_sub(2), 1);
        Paragraph::new(format!("GPU {}  {}", s.index, s.name))
            .style(Style::default().fg(Color::Cyan))
            .render(line(0), buf);
        let util = s.util_gpu.unwrap_or(0).min(100);
        Gauge::default()
            .gauge_style(Style::default().fg(Color::Green))
            .percent(util as u16)
            .label(format!("util {}", opt(s.util_gpu, "%")))
            .render(line(1), buf);
        let mem = if s.mem_total_mb > 0.0 { (s.mem_used_mb / s.mem_total_mb).clamp(0.0, 1.0) } else { 0.0 };
        Gauge::default()
            .gauge_style(Style::default().fg(Color::Magenta))
            .ratio(mem)
            .label(format!("memory {:.1} / {:.1} GiB", s.mem_used_mb / 1024.0, s.mem_total_mb / 1024.0))
            .render(line(2), buf);
        let power = s.power_w.map(|w| format!("{w:.0} W"));
        Paragraph::new(format!(
            "temp {}   power {}   SM {}   memory clock {}   memory busy {}",
            opt(s.temperature_c, " C"),
            power.unwrap_or_else(|| "-".into()),
            opt(s.sm_clock_mhz, " MHz"),
            opt(s.mem_clock_mhz, " MHz"),
            opt(s.util_mem, "%"),
        ))
        .render(line(3), buf);
    }
}

/// `--json`: `count` rounds (0: until interrupted), one line per device.
pub fn run_json(interval: Duration, count: u64) -> Result<()> {
    let nvml = open()?;
    let mut out = std::io::stdout().lock();
    let mut round = 0u64;
    loop {
        let lines: Vec<String> = sample_all(&nvml)?.iter().map(json_line).collect();
        let written = lines.iter().try_for_each(|l| writeln!(out, "{l}")).and_then(|_| out.flush());
        match written {
            // A reader that has had enough (`| head`) ends the log, cleanly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
        round += 1;
        if count > 0 && round >= count {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// The terminal view, refreshed every `interval`, until q, Esc or Ctrl-C.
pub fn run_tui(interval: Duration) -> Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::{cursor, execute, terminal};
    let nvml = open()?;
    if !std::io::stdout().is_terminal() {
        bail!("stdout is not a terminal: use --json for logs");
    }
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = terminal::disable_raw_mode();
            let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
        }
    }
    terminal::enable_raw_mode()?;
    let _restore = Restore;
    execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
    let backend = ratatui::backend::CrosstermBackend::new(std::io::stdout());
    let mut term = ratatui::Terminal::new(backend)?;
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            let samples: Vec<Sample> = sample_all(&nvml)?.into_iter().map(shown).collect();
            term.draw(|f| render(&samples, f.area(), f.buffer_mut()))?;
            next = Instant::now() + interval;
        }
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        if event::poll(wait)? {
            match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => next = Instant::now(),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(buf: &Buffer) -> String {
        let a = buf.area;
        (0..a.height)
            .map(|y| (0..a.width).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn sample(i: u32) -> Sample {
        Sample {
            index: i,
            name: format!("NVIDIA H200 #{i}"),
            mem_total_mb: 143_771.0,
            mem_free_mb: 100_000.0,
            mem_used_mb: 43_771.0,
            util_gpu: Some(87),
            util_mem: Some(41),
            temperature_c: Some(61),
            power_w: Some(512.4),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: None,
        }
    }

    #[test]
    fn the_view_shows_each_gpu() {
        let area = Rect::new(0, 0, 90, 13);
        let mut buf = Buffer::empty(area);
        render(&[sample(0), sample(1)], area, &mut buf);
        let t = text(&buf);
        for want in [
            "2 GPU(s)",
            "GPU 0  NVIDIA H200 #0",
            "GPU 1  NVIDIA H200 #1",
            "util 87%",
            "42.7 / 140.4 GiB",
            "512 W",
            "61 C",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(t.contains("memory clock -"), "an unknown value shows as -:\n{t}");
        // A GPU that does not answer is shown as such, the others as usual.
        let area = Rect::new(0, 0, 90, 13);
        let mut buf = Buffer::empty(area);
        let readings = [Err((0, "GPU is lost".to_string())), Ok(sample(1))];
        let samples: Vec<Sample> = readings.into_iter().map(shown).collect();
        render(&samples, area, &mut buf);
        let t = text(&buf);
        assert!(t.contains("GPU 0  (no reading: GPU is lost)") && t.contains("GPU 1  NVIDIA H200 #1"), "{t}");
        // Too small for both: says so.
        let area = Rect::new(0, 0, 60, 8);
        let mut buf = Buffer::empty(area);
        render(&[sample(0), sample(1)], area, &mut buf);
        assert!(text(&buf).contains("1 more"), "{}", text(&buf));
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&json_line(&Ok(sample(3)))).unwrap();
        assert_eq!(v["index"], 3);
        assert_eq!(v["util_gpu"], 87);
        assert_eq!(v["mem_clock_mhz"], serde_json::Value::Null);
        assert!(v["time"].as_f64().unwrap() > 1.7e9);
        let v: serde_json::Value = serde_json::from_str(&json_line(&Err((2, "GPU is lost".into())))).unwrap();
        assert_eq!((v["index"].as_u64(), v["error"].as_str()), (Some(2), Some("GPU is lost")));
    }
}
