//! Rendering plans for people (a table with human sizes and the reasons) and for tools (JSON).

use std::fmt::Write as _;
use std::path::Path;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use diskchain_planner::StepAction;

use crate::plan::PlanReport;
use crate::units::human_bytes;

fn short(p: &Path) -> String {
    p.display().to_string()
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
        let _ = writeln!(out, "disk {} ({})", p.name, d.spec);
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
                        format!("{} -> {}", short(active), short(file))
                    }
                    StepAction::Stream { into, base, layers } => format!(
                        "{} layer(s) into {} (base {})",
                        layers.len(),
                        short(into),
                        base.as_deref().map_or("none".into(), short)
                    ),
                    StepAction::Commit { base, top, layers } => {
                        format!(
                            "{} layer(s) up to {} into {}",
                            layers.len(),
                            short(top),
                            short(base)
                        )
                    }
                    StepAction::Copy { layers, to, .. } => {
                        format!("{} layer(s) merged into {}", layers.len(), short(to))
                    }
                    StepAction::Rebase { overlay, backing } => {
                        format!("{} onto {}", short(overlay), short(backing))
                    }
                    StepAction::Delete { file } => short(file),
                };
                t.add_row(vec![
                    (i + 1).to_string(),
                    s.action.op().to_string(),
                    what,
                    human_bytes(s.bytes),
                    human_bytes(s.zero_bytes),
                    s.reason.clone(),
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
                "  {what}: {} ({})",
                dec.chosen.strategy,
                human_bytes(dec.chosen.bytes)
            );
            for r in &dec.rejected {
                match &r.not_allowed {
                    Some(why) => {
                        let _ = writeln!(
                            out,
                            "    rejected: {} ({}), not allowed: {why}",
                            r.strategy,
                            human_bytes(r.bytes)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "    rejected: {} ({})",
                            r.strategy,
                            human_bytes(r.bytes)
                        );
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
            let _ = writeln!(out, "  note: {n}");
        }
        let _ = writeln!(out);
    }
    out
}
