//! `kvroute up`'s status block: the model, each agent and the gateway in a few lines.
//!
//! On a terminal the block is redrawn in place (the cursor moves back over it; lines are cut to
//! the terminal's width so none wraps), with progress bars for the model download or check, for
//! the agents loading, and for each agent's KV blocks. Anywhere else (a pipe, a file, `--verbose`
//! with logs interleaved) it prints a plain line only when something's state changes, with no
//! escape codes and no bars, so a log of it reads top to bottom.

use std::io::Write;

/// Where an agent process is in its life, as `kvroute up` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Spawned; its HTTP port does not answer yet.
    Starting,
    /// `/health` answers, `/ready` not yet: the model is loading.
    Loading,
    /// `/ready` answered.
    Ready,
    /// The process ended (its exit status).
    Exited(String),
}

impl Phase {
    fn word(&self) -> &str {
        match self {
            Phase::Starting => "starting",
            Phase::Loading => "loading",
            Phase::Ready => "ready",
            Phase::Exited(_) => "exited",
        }
    }
}

/// An agent's KV blocks and requests, from the gateway's capacity stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kv {
    pub total: u64,
    pub used: u64,
    pub cached: u64,
    pub running: u32,
    pub waiting: u32,
}

/// One agent's line.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLine {
    pub id: String,
    pub http: String,
    pub phase: Phase,
    /// Known once the gateway has a capacity report from it.
    pub kv: Option<Kv>,
}

/// The model fetch or check (`--model default` only).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelLine {
    /// The fetch's current stage ("downloading ...", "verifying cached model").
    pub stage: String,
    pub done: u64,
    pub total: Option<u64>,
    /// The model file, once ready.
    pub path: Option<String>,
}

/// What the block shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Status {
    pub model: Option<ModelLine>,
    pub agents: Vec<AgentLine>,
    /// The gateway's URL once it serves, and its admission queue (depth, bound).
    pub gateway: Option<(String, usize, usize)>,
}

