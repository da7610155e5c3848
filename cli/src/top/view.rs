//! `vitals top`'s screen: what is selected and sorted (`App`), the keys
//! that change it, and the drawing of one frame with ratatui widgets.
//! No terminal and no network here: tests draw into a `TestBackend`.

use std::time::Duration;

use ratatui::Frame;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, List, ListItem, Paragraph, Row, Table, TableState};

use super::model::{AlertView, Fleet, NodeView, SortKey, sort};
use crate::commands::ago;

/// The keys, as the help line says them.
pub const HELP: &str = "↑/↓ or j/k: select node   s: sort (name → GPU util → alerts)   q: quit";

/// What a key asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

/// One refresh's outcome, as the fetcher hands it over.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// `None`: nothing could be read (the node list failed).
    pub fleet: Option<Fleet>,
    /// Queries that failed, each once.
    pub errors: Vec<String>,
    pub at_ms: i64,
}

/// The screen's state.
#[derive(Debug)]
pub struct App {
    pub fleet: Fleet,
    pub sort: SortKey,
    /// The selected node, by name: it stays selected when the order changes.
    pub selected: Option<String>,
    pub interval: Duration,
    pub refreshed_ms: Option<i64>,
    pub errors: Vec<String>,
}

impl App {
    pub fn new(interval: Duration) -> App {
        App {
            fleet: Fleet::default(),
            sort: SortKey::default(),
            selected: None,
            interval,
            refreshed_ms: None,
            errors: Vec::new(),
        }
    }

    /// Takes a refresh: the new fleet (a failed one keeps the last), sorted.
    pub fn refreshed(&mut self, r: Refresh) {
        if let Some(f) = r.fleet {
            self.fleet = f;
            sort(&mut self.fleet.nodes, self.sort);
            self.refreshed_ms = Some(r.at_ms);
        }
        self.errors = r.errors;
        if self.index().is_none() {
            self.selected = self.fleet.nodes.first().map(|n| n.name.clone());
        }
    }

    /// The selected node's row.
    pub fn index(&self) -> Option<usize> {
        let name = self.selected.as_deref()?;
        self.fleet.nodes.iter().position(|n| n.name == name)
    }

    fn select(&mut self, i: usize) {
        self.selected = self.fleet.nodes.get(i).map(|n| n.name.clone());
    }

    pub fn key(&mut self, k: KeyEvent) -> Action {
        let last = self.fleet.nodes.len().saturating_sub(1);
        let i = self.index().unwrap_or(0);
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            // Raw mode turns Ctrl-C into a key.
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit;
            }
            KeyCode::Down | KeyCode::Char('j') => self.select((i + 1).min(last)),
            KeyCode::Up | KeyCode::Char('k') => self.select(i.saturating_sub(1)),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(last),
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                sort(&mut self.fleet.nodes, self.sort);
            }
            _ => {}
        }
        Action::Continue
    }
}

/// A bar of `width` cells, `fraction` of them full (clamped to [0, 1]).
pub fn bar(fraction: f64, width: usize) -> String {
    let f = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let full = (f * width as f64).round() as usize;
    format!("{}{}", "█".repeat(full), "░".repeat(width - full))
}

