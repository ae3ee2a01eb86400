//! `report.html`: a self-contained page a researcher can hand on — Table 2, Tables 3/4-style
//! results with CIs and p-values, ROC curves per task (SVG drawn with plotters), the task-3
//! confusion matrix, per-site results, and Grad-CAM thumbnails when sites provided them.

use std::fmt::Write as _;

use aln_common::stats::AucEstimate;
use aln_common::stats::diagnostic::Proportion;
use plotters::prelude::*;

use crate::evaluation::TaskEvaluation;
use crate::report::Report;

/// A Grad-CAM overlay (PNG) a site chose to share for the report.
#[derive(Debug, Clone)]
pub struct GradCamImage {
    pub site: String,
    pub patient_id: String,
    pub n_stage: String,
    pub modality: String,
    pub png: Vec<u8>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn auc_cell(a: Option<&AucEstimate>) -> String {
    a.map_or("n/a".into(), ToString::to_string)
}

fn prop_cell(p: Option<Proportion>) -> String {
    p.map_or("n/a".into(), |p| format!("{:.1} [{:.1}, {:.1}]", 100.0 * p.estimate, 100.0 * p.ci_low, 100.0 * p.ci_high))
}

fn p_cell(p: f64) -> String {
    if p < 0.001 { "&lt; 0.001".into() } else { format!("{p:.3}") }
}

/// ROC curves of every method of a task, as an SVG string.
pub fn roc_svg(title: &str, t: &TaskEvaluation) -> String {
    let mut buf = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut buf, (460, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart.configure_mesh().x_desc("1 - specificity").y_desc("sensitivity").light_line_style(WHITE.mix(0.0)).draw()?;
        chart.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
        for (i, m) in t.methods.iter().enumerate() {
            let (Some(roc), Some(auc)) = (&m.roc_test, m.pooled_test()) else { continue };
            const COLORS: [RGBColor; 8] = [
                RGBColor(214, 39, 40),
                RGBColor(44, 160, 44),
                RGBColor(255, 127, 14),
                RGBColor(31, 119, 180),
                RGBColor(148, 103, 189),
                RGBColor(140, 86, 75),
                RGBColor(227, 119, 194),
                RGBColor(23, 190, 207),
            ];
            let color = COLORS[i % COLORS.len()].to_rgba();
            chart
                .draw_series(LineSeries::new(roc.fpr.iter().copied().zip(roc.tpr.iter().copied()), color.stroke_width(2)))?
                .label(format!("{} ({:.3})", m.method, auc.auc))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.9)).border_style(BLACK.mix(0.4)).draw()?;
        root.present()?;
        Ok(())
    })();
    if let Err(e) = drawn {
        tracing::warn!("ROC plot {title}: {e}");
    }
    buf
}

fn task_section(h: &mut String, title: &str, t: &TaskEvaluation, sites: &[String]) {
    let _ = writeln!(h, "<h2>{}</h2>", esc(title));
    let _ = writeln!(
        h,
        "<p>SVMs fitted on {} pooled training patients (hyper-parameters by 5-fold CV, threshold by Youden's J on training rows); {} validation, {} test patients.</p>",
        t.n_train, t.n_validation, t.n_test
    );
    let _ = writeln!(h, "<div class=row><div>{}</div><div>", roc_svg(title, t));
    let _ = writeln!(h, "<table><tr><th>method</th><th>training AUC</th><th>test AUC [95% CI]</th><th>ACC %</th><th>SENS %</th><th>SPEC %</th><th>PPV %</th><th>NPV %</th><th>p vs combined</th></tr>");
    for m in &t.methods {
        let d = m.test.at_threshold;
        let mut p = t.delong_combined_vs.get(&m.method).map_or("—".into(), |d| p_cell(d.p));
        if let (true, Some(hm)) = (m.method == crate::evaluation::AXILLARY_US, t.hanley_mcneil_combined_vs_axillary_us) {
            p = format!("{p} (HM 1983: {})", p_cell(hm.p));
        }
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.method),
            m.train.auc.map_or("n/a".into(), |a| format!("{:.3}", a.auc)),
            auc_cell(m.pooled_test()),
            prop_cell(d.map(|d| d.accuracy)),
            prop_cell(d.and_then(|d| d.sensitivity)),
            prop_cell(d.and_then(|d| d.specificity)),
            prop_cell(d.and_then(|d| d.ppv)),
            prop_cell(d.and_then(|d| d.npv)),
            p
        );
    }
    let _ = writeln!(h, "</table><h3>Each site's test patients, pooled model</h3><table><tr><th>method</th>");
    for s in sites {
        let _ = write!(h, "<th>{}</th>", esc(s));
    }
    let _ = writeln!(h, "</tr>");
    for m in &t.methods {
        let _ = write!(h, "<tr><td>{}</td>", esc(&m.method));
        for s in sites {
            let _ = write!(h, "<td>{}</td>", auc_cell(m.per_site_test.get(s).and_then(|c| c.auc.as_ref())));
        }
        let _ = writeln!(h, "</tr>");
    }
    let _ = writeln!(h, "</table></div></div>");
}

