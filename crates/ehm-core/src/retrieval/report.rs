//! The duplicate report: one self-contained HTML page (thumbnails embedded as base64 JPEG), one
//! row per group, each image with its score and path.
use super::Match;
use base64::Engine;
use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A `data:` URL of a thumbnail (longest side `side`), or `None` if the file cannot be read.
pub fn thumbnail(path: &std::path::Path, side: u32) -> Option<String> {
    let img = crate::data::image_io::load_rgb(path).ok()?;
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = (side as f32 / w.max(h)).min(1.0);
    let (tw, th) = (
        (w * s).round().max(1.0) as u32,
        (h * s).round().max(1.0) as u32,
    );
    let t = image::imageops::resize(&img, tw, th, image::imageops::FilterType::Triangle);
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 80)
        .encode_image(&t)
        .ok()?;
    Some(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(jpg)
    ))
}

/// The HTML page for duplicate `groups` found in `index` at `threshold`.
pub fn dedup_html(index: &str, threshold: f32, groups: &[Vec<Match>]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ehm-retrieve dedup</title><style>\
body{{font-family:sans-serif;margin:16px;background:#fafafa}}h1{{font-size:20px}}\
.g{{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px}}\
.g h2{{font-size:14px;margin:0 0 6px 0;color:#444}}.i{{display:inline-block;width:170px;margin:4px;vertical-align:top;font-size:11px;color:#333;word-break:break-all}}\
.i img{{max-width:160px;max-height:160px;display:block;margin-bottom:3px;border:1px solid #ccc}}.s{{font-weight:bold}}\
</style></head><body><h1>Duplicate groups in {} (threshold {threshold:.2})</h1><p>{} groups, {} images.</p>",
        escape(index),
        groups.len(),
        groups.iter().map(|g| g.len()).sum::<usize>()
    );
    for (n, g) in groups.iter().enumerate() {
        let _ = write!(
            h,
            "<div class=\"g\"><h2>group {} · {} images</h2>",
            n + 1,
            g.len()
        );
        for m in g {
            let p = m.path.display().to_string();
            let img = thumbnail(&m.path, 160)
                .map(|u| format!("<img src=\"{u}\" alt=\"\">"))
                .unwrap_or_else(|| "<div>(unreadable)</div>".into());
            let _ = write!(
                h,
                "<div class=\"i\">{img}<span class=\"s\">{:.3}</span> · id {}<br>{}</div>",
                m.score,
                m.id,
                escape(&p)
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</body></html>\n");
    h
}

/// A box over a thumbnail at window `v` (fractions of the image), CSS-positioned.
fn box_over(v: &crate::pipeline::View, class: &str, title: &str) -> String {
    format!(
        "<div class=\"{class}\" title=\"{}\" style=\"left:{:.2}%;top:{:.2}%;width:{:.2}%;height:{:.2}%\"></div>",
        escape(title),
        100.0 * v[0],
        100.0 * v[1],
        100.0 * v[2],
        100.0 * v[3]
    )
}

/// The match sheet of `query`: one row per query image — the query with the window that found
/// its best match (dashed) and the region verification located the copy in (solid), then its
/// matches with score, inliers and path.
pub fn match_sheet_html(index: &str, queries: &[(std::path::PathBuf, Vec<Match>)]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ehm-retrieve matches</title><style>\
body{{font-family:sans-serif;margin:16px;background:#fafafa}}h1{{font-size:20px}}\
.g{{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px;display:flex;gap:8px;align-items:flex-start}}\
.q{{width:260px;font-size:11px;word-break:break-all}}.f{{position:relative;display:inline-block;line-height:0}}\
.f img{{max-width:250px;max-height:250px;border:1px solid #ccc}}\
.w{{position:absolute;border:2px dashed #f0a000;box-sizing:border-box}}.v{{position:absolute;border:2px solid #e0245e;box-sizing:border-box}}\
.i{{display:inline-block;width:140px;margin:0 4px;vertical-align:top;font-size:11px;color:#333;word-break:break-all}}\
.i img{{max-width:130px;max-height:130px;display:block;margin-bottom:3px;border:1px solid #ccc}}.s{{font-weight:bold}}.x{{color:#e0245e}}\
</style></head><body><h1>Matches in {}</h1><p>{} queries. Over each query: <span style=\"color:#f0a000\">dashed</span> the window that found its best match, \
<span class=\"x\">solid</span> where verification located the copy (its inlier patches).</p>",
        escape(index),
        queries.len()
    );
    for (q, matches) in queries {
        let img = thumbnail(q, 250)
            .map(|u| format!("<img src=\"{u}\" alt=\"\">"))
            .unwrap_or_else(|| "<div>(unreadable)</div>".into());
        let mut boxes = String::new();
        if let Some(best) = matches.first() {
            if let Some(w) = best.window.filter(|w| *w != crate::pipeline::FULL) {
                boxes += &box_over(&w, "w", "window that found the best match");
            }
            if let Some(r) = best.verification.and_then(|v| v.region) {
                boxes += &box_over(&r, "v", "verified copy region");
            }
        }
        let _ = write!(
            h,
            "<div class=\"g\"><div class=\"q\"><div class=\"f\">{img}{boxes}</div><br>{}</div><div>",
            escape(&q.display().to_string())
        );
        if matches.is_empty() {
            h.push_str("<div class=\"i\">(no match)</div>");
        }
        for m in matches {
            let img = thumbnail(&m.path, 130)
                .map(|u| format!("<img src=\"{u}\" alt=\"\">"))
                .unwrap_or_else(|| "<div>(unreadable)</div>".into());
            let v = m
                .verification
                .map(|v| format!(" · <span class=\"x\">{} inliers</span>", v.inliers))
                .unwrap_or_default();
            let exact = if m.exact { " · exact copy" } else { "" };
            let _ = write!(
                h,
                "<div class=\"i\">{img}<span class=\"s\">{:.3}</span>{v}{exact}<br>{}</div>",
                m.score,
                escape(&m.path.display().to_string())
            );
        }
        h.push_str("</div></div>");
    }
    h.push_str("</body></html>\n");
    h
}

/// Precision–recall curves (`benchmark::EvalReport::curves`: threshold, precision, recall) as a PNG,
/// with the threshold of every tenth of recall printed along each curve.
pub fn pr_curve_png(
    title: &str,
    curves: &[(String, super::benchmark::PrCurve)],
    out: &std::path::Path,
) -> crate::error::Result<()> {
    use crate::draw::{line_chart, palette, Series};
    // x = recall, y = precision; thinned to at most 400 points per curve
    let series: Vec<Series> = curves
        .iter()
        .enumerate()
        .map(|(i, (name, c))| {
            let step = (c.len() / 400).max(1);
            Series {
                name,
                points: c.iter().step_by(step).map(|&(_, p, r)| (r, p)).collect(),
                colour: palette(i as u32),
                dashed: i > 0,
            }
        })
        .collect();
    let img = line_chart(
        &format!("precision (y) vs recall (x): {title}"),
        "recall",
        &series,
        (0.0, 1.0),
        720,
        420,
    );
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| crate::error::Error::Other(e.to_string()))?;
    crate::files::write_atomic(out, &png)
}