/// 1234567 → "1.2 MB/s" (decimal units, as link speeds are given).
pub fn rate_text(bytes_per_sec: f64) -> String {
    let units = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut v = bytes_per_sec;
    let mut u = 0;
    while v.abs() >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

fn clock(ms: i64) -> String {
    let text = crate::commands::fmt_ms(ms);
    // RFC 3339 "2026-11-30T12:00:01Z" → "12:00:01".
    text.get(11..19).map(str::to_string).unwrap_or(text)
}

fn severity_style(sev: &str) -> Style {
    match sev {
        "critical" | "error" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "warning" => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

/// Draws one frame.
pub fn render(app: &App, f: &mut Frame) {
    let [head, body, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header(app)), head);
    f.render_widget(
        Paragraph::new(Line::from(HELP).style(Style::new().fg(Color::DarkGray))),
        help,
    );
    let [left, right] =
        Layout::horizontal([Constraint::Length(54), Constraint::Min(0)]).areas(body);
    render_nodes(app, f, left);
    match app.index().and_then(|i| app.fleet.nodes.get(i)) {
        Some(n) => render_node(n, f, right),
        None => f.render_widget(
            Paragraph::new(if app.refreshed_ms.is_none() {
                "waiting for the collector…"
            } else {
                "no nodes have reported yet"
            })
            .block(Block::bordered()),
            right,
        ),
    }
}

fn header(app: &App) -> Line<'static> {
    let firing = app.fleet.firing();
    let mut spans = vec![
        Span::styled("vitals top", bold()),
        Span::raw(format!(" · {} nodes · ", app.fleet.nodes.len())),
        Span::styled(
            format!("{firing} firing"),
            if firing > 0 {
                severity_style("critical")
            } else {
                Style::new()
            },
        ),
        Span::raw(format!(
            " · sort: {} · every {}",
            app.sort.label(),
            humantime::format_duration(app.interval)
        )),
    ];
    if let Some(ms) = app.refreshed_ms {
        spans.push(Span::raw(format!(" · updated {}", clock(ms))));
    }
    if let Some(e) = app.errors.first() {
        spans.push(Span::styled(format!(" · {e}"), Style::new().fg(Color::Red)));
    }
    Line::from(spans)
}

fn render_nodes(app: &App, f: &mut Frame, area: Rect) {
    let fleet_alerts = &app.fleet.fleet_alerts;
    let [list, fleet] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(if fleet_alerts.is_empty() {
            0
        } else {
            fleet_alerts.len() as u16 + 2
        }),
    ])
    .areas(area);
    let rows: Vec<Row> = app
        .fleet
        .nodes
        .iter()
        .map(|n| {
            let alerts = n.alerts.len();
            Row::new(vec![
                Cell::from(n.name.clone()),
                Cell::from(n.role.clone()),
                Cell::from(if n.connected { "yes" } else { "no" }),
                Cell::from(opt(n.gpu_util(), |u| format!("{u:.0}%"))),
                Cell::from(alerts.to_string()).style(if alerts > 0 {
                    severity_style("critical")
                } else {
                    Style::new()
                }),
            ])
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(18),
            Constraint::Length(9),
            Constraint::Length(3),
            Constraint::Length(5),
            Constraint::Length(6),
        ],
    )
    .header(Row::new(vec!["NODE", "ROLE", "UP", "GPU", "ALERTS"]).style(bold()))
    .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
    .highlight_symbol(">> ")
    .block(Block::bordered().title(format!(" Nodes (sort: {}) ", app.sort.label())));
    let mut state = TableState::default().with_selected(app.index());
    f.render_stateful_widget(table, list, &mut state);
    if !fleet_alerts.is_empty() {
        f.render_widget(
            List::new(fleet_alerts.iter().map(alert_item))
                .block(Block::bordered().title(" Fleet alerts ")),
            fleet,
        );
    }
}

fn alert_item(a: &AlertView) -> ListItem<'static> {
    ListItem::new(Line::from(vec![
        Span::styled(format!("{:<8} ", a.severity), severity_style(&a.severity)),
        Span::styled(a.rule.clone(), bold()),
        Span::raw(if a.summary.is_empty() {
            String::new()
        } else {
            format!("  {}", a.summary)
        }),
    ]))
}

/// A bordered table with a bold header.
fn table<'a>(title: String, header: &[&'a str], rows: Vec<Row<'a>>, widths: &[u16]) -> Table<'a> {
    Table::new(rows, widths.iter().map(|w| Constraint::Length(*w)))
        .header(Row::new(header.to_vec()).style(bold()))
        .block(Block::bordered().title(title))
}

/// The parts of a node's view, drawn where there is something to show.
enum Section {
    Gpus,
    Nics,
    Nfs,
    Zfs,
    Jobs,
}

