//! `stacyvm tui`: a terminal view of the server's sandboxes — live state,
//! an exec console, the log tail, destroy and extend — for operators who
//! look before they type.
//!
//! The screen is drawn with ratatui on the alternate screen; the terminal
//! is restored on every way out (quit, an error, a panic). The list is
//! fetched again every `--refresh` and after each action; a request that
//! fails shows its error on the status line and the view stays.

use std::io::Stdout;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::{Frame, Terminal};
use reqwest::Method;
use stacyvm_api::{ExecRequest, ExecResponse, ExtendRequest, Sandbox};

use crate::cli::Conn;

/// What the lower pane shows.
enum Mode {
    List,
    /// Typing a command for the selected sandbox.
    Exec {
        input: String,
    },
    /// A command's output (or the log tail): a title and lines.
    Output {
        title: String,
        lines: Vec<String>,
    },
    /// Destroy the selected sandbox? (y/n)
    Confirm,
    Help,
}

struct App {
    client: stacyvm_client::Client,
    url: String,
    sandboxes: Vec<Sandbox>,
    table: TableState,
    mode: Mode,
    status: String,
    scroll: u16,
}

const HELP: &[(&str, &str)] = &[
    ("↑ ↓ / j k", "select a sandbox"),
    ("x or Enter", "run a command in it (exec console)"),
    ("l", "the tail of its log"),
    ("e", "extend its time to live by 10 minutes"),
    ("d", "destroy it (asks first)"),
    ("r", "refresh now"),
    ("PgUp PgDn", "scroll the output"),
    ("Esc", "back to the list"),
    ("?", "this help"),
    ("q", "quit"),
];

