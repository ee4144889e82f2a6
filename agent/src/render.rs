//! Rendering plans for people (a table with human sizes and the reasons) and for tools (JSON).

use std::fmt::Write as _;
use std::path::Path;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use diskchain_planner::StepAction;

use crate::plan::PlanReport;
use crate::units::human_bytes;

/// Paths relative to the directory most of a disk's files live in (printed once above the table).
struct Short<'a>(Option<&'a Path>);

impl Short<'_> {
    fn of(&self, p: &Path) -> String {
        match self.0.and_then(|d| p.strip_prefix(d).ok()) {
            Some(rel) => rel.display().to_string(),
            None => p.display().to_string(),
        }
    }
}

/// `a.qcow2, b.qcow2` for a list of layers.
fn names(layers: &[std::path::PathBuf], short: &dyn Fn(&Path) -> String) -> String {
    layers
        .iter()
        .map(|l| short(l))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A message with the home directory prefix removed from the paths in it.
fn shorten(text: &str, home: Option<&Path>) -> String {
    match home {
        Some(h) => text.replace(&format!("{}/", h.display()), ""),
        None => text.to_string(),
    }
}

/// The report as one JSON object: `{"disks": [...], "errors": [...]}`.
pub fn json(report: &PlanReport) -> String {
    serde_json::to_string_pretty(report).expect("plans serialise")
}

/// The report as text.
pub fn text(report: &PlanReport) -> String {
    let mut out = String::new();
    for d in &report.disks {
        let p = &d.plan;
        let _ = writeln!(out, "disk {} ({})", d.key, d.spec);
        if let Some(l) = &d.libvirt {
            let _ = writeln!(
                out,
                "  libvirt domain {} disk {} ({}): {}",
                l.domain,
                l.target,
                l.uri,
                if d.live {
                    "running; steps go through libvirt's block jobs"
                } else {
                    "shut off; steps run offline through qemu-img"
                }
            );
        }
        let home = p.chain.last().and_then(|a| a.parent());
        if let Some(h) = home {
            let _ = writeln!(out, "  files relative to {}", h.display());
        }
        let sh = Short(home);
        let short = |p: &Path| sh.of(p);
        if d.suspended {
            let _ = writeln!(
                out,
                "  suspended (spec.suspend): the agent will not act on it"
            );
        }
        if p.steps.is_empty() {
            let _ = writeln!(out, "  nothing to do: the chain matches the spec");
        } else {
            let mut t = Table::new();
            t.load_style(UTF8_FULL_CONDENSED);
            t.set_header(vec!["#", "op", "what", "writes", "zeros", "why"]);
            for (i, s) in p.steps.iter().enumerate() {
                let what = match &s.action {
                    StepAction::Snapshot { file, active, .. } => {
                        format!("point in {}, active {}", short(file), short(active))
                    }
                    StepAction::Mirror { from, to, backing } => format!(
                        "{} to {} (backing {})",
                        short(from),
                        short(to),
                        backing.as_deref().map_or("none: whole chain".into(), short)
                    ),
                    StepAction::Revert {
                        point, discarded, ..
                    } => format!(
                        "fresh active on {point:?}; old kept in {}",
                        short(discarded)
                    ),
                    StepAction::Stream { into, base, layers } => format!(
                        "{} into {} (new base {})",
                        names(layers, &short),
                        short(into),
                        base.as_deref().map_or("none".into(), short)
                    ),
                    StepAction::Commit { base, layers, .. } => {
                        format!("{} into {}", names(layers, &short), short(base))
                    }
                    StepAction::Copy { layers, to, .. } => {
                        format!("{} merged into {}", names(layers, &short), short(to))
                    }
                    StepAction::Rebase { overlay, backing } => {
                        format!("{} onto {}", short(overlay), short(backing))
                    }
                    StepAction::Delete { file } => short(file),
                    StepAction::TakeOver { holder, active, .. } => {
                        format!("{} becomes {}", short(holder), short(active))
                    }
                };
                t.add_row(vec![
                    (i + 1).to_string(),
                    s.action.op().to_string(),
                    what,
                    human_bytes(s.bytes),
                    human_bytes(s.zero_bytes),
                    shorten(&s.reason, home),
                ]);
            }
            let _ = writeln!(out, "{t}");
            let _ = writeln!(
                out,
                "  total: {} written ({} bytes), plus {} of zeros",
                human_bytes(p.total_bytes),
                p.total_bytes,
                human_bytes(p.total_zero_bytes)
            );
            let base = |b: Option<u64>| b.map_or("not possible".into(), human_bytes);
            let _ = writeln!(
                out,
                "  compare: always commit {}, always stream {}",
                base(p.baselines.always_commit),
                base(p.baselines.always_stream)
            );
        }
        for dec in &p.decisions {
            let what = if dec.removes.is_empty() {
                format!("move point {:?}", dec.point)
            } else {
                format!("remove {} below {:?}", dec.removes.join(", "), dec.point)
            };
            let _ = writeln!(
                out,
                "  {}: {} ({})",
                shorten(&what, home),
                shorten(&dec.chosen.strategy, home),
                human_bytes(dec.chosen.bytes)
            );
            for r in &dec.rejected {
                let strategy = shorten(&r.strategy, home);
                match &r.not_allowed {
                    Some(why) => {
                        let why = shorten(why, home);
                        let _ = writeln!(out, "    rejected: {strategy}: not allowed, {why}");
                    }
                    None => {
                        let _ =
                            writeln!(out, "    rejected: {strategy} ({})", human_bytes(r.bytes));
                    }
                }
            }
        }
        let chain: Vec<String> = p
            .result
            .iter()
            .map(|l| match &l.point {
                Some(n) => format!("{n}={}", short(&l.file)),
                None => format!("active={}", short(&l.file)),
            })
            .collect();
        let _ = writeln!(out, "  result: {}", chain.join(" <- "));
        for n in &p.notes {
            let _ = writeln!(out, "  note: {}", shorten(n, home));
        }
        let _ = writeln!(out);
    }
    out
}