fn render_node(n: &NodeView, f: &mut Frame, area: Rect) {
    let seen = if n.connected {
        "connected".to_string()
    } else if n.last_seen_ms > 0 {
        format!("last seen {}", ago(n.last_seen_ms))
    } else {
        "not connected".to_string()
    };
    let outer = Block::bordered().title(Line::from(vec![
        Span::styled(format!(" {} ", n.name), bold()),
        Span::raw(format!(
            "· {} · {seen} ",
            if n.role.is_empty() { "?" } else { &n.role }
        )),
    ]));
    let inner = outer.inner(area);
    f.render_widget(outer, area);

    // Sections that have something to show, each with its height.
    let mut sections: Vec<(Section, u16)> = Vec::new();
    let rows = |n: usize| n as u16 + 3;
    if !n.gpus.is_empty() {
        sections.push((Section::Gpus, rows(n.gpus.len())));
    }
    if !n.nics.is_empty() {
        sections.push((Section::Nics, rows(n.nics.len())));
    }
    if !n.nfs.is_empty() {
        sections.push((Section::Nfs, rows(n.nfs.len())));
    }
    if let Some(z) = &n.zfs {
        sections.push((Section::Zfs, rows(z.pools.len())));
    }
    if !n.jobs.is_empty() {
        sections.push((Section::Jobs, rows(n.jobs.len())));
    }
    let mut constraints: Vec<Constraint> = sections
        .iter()
        .map(|(_, h)| Constraint::Length(*h))
        .collect();
    constraints.push(Constraint::Min(3));
    let areas = Layout::vertical(constraints).split(inner);
    for ((section, _), r) in sections.iter().zip(areas.iter()) {
        match section {
            Section::Gpus => gpus(n, f, *r),
            Section::Nics => nics(n, f, *r),
            Section::Nfs => nfs(n, f, *r),
            Section::Zfs => zfs(n, f, *r),
            Section::Jobs => jobs(n, f, *r),
        }
    }
    let last = areas[areas.len() - 1];
    let alerts: Vec<ListItem> = if n.alerts.is_empty() {
        vec![ListItem::new("no firing alerts")]
    } else {
        n.alerts.iter().map(alert_item).collect()
    };
    let title = if sections.is_empty() {
        " Alerts (no GPU, NIC, NFS, ZFS or SLURM data) ".to_string()
    } else {
        format!(" Alerts ({}) ", n.alerts.len())
    };
    f.render_widget(
        List::new(alerts).block(Block::bordered().title(title)),
        last,
    );
}

fn gpus(n: &NodeView, f: &mut Frame, area: Rect) {
    let rows: Vec<Row> = n
        .gpus
        .iter()
        .map(|g| {
            let util = opt(g.util, |u| format!("{} {u:>3.0}%", bar(u / 100.0, 20)));
            let vram = match (g.vram_used, g.vram_total) {
                (Some(u), Some(t)) if t > 0.0 => {
                    format!("{} {:.1}/{:.1} GiB", bar(u / t, 12), u / 1024.0, t / 1024.0)
                }
                (Some(u), _) => format!("{:.1} GiB", u / 1024.0),
                _ => "–".into(),
            };
            let power = match (g.power, g.power_cap) {
                (Some(p), Some(c)) => format!("{p:.0}/{c:.0} W"),
                (Some(p), None) => format!("{p:.0} W"),
                _ => "–".into(),
            };
            let hot = g.temp.is_some_and(|t| t >= 90.0);
            Row::new(vec![
                Cell::from(format!("gpu{}", g.id)),
                Cell::from(util),
                Cell::from(vram),
                Cell::from(opt(g.temp, |t| format!("{t:.0} °C"))).style(if hot {
                    severity_style("critical")
                } else {
                    Style::new()
                }),
                Cell::from(power),
            ])
        })
        .collect();
    let model = n
        .gpus
        .iter()
        .map(|g| g.model.as_str())
        .find(|m| !m.is_empty())
        .map(|m| format!(" · {m}"))
        .unwrap_or_default();
    f.render_widget(
        table(
            format!(" GPUs ({}){model} ", n.gpus.len()),
            &["GPU", "UTIL", "VRAM", "TEMP", "POWER"],
            rows,
            &[6, 26, 27, 7, 11],
        ),
        area,
    );
}