fn remaining(s: &Sandbox) -> String {
    let left = s.expires_at - chrono::Utc::now();
    let secs = left.num_seconds();
    if secs <= 0 {
        "expired".into()
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

impl App {
    fn selected(&self) -> Option<&Sandbox> {
        self.table.selected().and_then(|i| self.sandboxes.get(i))
    }

    async fn refresh(&mut self) {
        match self.client.list().await {
            Ok(mut list) => {
                list.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
                let keep = self.selected().map(|s| s.id.clone());
                self.sandboxes = list;
                let idx = keep
                    .and_then(|id| self.sandboxes.iter().position(|s| s.id == id))
                    .or(if self.sandboxes.is_empty() {
                        None
                    } else {
                        Some(0)
                    });
                self.table
                    .select(idx.map(|i| i.min(self.sandboxes.len().saturating_sub(1))));
            }
            Err(e) => self.status = format!("refresh failed: {e}"),
        }
    }

    fn move_by(&mut self, delta: isize) {
        if self.sandboxes.is_empty() {
            return;
        }
        let cur = self.table.selected().unwrap_or(0) as isize;
        let next = (cur + delta).clamp(0, self.sandboxes.len() as isize - 1);
        self.table.select(Some(next as usize));
    }

    async fn run_exec(&mut self, command: String) {
        let Some(id) = self.selected().map(|s| s.id.clone()) else {
            return;
        };
        let req = ExecRequest {
            command: command.clone(),
            mode: "shell".into(),
            timeout: "60s".into(),
            ..ExecRequest::default()
        };
        self.status = format!("running `{command}` in {id}…");
        let res: Result<ExecResponse, _> = self
            .client
            .send_json(Method::POST, &format!("/sandboxes/{id}/exec"), &req)
            .await;
        let (title, lines) = match res {
            Ok(r) => {
                let mut lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
                lines.extend(r.stderr.lines().map(|l| format!("stderr: {l}")));
                lines.push(format!("[exit {} after {}]", r.exit_code, r.duration));
                (format!("{id} $ {command}"), lines)
            }
            Err(e) => (format!("{id} $ {command}"), vec![format!("error: {e}")]),
        };
        self.status.clear();
        self.scroll = 0;
        self.mode = Mode::Output { title, lines };
    }

    async fn show_logs(&mut self) {
        let Some(id) = self.selected().map(|s| s.id.clone()) else {
            return;
        };
        let lines = match self.client.logs(&id, 200).await {
            Ok(l) if l.is_empty() => vec!["(no log lines)".to_string()],
            Ok(l) => l,
            Err(e) => vec![format!("error: {e}")],
        };
        self.scroll = lines.len().saturating_sub(20) as u16;
        self.mode = Mode::Output {
            title: format!("{id}: log"),
            lines,
        };
    }

    async fn extend(&mut self) {
        let Some((id, expires)) = self.selected().map(|s| (s.id.clone(), s.expires_at)) else {
            return;
        };
        // The API sets the time left; ten minutes more than now.
        let left = (expires - chrono::Utc::now()).num_seconds().max(0);
        let res: Result<Sandbox, _> = self
            .client
            .send_json(
                Method::POST,
                &format!("/sandboxes/{id}/extend"),
                &ExtendRequest {
                    ttl: format!("{}s", left + 600),
                },
            )
            .await;
        self.status = match res {
            Ok(s) => format!("{id} extended: {} left", remaining(&s)),
            Err(e) => format!("extend {id} failed: {e}"),
        };
        self.refresh().await;
    }

    async fn destroy(&mut self) {
        let Some(id) = self.selected().map(|s| s.id.clone()) else {
            return;
        };
        self.status = match self.client.destroy(&id).await {
            Ok(()) => format!("{id} destroyed"),
            Err(e) => format!("destroy {id} failed: {e}"),
        };
        self.mode = Mode::List;
        self.refresh().await;
    }

    /// Handles one key; false = quit.
    async fn key(&mut self, k: KeyEvent) -> bool {
        if k.kind != KeyEventKind::Press {
            return true;
        }
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return false;
        }
        match &mut self.mode {
            Mode::Exec { input } => match k.code {
                KeyCode::Esc => self.mode = Mode::List,
                KeyCode::Enter => {
                    let cmd = input.trim().to_string();
                    if cmd.is_empty() {
                        self.mode = Mode::List;
                    } else {
                        self.run_exec(cmd).await;
                    }
                }
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Char(c) => input.push(c),
                _ => {}
            },
            Mode::Confirm => match k.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => self.destroy().await,
                _ => {
                    self.status = "destroy cancelled".into();
                    self.mode = Mode::List;
                }
            },
            Mode::Output { .. } | Mode::Help => match k.code {
                KeyCode::Char('q') => return false,
                KeyCode::PageDown | KeyCode::Char(' ') => {
                    self.scroll = self.scroll.saturating_add(10)
                }
                KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(10),
                KeyCode::Down | KeyCode::Char('j') => self.scroll = self.scroll.saturating_add(1),
                KeyCode::Up | KeyCode::Char('k') => self.scroll = self.scroll.saturating_sub(1),
                _ => self.mode = Mode::List,
            },
            Mode::List => match k.code {
                KeyCode::Char('q') | KeyCode::Esc => return false,
                KeyCode::Down | KeyCode::Char('j') => self.move_by(1),
                KeyCode::Up | KeyCode::Char('k') => self.move_by(-1),
                KeyCode::Char('r') => {
                    self.refresh().await;
                    self.status = "refreshed".into();
                }
                KeyCode::Char('?') | KeyCode::Char('h') => self.mode = Mode::Help,
                KeyCode::Char('x') | KeyCode::Enter if self.selected().is_some() => {
                    self.mode = Mode::Exec {
                        input: String::new(),
                    }
                }
                KeyCode::Char('l') => self.show_logs().await,
                KeyCode::Char('e') => self.extend().await,
                KeyCode::Char('d') if self.selected().is_some() => self.mode = Mode::Confirm,
                _ => {}
            },
        }
        true
    }

    fn draw(&mut self, f: &mut Frame<'_>) {
        let [head, body, pane, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(5),
            Constraint::Length(if matches!(self.mode, Mode::List) {
                0
            } else {
                14
            }),
            Constraint::Length(1),
        ])
        .areas(f.area());
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(" StacyVM ", Style::new().bold().reversed()),
                Span::raw(format!(
                    "  {}  {} sandboxes  ",
                    self.url,
                    self.sandboxes.len()
                )),
                Span::styled("? help  q quit", Style::new().dim()),
            ])),
            head,
        );
        let rows = self.sandboxes.iter().map(|s| {
            Row::new(vec![
                Cell::from(s.id.clone()),
                Cell::from(s.state.clone()),
                Cell::from(s.provider.clone()),
                Cell::from(s.image.clone()),
                Cell::from(if s.owner_id.is_empty() {
                    "-".to_string()
                } else {
                    s.owner_id.clone()
                }),
                Cell::from(remaining(s)),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(12),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Min(16),
                Constraint::Length(14),
                Constraint::Length(9),
            ],
        )
        .header(
            Row::new(["ID", "STATE", "PROVIDER", "IMAGE", "OWNER", "TTL LEFT"])
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::ALL).title(" sandboxes "))
        .row_highlight_style(Style::new().reversed())
        .highlight_symbol("> ");
        f.render_stateful_widget(table, body, &mut self.table);
        if self.sandboxes.is_empty() {
            let inner = Rect {
                x: body.x + 2,
                y: body.y + 2,
                width: body.width.saturating_sub(4),
                height: 1,
            };
            f.render_widget(
                Paragraph::new("no sandboxes (spawn one: stacyvm spawn)").dim(),
                inner,
            );
        }
        match &self.mode {
            Mode::List => {}
            Mode::Exec { input } => {
                let id = self.selected().map(|s| s.id.as_str()).unwrap_or("-");
                f.render_widget(
                    Paragraph::new(format!("$ {input}█")).block(
                        Block::default()
                            .borders(Borders::ALL)
                            .title(format!(" exec in {id} — Enter runs (sh -c), Esc cancels ")),
                    ),
                    pane,
                );
            }
            Mode::Output { title, lines } => {
                let text: Vec<Line<'_>> = lines.iter().map(|l| Line::from(l.as_str())).collect();
                f.render_widget(
                    Paragraph::new(text)
                        .wrap(Wrap { trim: false })
                        .scroll((self.scroll, 0))
                        .block(
                            Block::default()
                                .borders(Borders::ALL)
                                .title(format!(" {title} — Esc back, PgUp/PgDn scroll ")),
                        ),
                    pane,
                );
            }
            Mode::Confirm => {
                let id = self.selected().map(|s| s.id.as_str()).unwrap_or("-");
                f.render_widget(
                    Paragraph::new(format!("Destroy {id} and everything in it? (y/n)"))
                        .block(Block::default().borders(Borders::ALL).title(" destroy ")),
                    pane,
                );
            }
            Mode::Help => {
                let area = f.area();
                let w = 60.min(area.width);
                let h = (HELP.len() as u16 + 2).min(area.height);
                let r = Rect {
                    x: area.x + (area.width - w) / 2,
                    y: area.y + (area.height - h) / 2,
                    width: w,
                    height: h,
                };
                let lines: Vec<Line<'_>> = HELP
                    .iter()
                    .map(|(k, what)| {
                        Line::from(vec![
                            Span::styled(format!("{k:<12}"), Style::new().bold()),
                            Span::raw(*what),
                        ])
                    })
                    .collect();
                f.render_widget(Clear, r);
                f.render_widget(
                    Paragraph::new(lines)
                        .block(Block::default().borders(Borders::ALL).title(" keys ")),
                    r,
                );
            }
        }
        f.render_widget(Paragraph::new(self.status.clone()).dim(), foot);
    }
}