/// The whole page.
pub fn render(r: &Report, gradcam: &[GradCamImage]) -> String {
    let sites: Vec<String> = r.cohort.keys().cloned().collect();
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>ALN federation report {}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}.row{{display:flex;gap:2em;flex-wrap:wrap}}\
         .cam{{display:inline-block;margin:4px;text-align:center;font-size:11px}}.cam img{{width:112px;image-rendering:pixelated}}\
         .note{{color:#666;font-size:13px}}.kv td{{text-align:left}}</style></head><body>",
        esc(&r.run_id)
    );
    let _ = writeln!(
        h,
        "<h1>Axillary lymph node status: federated deep learning radiomics</h1>\
         <p class=note>run {} · global model <code>{}</code> · {} sites · {} rounds · training plan: {} local steps, batch {}, {} px, lr {:e} · software {}</p>",
        esc(&r.run_id),
        esc(&r.model_hash.0[..16.min(r.model_hash.0.len())]),
        r.config.sites.len(),
        r.config.rounds,
        r.config.training.local_steps,
        r.config.training.batch_size,
        r.config.training.image_size,
        r.config.training.learning_rate,
        r.software_version
    );
    // How the federation ran.
    let f = &r.federation;
    let eps = match (f.epsilon, f.delta) {
        (Some(e), Some(d)) => format!("ε = {e:.2} at δ = {d:e}"),
        _ => "none (ε = ∞)".into(),
    };
    let _ = writeln!(
        h,
        "<h2>Federation</h2><table class=kv><tr><th>aggregation</th><td>{}</td></tr><tr><th>privacy</th><td>{}</td></tr>\
         <tr><th>differential privacy</th><td>{} <span class=note>{}</span></td></tr>\
         <tr><th>bytes</th><td>{:.1} MB up, {:.1} MB down over {} rounds ({:.1} MB up, {:.1} MB down per round)</td></tr>\
         <tr><th>secure-aggregation restarts · clipped updates</th><td>{} · {}</td></tr></table>",
        esc(&f.aggregator),
        esc(&f.privacy),
        esc(&eps),
        esc(f.epsilon_scope),
        f.uplink_bytes as f64 / 1e6,
        f.downlink_bytes as f64 / 1e6,
        f.rounds,
        f.uplink_bytes_per_round / 1e6,
        f.downlink_bytes_per_round / 1e6,
        f.mask_restarts,
        f.clipped_updates
    );
    // Cohort per site.
    let _ = writeln!(h, "<h2>Cohort</h2><table><tr><th>site</th><th>train</th><th>validation</th><th>test</th><th>N0</th><th>N+(1-2)</th><th>N+(≥3)</th></tr>");
    for (site, c) in &r.cohort {
        let g = |m: &std::collections::BTreeMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(site),
            g(&c.by_split, "train"),
            g(&c.by_split, "validation"),
            g(&c.by_split, "test"),
            g(&c.by_class, "N0"),
            g(&c.by_class, "N1-2"),
            g(&c.by_class, "N3+")
        );
    }
    let _ = writeln!(h, "</table><h3>Table 2: training vs test cohort (pooled)</h3><table><tr><th>variable</th><th>training</th><th>test</th><th>test</th><th>p</th><th>Mann-Whitney p</th><th>missing</th></tr>");
    for b in &r.table2 {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&b.variable),
            esc(&b.train),
            esc(&b.test),
            b.test_name,
            b.result.map_or("n/a".into(), |t| p_cell(t.p)),
            b.mann_whitney.map_or("".into(), |t| p_cell(t.p)),
            b.missing
        );
    }
    let _ = writeln!(h, "</table>");
    task_section(&mut h, "Task 1: N0 vs N+(≥1)", &r.task1, &sites);
    task_section(&mut h, "Task 2: N+(1-2) vs N+(≥3)", &r.task2, &sites);
    let t3 = &r.task3;
    let _ = writeln!(
        h,
        "<h2>Task 3: N0 / N+(1-2) / N+(≥3)</h2><p>One-vs-rest SVMs on deep + clinical features. Test accuracy {} % on {} patients.</p><table><tr><th>true \\ predicted</th>",
        prop_cell(Some(t3.accuracy)),
        t3.n_test
    );
    for c in &t3.classes {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    let _ = writeln!(h, "<th>recall %</th></tr>");
    let max = t3.confusion.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    for (c, row) in t3.classes.iter().zip(&t3.confusion) {
        let _ = write!(h, "<tr><th>{}</th>", esc(c));
        for v in row {
            let a = 0.1 + 0.6 * (*v as f64 / max);
            let _ = write!(h, "<td style=\"background:rgba(40,90,200,{a:.2})\">{v}</td>");
        }
        let _ = writeln!(h, "<td>{}</td></tr>", prop_cell(t3.per_class_recall.get(c).copied().flatten()));
    }
    let _ = writeln!(h, "</table>");
    if !r.leave_one_site_out.is_empty() {
        let _ = writeln!(
            h,
            "<h2>Leave-one-site-out external validation (task 1)</h2><p>For each site, the network is federated without it and the SVMs are fitted on the other sites' training rows; AUCs are on all of the held-out site's patients.</p><table><tr><th>held-out site</th><th>patients</th><th>training patients</th>"
        );
        let methods: Vec<&String> = r.leave_one_site_out[0].methods.keys().collect();
        for m in &methods {
            let _ = write!(h, "<th>{}</th>", esc(m));
        }
        let _ = writeln!(h, "</tr>");
        for l in &r.leave_one_site_out {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td><td>{}</td>", esc(&l.held_out), l.n_test, l.n_train);
            for m in &methods {
                let _ = write!(h, "<td>{}</td>", auc_cell(l.methods.get(*m).and_then(|a| a.as_ref())));
            }
            let _ = writeln!(h, "</tr>");
        }
        let _ = writeln!(h, "</table>");
    }
    if !gradcam.is_empty() {
        use base64::Engine as _;
        let _ = writeln!(h, "<h2>Grad-CAM (last residual block), computed at the sites</h2><div>");
        for g in gradcam {
            let _ = writeln!(
                h,
                "<div class=cam><img alt=\"Grad-CAM\" src=\"data:image/png;base64,{}\"><br>{} · {}<br>{} · {}</div>",
                base64::engine::general_purpose::STANDARD.encode(&g.png),
                esc(&g.site),
                esc(&g.patient_id),
                esc(&g.n_stage),
                esc(&g.modality)
            );
        }
        let _ = writeln!(h, "</div>");
    }
    let _ = writeln!(
        h,
        "<h2>Rounds</h2><table><tr><th>round</th><th>sites</th><th>wall s</th><th>aggregate s</th><th>checkpoint s</th><th>MB up</th><th>MB down</th><th>rejected</th><th>model</th></tr>"
    );
    for rr in &r.rounds {
        let _ = writeln!(
            h,
            "<tr><td>{} {}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&rr.experiment),
            rr.round,
            rr.contributors.iter().map(|c| format!("{} (n={})", c.site, c.sample_count)).collect::<Vec<_>>().join(", "),
            rr.duration_s,
            rr.aggregate_s,
            rr.checkpoint_s,
            rr.uplink_bytes as f64 / 1e6,
            rr.downlink_bytes as f64 / 1e6,
            rr.rejected.len(),
            rr.model_hash.short()
        );
    }
    let _ = writeln!(h, "</table><p class=note>AUC CIs: DeLong; proportions: exact Clopper-Pearson 95% CIs; p: paired two-sided DeLong test against the combined model. Every number is also in report.json.</p></body></html>");
    h
}

/// Grad-CAM overlays sites chose to share, from `state/gradcam/<site>/`.
pub fn collect_gradcam(state_dir: &std::path::Path) -> Vec<GradCamImage> {
    let mut out = Vec::new();
    let Ok(sites) = std::fs::read_dir(state_dir.join("gradcam")) else { return out };
    for site in sites.flatten() {
        let Ok(files) = std::fs::read_dir(site.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let parts: Vec<&str> = name.trim_end_matches(".png").split("__").collect();
            if let ([patient, stage, modality], Ok(png)) = (parts.as_slice(), std::fs::read(f.path())) {
                out.push(GradCamImage {
                    site: site.file_name().to_string_lossy().into_owned(),
                    patient_id: patient.to_string(),
                    n_stage: stage.to_string(),
                    modality: modality.to_string(),
                    png,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.site, &a.n_stage, &a.patient_id, &a.modality).cmp(&(&b.site, &b.n_stage, &b.patient_id, &b.modality)));
    out
}