fn nics(n: &NodeView, f: &mut Frame, area: Rect) {
    let rows: Vec<Row> = n
        .nics
        .iter()
        .map(|c| {
            let dir = |v: Option<f64>| match (v, c.speed) {
                (Some(v), Some(s)) => format!("{} {}", bar(v / s, 10), rate_text(v)),
                (Some(v), None) => rate_text(v),
                _ => "–".into(),
            };
            let errors = c.errors.unwrap_or(0.0);
            Row::new(vec![
                Cell::from(c.device.clone()),
                Cell::from(dir(c.rx)),
                Cell::from(dir(c.tx)),
                Cell::from(opt(c.speed, |s| format!("{:.0} Gb/s", s * 8.0 / 1e9))),
                Cell::from(opt(c.errors, |e| format!("{e:.1}/s"))).style(if errors > 0.0 {
                    severity_style("critical")
                } else {
                    Style::new()
                }),
            ])
        })
        .collect();
    f.render_widget(
        table(
            " NICs (throughput of link speed) ".into(),
            &["DEVICE", "RX", "TX", "LINK", "ERRORS"],
            rows,
            &[12, 22, 22, 9, 9],
        ),
        area,
    );
}

fn nfs(n: &NodeView, f: &mut Frame, area: Rect) {
    let rows: Vec<Row> = n
        .nfs
        .iter()
        .map(|m| {
            Row::new(vec![
                m.export.clone(),
                opt(m.ops_per_sec, |o| format!("{o:.1}")),
                opt(m.rtt, |r| format!("{:.2} ms", r * 1000.0)),
            ])
        })
        .collect();
    f.render_widget(
        table(
            " NFS mounts ".into(),
            &["EXPORT", "OPS/S", "RTT/OP"],
            rows,
            &[40, 10, 12],
        ),
        area,
    );
}

fn zfs(n: &NodeView, f: &mut Frame, area: Rect) {
    let Some(z) = &n.zfs else { return };
    let pct = |v: Option<f64>| opt(v, |r| format!("{:.1}%", r * 100.0));
    let mut lines = vec![Line::from(format!(
        "ARC hit {}   L2ARC hit {}",
        pct(z.arc_hit),
        pct(z.l2_hit)
    ))];
    for (pool, state) in &z.pools {
        let style = if state == "online" {
            Style::new().fg(Color::Green)
        } else {
            severity_style("critical")
        };
        lines.push(Line::from(vec![
            Span::raw(format!("pool {pool}: ")),
            Span::styled(state.to_uppercase(), style),
        ]));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" ZFS ")),
        area,
    );
}

