//! Drawing the state into a ratatui [`Buffer`].

use kconfig::NodeKind;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Clear, Widget};

use crate::info::{Lines, Tone};
use crate::state::{Edit, Input, Mode, MsgKind, Search, State, TextView};
use crate::tree::{snapshot, TOP};

/// Smallest usable screen.
const MIN_WIDTH: u16 = 30;
const MIN_HEIGHT: u16 = 8;

/// The screen regions.
pub(crate) struct Areas {
    pub title: Rect,
    pub crumb: Rect,
    pub body: Rect,
    pub message: Rect,
    pub hints: Rect,
}

impl Areas {
    /// Entries that fit in the menu list.
    pub fn list_height(&self) -> usize {
        self.body.height.saturating_sub(2) as usize
    }

    /// Results that fit in the search window (query, count and location
    /// lines excluded).
    pub fn search_list_height(&self) -> usize {
        self.body.height.saturating_sub(5) as usize
    }

    /// Lines that fit in the help window.
    pub fn text_height(&self) -> usize {
        self.body.height.saturating_sub(2) as usize
    }
}

pub(crate) fn areas(area: Rect) -> Areas {
    let row = |y: u16| Rect::new(area.x, area.y + y.min(area.height.saturating_sub(1)), area.width, 1);
    let h = area.height;
    Areas {
        title: row(0),
        crumb: row(1),
        body: Rect::new(area.x, area.y + 2.min(h), area.width, h.saturating_sub(4)),
        message: row(h.saturating_sub(2)),
        hints: row(h.saturating_sub(1)),
    }
}

/// Width of wrapped help text on a screen `screen_width` wide.
fn wrap_width(screen_width: u16) -> usize {
    screen_width.saturating_sub(4).max(10) as usize
}

/// Wraps one line at spaces; continuation lines keep the indentation.
fn wrap_line(line: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= width {
        return vec![line.to_string()];
    }
    let indent = chars.iter().take_while(|c| **c == ' ').count();
    let cont = " ".repeat((indent + 4).min(width / 2));
    let mut out = Vec::new();
    let mut rest: &[char] = &chars;
    let mut first = true;
    while !rest.is_empty() {
        let avail = if first { width } else { width - cont.chars().count() };
        let prefix = if first { String::new() } else { cont.clone() };
        if rest.len() <= avail {
            out.push(format!("{}{}", prefix, rest.iter().collect::<String>()));
            break;
        }
        let cut = rest[..=avail]
            .iter()
            .rposition(|c| *c == ' ')
            .filter(|&p| p > if first { indent } else { 0 })
            .unwrap_or(avail);
        out.push(format!("{}{}", prefix, rest[..cut].iter().collect::<String>().trim_end()));
        rest = &rest[cut..];
        while rest.first() == Some(&' ') {
            rest = &rest[1..];
        }
        first = false;
    }
    out
}

fn wrap_lines(lines: &Lines, screen_width: u16) -> Lines {
    let w = wrap_width(screen_width);
    lines.iter().flat_map(|(l, t)| wrap_line(l, w).into_iter().map(move |s| (s, *t))).collect()
}

/// Lines of a help text once wrapped for the screen width.
pub(crate) fn text_line_count(lines: &Lines, screen_width: u16) -> usize {
    wrap_lines(lines, screen_width).len()
}

fn put(buf: &mut Buffer, x: u16, y: u16, s: &str, max: u16, style: Style) {
    buf.set_stringn(x, y, s, max as usize, style);
}

fn popup(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(area.x + (area.width - w) / 2, area.y + (area.height - h) / 2, w, h)
}

fn draw_input(buf: &mut Buffer, x: u16, y: u16, width: u16, input: &Input) {
    let fw = width.saturating_sub(1) as usize;
    if fw == 0 {
        return;
    }
    let start = if input.cursor >= fw { input.cursor + 1 - fw } else { 0 };
    let visible: String = input.chars.iter().skip(start).take(fw).collect();
    put(buf, x, y, &visible, width, Style::default());
    let cx = x + (input.cursor - start) as u16;
    let under = input.chars.get(input.cursor).map(|c| c.to_string()).unwrap_or_else(|| " ".into());
    put(buf, cx, y, &under, 1, Style::default().add_modifier(Modifier::REVERSED));
}