/// Restores the terminal when dropped (errors and panics included).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::LeaveAlternateScreen,
            crossterm::cursor::Show
        );
    }
}

pub async fn run(conn: &Conn, refresh: Duration) -> Result<std::process::ExitCode> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("stacyvm tui needs a terminal (use `stacyvm list` in scripts)");
    }
    let client = stacyvm_client::Client::new(&conn.url, conn.api_key.clone())?;
    // One clear line when the server is not there, before the screen goes.
    client.list().await?;
    let mut app = App {
        client,
        url: conn.url.clone(),
        sandboxes: Vec::new(),
        table: TableState::default(),
        mode: Mode::List,
        status: String::new(),
        scroll: 0,
    };
    app.refresh().await;
    crossterm::terminal::enable_raw_mode().context("raw mode")?;
    let _restore = Restore;
    crossterm::execute!(std::io::stdout(), crossterm::terminal::EnterAlternateScreen)?;
    let mut term: Terminal<CrosstermBackend<Stdout>> =
        Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut fetched = Instant::now();
    loop {
        term.draw(|f| app.draw(f))?;
        // Keys arrive on a blocking read; poll in short steps so the list
        // refreshes on time.
        let ev = tokio::task::spawn_blocking(|| -> std::io::Result<Option<Event>> {
            if event::poll(Duration::from_millis(200))? {
                Ok(Some(event::read()?))
            } else {
                Ok(None)
            }
        })
        .await??;
        if let Some(Event::Key(k)) = ev {
            if !app.key(k).await {
                break;
            }
        }
        if fetched.elapsed() >= refresh && matches!(app.mode, Mode::List) {
            app.refresh().await;
            fetched = Instant::now();
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