fn jobs(n: &NodeView, f: &mut Frame, area: Rect) {
    let rows: Vec<Row> = n
        .jobs
        .iter()
        .map(|j| {
            Row::new(vec![
                j.id.clone(),
                j.name.clone(),
                j.user.clone(),
                j.partition.clone(),
                opt(j.gpus, |g| format!("{g:.0}")),
            ])
        })
        .collect();
    f.render_widget(
        table(
            format!(" SLURM jobs running ({}) ", n.jobs.len()),
            &["JOB", "NAME", "USER", "PARTITION", "GPUS"],
            rows,
            &[10, 24, 12, 12, 5],
        ),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::{Gpu, Zfs};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::KeyEvent;

    fn node(name: &str, util: Option<f64>, alerts: usize) -> NodeView {
        NodeView {
            name: name.into(),
            role: "training".into(),
            connected: true,
            gpus: util
                .map(|u| {
                    vec![Gpu {
                        id: "0".into(),
                        util: Some(u),
                        vram_used: Some(8192.0),
                        vram_total: Some(32768.0),
                        temp: Some(64.0),
                        power: Some(200.0),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            alerts: (0..alerts)
                .map(|k| AlertView {
                    rule: format!("Rule{k}"),
                    severity: "critical".into(),
                    summary: String::new(),
                    node: name.into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn app() -> App {
        let mut app = App::new(Duration::from_secs(2));
        let mut nas = node("nas-01", None, 0);
        nas.zfs = Some(Zfs {
            arc_hit: Some(0.5),
            l2_hit: None,
            pools: vec![("tank".into(), "degraded".into())],
        });
        app.refreshed(Refresh {
            fleet: Some(Fleet {
                nodes: vec![
                    node("train-02", Some(91.0), 1),
                    node("train-01", Some(20.0), 0),
                    nas,
                ],
                fleet_alerts: Vec::new(),
            }),
            errors: Vec::new(),
            at_ms: 0,
        });
        app
    }

    fn screen(app: &App) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(160, 40)).unwrap();
        t.draw(|f| render(app, f)).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect()
            })
            .collect()
    }

    fn press(app: &mut App, c: char) -> Action {
        app.key(KeyEvent::from(KeyCode::Char(c)))
    }

    #[test]
    fn bars_are_proportional() {
        assert_eq!(bar(0.5, 10), "█████░░░░░");
        assert_eq!(bar(0.91, 20).matches('█').count(), 18);
        assert_eq!(bar(2.0, 4), "████");
        assert_eq!(bar(f64::NAN, 4), "░░░░");
        assert_eq!(rate_text(1.25e9), "1.2 GB/s");
        assert_eq!(rate_text(12.0), "12 B/s");
    }

    #[test]
    fn keys_select_sort_and_quit() {
        let mut app = app();
        // Sorted by name; the first node selected.
        assert_eq!(app.selected.as_deref(), Some("nas-01"));
        press(&mut app, 'j');
        assert_eq!(app.selected.as_deref(), Some("train-01"));
        app.key(KeyEvent::from(KeyCode::Down));
        app.key(KeyEvent::from(KeyCode::Down));
        assert_eq!(app.selected.as_deref(), Some("train-02"));
        press(&mut app, 'k');
        assert_eq!(app.selected.as_deref(), Some("train-01"));
        // Sorting keeps the selected node, at its new row.
        press(&mut app, 's');
        assert_eq!(app.sort, SortKey::GpuUtil);
        assert_eq!(app.fleet.nodes[0].name, "train-02");
        assert_eq!(app.index(), Some(1));
        press(&mut app, 's');
        assert_eq!(app.sort, SortKey::Alerts);
        assert_eq!(app.fleet.nodes[0].name, "train-02");
        assert_eq!(press(&mut app, 'x'), Action::Continue);
        assert_eq!(press(&mut app, 'q'), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(app.key(ctrl_c), Action::Quit);
    }

    #[test]
    fn a_frame_shows_nodes_the_selected_gpus_and_alerts() {
        let mut app = app();
        let s = screen(&app).join("\n");
        assert!(
            s.contains("vitals top · 3 nodes · 1 firing · sort: name"),
            "{s}"
        );
        assert!(s.contains(">> nas-01"), "{s}");
        assert!(s.contains("pool tank: DEGRADED"), "{s}");
        assert!(s.contains("ARC hit 50.0%"), "{s}");
        assert!(s.contains(HELP), "{s}");
        press(&mut app, 'G');
        let s = screen(&app).join("\n");
        assert!(s.contains(">> train-02"), "{s}");
        let gpu = s.lines().find(|l| l.contains("gpu0")).unwrap_or_default();
        assert!(gpu.contains(&format!("{}  91%", bar(0.91, 20))), "{gpu}");
        assert!(gpu.contains("8.0/32.0 GiB"), "{gpu}");
        assert!(gpu.contains("64 °C"), "{gpu}");
        assert!(s.contains("Rule0"), "{s}");
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_fleet_and_says_why() {
        let mut app = app();
        app.refreshed(Refresh {
            fleet: None,
            errors: vec!["collector answered Unavailable".into()],
            at_ms: 5,
        });
        assert_eq!(app.fleet.nodes.len(), 3);
        let s = screen(&app).join("\n");
        assert!(s.contains("collector answered Unavailable"), "{s}");
    }
}