/// A bar of `width` cells filled to `frac` (clamped to 0..=1): `[=====>    ]`.
pub fn bar(frac: f64, width: usize) -> String {
    let frac = if frac.is_finite() {
        frac.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let filled = (frac * width as f64).round() as usize;
    let mut s = String::with_capacity(width + 2);
    s.push('[');
    for i in 0..width {
        s.push(if i < filled {
            '='
        } else if i == filled && filled > 0 {
            '>'
        } else {
            ' '
        });
    }
    s.push(']');
    s
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// One line of the block: what a terminal shows, and the plain text a log gets when it changes
/// (state only: no bars or counters that move every second).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub key: String,
    pub terminal: String,
    pub plain: String,
}

/// The block's lines for `s`.
pub fn lines(s: &Status) -> Vec<Line> {
    let mut out = Vec::new();
    if let Some(m) = &s.model {
        let (terminal, plain) = match &m.path {
            Some(p) => (format!("model    ready  {p}"), format!("model: ready {p}")),
            None => {
                let amount = match m.total {
                    Some(t) if t > 0 => format!(
                        "{} {}/{}",
                        bar(m.done as f64 / t as f64, 20),
                        mib(m.done),
                        mib(t)
                    ),
                    _ => mib(m.done),
                };
                (
                    format!("model    {}  {amount}", m.stage),
                    format!("model: {}", m.stage),
                )
            }
        };
        out.push(Line {
            key: "model".into(),
            terminal,
            plain,
        });
    }
    if !s.agents.is_empty() {
        let ready = s.agents.iter().filter(|a| a.phase == Phase::Ready).count();
        let n = s.agents.len();
        out.push(Line {
            key: "agents".into(),
            terminal: format!(
                "agents   {ready}/{n} ready {}",
                bar(ready as f64 / n as f64, 30)
            ),
            plain: format!("agents: {ready}/{n} ready"),
        });
    }
    for a in &s.agents {
        let state = match &a.phase {
            Phase::Exited(status) => format!("exited ({status})"),
            p => p.word().to_string(),
        };
        // The counters first: a narrow terminal cuts the end of the line.
        let detail = match (&a.phase, a.kv) {
            (Phase::Ready, Some(kv)) if kv.total > 0 => format!(
                "KV {}/{} used {} {} cached, {} running, {} waiting  ",
                kv.used,
                kv.total,
                bar(kv.used as f64 / kv.total as f64, 12),
                kv.cached,
                kv.running,
                kv.waiting
            ),
            _ => String::new(),
        };
        out.push(Line {
            key: format!("agent {}", a.id),
            terminal: format!("{:<8} {state:<8} {detail}http://{}", a.id, a.http),
            plain: format!("{}: {state} http://{}", a.id, a.http),
        });
    }
    if let Some((url, depth, bound)) = &s.gateway {
        out.push(Line {
            key: "gateway".into(),
            terminal: format!(
                "gateway  {url}/v1  dashboard {url}/dashboard  queue {depth}/{bound}"
            ),
            plain: format!("gateway: {url}/v1"),
        });
    }
    out
}

/// Cuts `line` to `width` characters (a wrapped line would break the in-place redraw).
fn fit(line: &str, width: usize) -> &str {
    match line.char_indices().nth(width) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// Draws the block on a writer: in place on a terminal, changed lines only elsewhere.
pub struct Screen<W: Write> {
    out: W,
    terminal: bool,
    width: usize,
    /// Reads the terminal's width again before each draw (it may have been resized).
    width_of: Option<fn() -> Option<usize>>,
    /// Lines of the block now on the terminal (below the cursor's line start after a draw).
    drawn: usize,
    last: Vec<Line>,
    /// Plain text last printed per key (plain mode).
    printed: std::collections::HashMap<String, String>,
}

impl<W: Write> Screen<W> {
    /// `terminal`: redraw in place; `width`: the terminal's columns.
    pub fn new(out: W, terminal: bool, width: usize) -> Self {
        Self {
            out,
            terminal,
            width: width.max(20),
            width_of: None,
            drawn: 0,
            last: Vec::new(),
            printed: Default::default(),
        }
    }

    /// Follows the terminal's width as it changes, read with `f` before each draw.
    pub fn follow_width(mut self, f: fn() -> Option<usize>) -> Self {
        self.width_of = Some(f);
        self
    }

    /// Shows `s` (write errors are ignored: a closed stdout must not stop `kvroute up`).
    pub fn draw(&mut self, s: &Status) {
        let lines = lines(s);
        if self.terminal {
            if lines == self.last && self.drawn > 0 {
                return;
            }
            let _ = self.erase();
            self.last = lines;
            let _ = self.paint();
        } else {
            for l in &lines {
                if self.printed.get(&l.key) != Some(&l.plain) {
                    let _ = writeln!(self.out, "{}", l.plain);
                    self.printed.insert(l.key.clone(), l.plain.clone());
                }
            }
            self.last = lines;
        }
        let _ = self.out.flush();
    }

    /// Prints `text` above the block (which stays the last lines of a terminal).
    pub fn say(&mut self, text: &str) {
        if self.terminal {
            let _ = self.erase();
            let _ = writeln!(self.out, "{text}");
            let _ = self.paint();
        } else {
            let _ = writeln!(self.out, "{text}");
        }
        let _ = self.out.flush();
    }

    /// Moves back to the block's first line and clears it and everything below.
    fn erase(&mut self) -> std::io::Result<()> {
        if self.drawn > 0 {
            write!(self.out, "\x1b[{}F", self.drawn)?;
        }
        write!(self.out, "\r\x1b[J")?;
        self.drawn = 0;
        Ok(())
    }

    fn paint(&mut self) -> std::io::Result<()> {
        if let Some(w) = self.width_of.and_then(|f| f()) {
            self.width = w.max(20);
        }
        for l in &self.last {
            writeln!(self.out, "\x1b[2K{}", fit(&l.terminal, self.width - 1))?;
        }
        self.drawn = self.last.len();
        Ok(())
    }

    /// The writer (tests read what was drawn).
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Columns of the terminal on stdout, if it is one.
pub fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; fd 1 may be anything,
    // and a non-terminal makes the call fail, which we check.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            model: None,
            agents: vec![
                AgentLine {
                    id: "agent-1".into(),
                    http: "127.0.0.1:1".into(),
                    phase: Phase::Ready,
                    kv: Some(Kv {
                        total: 100,
                        used: 25,
                        cached: 5,
                        running: 2,
                        waiting: 1,
                    }),
                },
                AgentLine {
                    id: "agent-2".into(),
                    http: "127.0.0.1:2".into(),
                    phase: Phase::Loading,
                    kv: None,
                },
            ],
            gateway: None,
        }
    }

    #[test]
    fn bars_fill_in_proportion_and_clamp_odd_fractions() {
        assert_eq!(bar(0.0, 4), "[    ]");
        assert_eq!(bar(0.5, 4), "[==> ]");
        assert_eq!(bar(1.0, 4), "[====]");
        assert_eq!(bar(7.0, 4), "[====]");
        assert_eq!(bar(-1.0, 4), "[    ]");
        assert_eq!(bar(f64::NAN, 4), "[    ]");
        assert_eq!(bar(0.5, 0), "[]");
    }

    #[test]
    fn the_block_shows_load_progress_and_each_ready_agents_kv_blocks() {
        let l = lines(&status());
        assert_eq!(l[0].plain, "agents: 1/2 ready");
        assert!(
            l[0].terminal.contains("[===============>"),
            "{}",
            l[0].terminal
        );
        assert!(
            l[1].terminal.contains("KV 25/100 used [===> ")
                && l[1].terminal.contains("] 5 cached, 2 running, 1 waiting"),
            "{}",
            l[1].terminal
        );
        assert_eq!(l[2].plain, "agent-2: loading http://127.0.0.1:2");
        assert!(!l[2].terminal.contains("KV"), "{}", l[2].terminal);
    }

    #[test]
    fn model_progress_shows_bytes_and_then_the_file() {
        let mut s = Status {
            model: Some(ModelLine {
                stage: "verifying cached model".into(),
                done: 1 << 20,
                total: Some(4 << 20),
                path: None,
            }),
            ..Status::default()
        };
        let l = lines(&s);
        assert!(
            l[0].terminal.contains("1.0 MiB/4.0 MiB") && l[0].terminal.contains("[=====> "),
            "{}",
            l[0].terminal
        );
        assert_eq!(l[0].plain, "model: verifying cached model");
        // Unknown total (a download that does not say): bytes only, no bar.
        s.model = Some(ModelLine {
            stage: "downloading".into(),
            done: 3 << 20,
            total: None,
            path: None,
        });
        assert_eq!(lines(&s)[0].terminal, "model    downloading  3.0 MiB");
        s.model = Some(ModelLine {
            path: Some("/m.gguf".into()),
            ..ModelLine::default()
        });
        assert_eq!(lines(&s)[0].plain, "model: ready /m.gguf");
    }

    #[test]
    fn a_terminal_gets_the_block_redrawn_in_place_and_cut_to_its_width() {
        let mut screen = Screen::new(Vec::new(), true, 30);
        let mut s = status();
        screen.draw(&s);
        s.agents[1].phase = Phase::Ready;
        screen.draw(&s);
        screen.say("READY http://x");
        let out = String::from_utf8(screen.into_inner()).unwrap_or_default();
        // The second draw moves back over the 3 lines of the first one.
        assert!(out.contains("\x1b[3F\r\x1b[J"), "{out:?}");
        // The line said goes above the block, which is drawn again below it.
        let said = out.rfind("READY http://x").unwrap_or(0);
        assert!(out[said..].contains("2/2 ready"), "{out:?}");
        for line in out.split('\n') {
            let visible = line.rsplit("\x1b[2K").next().unwrap_or("");
            assert!(visible.chars().count() <= 29, "{visible:?} wider than 29");
        }
    }

    #[test]
    fn a_resized_terminal_gets_lines_cut_to_its_new_width() {
        fn narrow() -> Option<usize> {
            Some(25)
        }
        let mut screen = Screen::new(Vec::new(), true, 120).follow_width(narrow);
        screen.draw(&status());
        let out = String::from_utf8(screen.into_inner()).unwrap_or_default();
        for line in out.split('\n') {
            let visible = line.rsplit("\x1b[2K").next().unwrap_or("");
            assert!(visible.chars().count() <= 24, "{visible:?} wider than 24");
        }
    }

    #[test]
    fn plain_output_prints_a_line_per_state_change_without_escape_codes() {
        let mut screen = Screen::new(Vec::new(), false, 80);
        let mut s = status();
        screen.draw(&s);
        // Counters move: nothing new is printed.
        if let Some(kv) = s.agents[0].kv.as_mut() {
            kv.used = 90;
            kv.running = 7;
        }
        screen.draw(&s);
        s.agents[1].phase = Phase::Exited("signal: 9".into());
        screen.draw(&s);
        let out = String::from_utf8(screen.into_inner()).unwrap_or_default();
        assert!(!out.contains('\x1b'), "{out:?}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "agents: 1/2 ready",
                "agent-1: ready http://127.0.0.1:1",
                "agent-2: loading http://127.0.0.1:2",
                "agent-2: exited (signal: 9) http://127.0.0.1:2",
            ]
        );
    }
}