impl State {
    /// Draws the interface into `buf` (normally the whole terminal).
    pub fn render(&self, area: Rect, buf: &mut Buffer) {
        Clear.render(area, buf);
        if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
            put(buf, area.x, area.y, "Terminal too small", area.width, Style::default());
            return;
        }
        let a = areas(area);
        self.render_title(&a, buf);
        match &self.mode {
            Mode::Search(s) => self.render_search(s, a.body, buf),
            Mode::Text(t) => self.render_text(t, a.body, buf),
            _ => self.render_list(a.body, buf),
        }
        match &self.mode {
            Mode::Edit(e) => self.render_edit(e, a.body, buf),
            Mode::Quit { error } => self.render_quit(error.as_deref(), a.body, buf),
            _ => {}
        }
        if let Some((msg, kind)) = &self.message {
            let style = match kind {
                MsgKind::Info => Style::default(),
                MsgKind::Warn => Style::default().fg(Color::Yellow),
                MsgKind::Error => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            };
            put(buf, a.message.x + 1, a.message.y, msg, a.message.width.saturating_sub(1), style);
        } else if matches!(self.mode, Mode::Normal) {
            // More keys, while there is no message to show.
            let more = "d:save minimal config  a:show all  c:show names  Ctrl-L:redraw";
            put(
                buf,
                a.message.x + 1,
                a.message.y,
                more,
                a.message.width.saturating_sub(1),
                Style::default().fg(Color::DarkGray),
            );
        }
        let hints = match &self.mode {
            Mode::Normal => "Enter:open  Space:toggle  y/n/m:set  Esc:back  /:search  ?:help  s:save  q:quit",
            Mode::Search(_) => "Type to search  Up/Down:select  Enter:jump  Tab:help  Esc:close",
            Mode::Text(_) => "Up/Down/PgUp/PgDn:scroll  Esc/q/?:close",
            Mode::Edit(_) => "Enter:accept  Esc:cancel  Left/Right/Home/End:move  Ctrl-U:clear",
            Mode::Quit { .. } => "y:save and quit  n:quit without saving  c/Esc:cancel",
        };
        put(
            buf,
            a.hints.x + 1,
            a.hints.y,
            hints,
            a.hints.width.saturating_sub(1),
            Style::default().fg(Color::Cyan),
        );
    }

    fn render_title(&self, a: &Areas, buf: &mut Buffer) {
        let bar = Style::default().bg(Color::Blue).fg(Color::White).add_modifier(Modifier::BOLD);
        buf.set_style(a.title, bar);
        let left = format!(" {} - {}", self.config_path.display(), self.kc.mainmenu_text());
        let right = if self.dirty { " [unsaved changes] " } else { "" };
        let rw = right.chars().count() as u16;
        put(buf, a.title.x, a.title.y, &left, a.title.width.saturating_sub(rw), bar);
        if rw > 0 && rw < a.title.width {
            put(buf, a.title.x + a.title.width - rw, a.title.y, right, rw, bar.fg(Color::Yellow));
        }
        let crumb = format!(" {}", self.tree.breadcrumb(self.menu));
        put(buf, a.crumb.x, a.crumb.y, &crumb, a.crumb.width, Style::default().add_modifier(Modifier::BOLD));
    }

    fn render_list(&self, body: Rect, buf: &mut Buffer) {
        let title =
            if self.menu == TOP { self.kc.mainmenu_text().to_string() } else { self.tree.title(self.menu) };
        let lh = body.height.saturating_sub(2) as usize;
        let mut block = Block::bordered().title(format!(" {} ", title));
        if self.scroll > 0 {
            block = block.title(Line::from(" ^ ").right_aligned());
        }
        if !self.rows.is_empty() {
            let more = if self.scroll + lh < self.rows.len() { "v " } else { "" };
            block = block.title_bottom(
                Line::from(format!(" {}/{} {}", self.sel + 1, self.rows.len(), more)).right_aligned(),
            );
        }
        let mut flags = Vec::new();
        if self.show_all {
            flags.push("show-all");
        }
        if self.show_name {
            flags.push("names");
        }
        if !flags.is_empty() {
            block = block.title_bottom(Line::from(format!(" {} ", flags.join(", "))).left_aligned());
        }
        let inner = block.inner(body);
        block.render(body, buf);
        if self.rows.is_empty() {
            put(
                buf,
                inner.x + 1,
                inner.y,
                "(no visible entries; a: show all)",
                inner.width.saturating_sub(1),
                Style::default().fg(Color::DarkGray),
            );
            return;
        }
        for (k, row) in self.rows.iter().enumerate().skip(self.scroll).take(inner.height as usize) {
            let y = inner.y + (k - self.scroll) as u16;
            let mut style = Style::default();
            if !row.visible {
                style = style.fg(Color::DarkGray);
            }
            if k == self.sel {
                style = style.add_modifier(Modifier::REVERSED);
                buf.set_style(Rect::new(inner.x, y, inner.width, 1), style);
            }
            put(buf, inner.x + 1, y, &row.text, inner.width.saturating_sub(1), style);
        }
    }

    pub(crate) fn result_text(&self, nodes: &[kconfig::MenuNode<'_>], i: usize) -> String {
        let t = &self.tree;
        let left = match t.kind[i] {
            NodeKind::Symbol => match nodes[i].symbol() {
                Some(s) => format!("{} [={}]", s.name(), s.str_value()),
                None => "symbol".into(),
            },
            NodeKind::Choice => match &t.name[i] {
                Some(n) => format!("choice {}", n),
                None => "choice".into(),
            },
            NodeKind::Menu => "menu".into(),
            NodeKind::Comment => "comment".into(),
        };
        let prompt = t.prompt[i].as_ref().map(|p| format!(" \"{}\"", p)).unwrap_or_default();
        let hidden = if t.reachable(nodes, i) { "" } else { "  (invisible)" };
        format!("{}{}  in {}{}", left, prompt, t.breadcrumb(t.parent_menu(i)), hidden)
    }

    fn render_search(&self, s: &Search, body: Rect, buf: &mut Buffer) {
        let block = Block::bordered().title(" Search symbols and prompts ");
        let inner = block.inner(body);
        block.render(body, buf);
        if inner.height < 4 {
            return;
        }
        put(buf, inner.x + 1, inner.y, "/", 1, Style::default().add_modifier(Modifier::BOLD));
        draw_input(buf, inner.x + 3, inner.y, inner.width.saturating_sub(4), &s.input);
        let count = if s.input.chars.iter().all(|c| c.is_whitespace()) {
            "Type words of a symbol name or prompt (case-insensitive; all words must match)".to_string()
        } else if s.results.is_empty() {
            "No matches".to_string()
        } else {
            format!("{} match{}", s.results.len(), if s.results.len() == 1 { "" } else { "es" })
        };
        put(
            buf,
            inner.x + 1,
            inner.y + 1,
            &count,
            inner.width.saturating_sub(1),
            Style::default().fg(Color::Cyan),
        );
        let nodes = snapshot(&self.kc);
        let lh = inner.height.saturating_sub(3) as usize;
        for (k, &i) in s.results.iter().enumerate().skip(s.scroll).take(lh) {
            let y = inner.y + 2 + (k - s.scroll) as u16;
            let mut style = Style::default();
            if !self.tree.reachable(&nodes, i) {
                style = style.fg(Color::DarkGray);
            }
            if k == s.sel {
                style = style.add_modifier(Modifier::REVERSED);
                buf.set_style(Rect::new(inner.x, y, inner.width, 1), style);
            }
            put(buf, inner.x + 1, y, &self.result_text(&nodes, i), inner.width.saturating_sub(1), style);
        }
        if let Some(&i) = s.results.get(s.sel) {
            let loc = nodes[i].location();
            put(
                buf,
                inner.x + 1,
                inner.y + inner.height - 1,
                &format!("Defined at {}:{}", loc.file, loc.line),
                inner.width.saturating_sub(1),
                Style::default().fg(Color::Cyan),
            );
        }
    }

    fn render_text(&self, t: &TextView, body: Rect, buf: &mut Buffer) {
        let lines = wrap_lines(&t.lines, self.width.max(body.width));
        let mut block = Block::bordered().title(format!(" {} ", t.title));
        let inner_h = body.height.saturating_sub(2) as usize;
        let scroll = t.scroll.min(lines.len().saturating_sub(inner_h));
        if lines.len() > inner_h {
            let last = (scroll + inner_h).min(lines.len());
            block = block.title_bottom(
                Line::from(format!(" {}-{}/{} ", scroll + 1, last, lines.len())).right_aligned(),
            );
        }
        let inner = block.inner(body);
        block.render(body, buf);
        for (k, (l, tone)) in lines.iter().skip(scroll).take(inner.height as usize).enumerate() {
            let style = match tone {
                Tone::Normal => Style::default(),
                Tone::Heading => Style::default().fg(Color::Cyan).add_modifier(Modifier::BOLD),
                Tone::Warn => Style::default().fg(Color::Yellow),
            };
            put(buf, inner.x + 1, inner.y + k as u16, l, inner.width.saturating_sub(1), style);
        }
    }

    fn render_edit(&self, e: &Edit, body: Rect, buf: &mut Buffer) {
        let want = (e.title.chars().count() as u16 + 8).max(60);
        let width = want.min(body.width.saturating_sub(4));
        let err = e.error.as_deref().map(|m| wrap_line(m, width.saturating_sub(4).max(10) as usize));
        let err_lines = err.as_ref().map_or(1, |l| l.len().min(4)) as u16;
        let r = popup(body, width, 5 + err_lines);
        Clear.render(r, buf);
        let block = Block::bordered().title(format!(" {} ", e.title));
        let inner = block.inner(r);
        block.render(r, buf);
        if inner.height < 3 {
            return;
        }
        let w = inner.width.saturating_sub(1);
        if let Some(info) = &e.info {
            put(buf, inner.x + 1, inner.y, info, w, Style::default().fg(Color::Cyan));
        }
        put(buf, inner.x + 1, inner.y + 1, ">", 1, Style::default().add_modifier(Modifier::BOLD));
        draw_input(buf, inner.x + 3, inner.y + 1, inner.width.saturating_sub(4), &e.input);
        let bad = Style::default().fg(Color::Red).add_modifier(Modifier::BOLD);
        for (k, l) in err.iter().flatten().take(err_lines as usize).enumerate() {
            put(buf, inner.x + 1, inner.y + 2 + k as u16, l, w, bad);
        }
        let hint_y = inner.y + 2 + err_lines;
        if hint_y < inner.y + inner.height {
            put(
                buf,
                inner.x + 1,
                hint_y,
                "Enter: accept   Esc: cancel",
                w,
                Style::default().fg(Color::DarkGray),
            );
        }
    }

    fn render_quit(&self, error: Option<&str>, body: Rect, buf: &mut Buffer) {
        let width = 76.min(body.width.saturating_sub(4));
        let err = error.map(|m| wrap_line(m, width.saturating_sub(4).max(10) as usize)).unwrap_or_default();
        let err_lines = err.len().min(4) as u16;
        let r = popup(body, width, 5 + err_lines);
        Clear.render(r, buf);
        let block = Block::bordered().title(" Quit ");
        let inner = block.inner(r);
        block.render(r, buf);
        let w = inner.width.saturating_sub(1);
        put(
            buf,
            inner.x + 1,
            inner.y,
            "Save changes? (y/n/c)",
            w,
            Style::default().add_modifier(Modifier::BOLD),
        );
        let target = format!("y: save to '{}' and quit", self.config_path.display());
        put(buf, inner.x + 1, inner.y + 1, &target, w, Style::default());
        put(buf, inner.x + 1, inner.y + 2, "n: quit without saving   c: cancel", w, Style::default());
        let bad = Style::default().fg(Color::Red).add_modifier(Modifier::BOLD);
        for (k, l) in err.iter().take(err_lines as usize).enumerate() {
            put(buf, inner.x + 1, inner.y + 3 + k as u16, l, w, bad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_indent() {
        let w = wrap_line("  - aaaa bbbb cccc dddd", 12);
        assert_eq!(w, vec!["  - aaaa", "      bbbb", "      cccc", "      dddd"]);
        assert_eq!(wrap_line("short", 12), vec!["short"]);
        // A word longer than the width is cut.
        assert_eq!(wrap_line("abcdefghijklmnop", 10), vec!["abcdefghij", "    klmnop"]);
    }
}
