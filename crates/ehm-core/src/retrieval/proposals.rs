//! Query-side window proposals: the axis-aligned rectangles a query seems to be made of — a
//! photo pasted into another picture, the cells of a collage, a screenshot's picture area. Such
//! a copy fills only part of the query, so the whole-image descriptor mostly describes something
//! else; searching with the window that frames it finds it. Found from the picture itself: long
//! straight colour edges (rows and columns where the picture changes abruptly over a long run)
//! that close into rectangles. Cheap (a 256-pixel thumbnail, prefix sums), no model needed.
use crate::pipeline::View;
use image::RgbImage;

/// Side of the thumbnail the edges are found on.
const WORK_SIDE: u32 = 256;
/// Colour step (0–255, largest channel, 2-pixel means either side) that counts as an edge.
const EDGE_STEP: f32 = 26.0;
/// A side of a rectangle counts when this share of it lies on an edge.
const MIN_COVER: f32 = 0.7;
/// Line candidates kept per direction (the longest runs).
const LINES: usize = 18;
/// Rectangles smaller or larger than these shares of the picture are not proposed (smaller
/// copies carry too little to describe; larger ones are served by the fixed windows).
const MIN_AREA: f32 = 0.04;
const MAX_AREA: f32 = 0.75;

/// A boundary candidate: position, and the extent of its longest straight run.
#[derive(Clone, Copy, Debug)]
struct Line {
    at: usize,
    from: usize,
    to: usize,
}

/// Edge maps of a thumbnail: `h[y][x]` marks a step between rows y−1 and y at column x,
/// `v[x][y]` one between columns x−1 and x at row y (both with one entry per boundary).
struct Edges {
    w: usize,
    h: usize,
    /// Prefix sums along each boundary (dilated by one boundary either side).
    rows: Vec<Vec<u32>>,
    cols: Vec<Vec<u32>>,
    hl: Vec<Line>,
    vl: Vec<Line>,
}

fn thumbnail(img: &RgbImage) -> RgbImage {
    let m = img.width().max(img.height());
    if m <= WORK_SIDE {
        return img.clone();
    }
    let s = WORK_SIDE as f32 / m as f32;
    image::imageops::resize(
        img,
        ((img.width() as f32 * s).round() as u32).max(1),
        ((img.height() as f32 * s).round() as u32).max(1),
        image::imageops::FilterType::Triangle,
    )
}

/// Boundary steps along one direction: `step(a, b)` for the boundary before index `b` of the
/// other axis at position `a`.
fn steps(n_at: usize, n_along: usize, px: impl Fn(usize, usize) -> [f32; 3]) -> Vec<Vec<bool>> {
    // boundary k lies between k−1 and k (k = 1 … n_at−1); compare 2-pixel means either side
    (0..=n_at)
        .map(|k| {
            (0..n_along)
                .map(|i| {
                    if k < 2 || k + 1 >= n_at {
                        return false;
                    }
                    let (a, b, c, d) = (px(k - 2, i), px(k - 1, i), px(k, i), px(k + 1, i));
                    (0..3)
                        .map(|ch| ((a[ch] + b[ch]) - (c[ch] + d[ch])).abs() / 2.0)
                        .fold(0.0, f32::max)
                        > EDGE_STEP
                })
                .collect()
        })
        .collect()
}

/// The longest run of marks (gaps of one tolerated) along each boundary, as lines; the
/// `LINES` longest of those at least `min_len` long, one per neighbourhood of ±2.
fn lines(marks: &[Vec<bool>], min_len: usize) -> Vec<Line> {
    let mut all: Vec<Line> = Vec::new();
    for (at, m) in marks.iter().enumerate() {
        let (mut best, mut start, mut gap) = (None::<(usize, usize)>, None::<usize>, 0);
        for i in 0..=m.len() {
            let on = i < m.len() && m[i];
            if on {
                start.get_or_insert(i);
                gap = 0;
            } else if let Some(s) = start {
                gap += 1;
                if gap > 1 || i == m.len() {
                    let end = i + 1 - gap;
                    if best.is_none_or(|(a, b)| end - s > b - a) {
                        best = Some((s, end));
                    }
                    start = None;
                    gap = 0;
                }
            }
        }
        if let Some((from, to)) = best.filter(|(a, b)| b - a >= min_len) {
            all.push(Line { at, from, to });
        }
    }
    all.sort_by_key(|l| std::cmp::Reverse(l.to - l.from));
    let mut kept: Vec<Line> = Vec::new();
    for l in all {
        if kept.len() == LINES {
            break;
        }
        if kept.iter().all(|k| k.at.abs_diff(l.at) > 2) {
            kept.push(l);
        }
    }
    kept
}

/// Prefix sums of each boundary's marks, dilated across neighbouring boundaries (an edge found
/// one pixel off still covers the side).
fn prefix(marks: &[Vec<bool>]) -> Vec<Vec<u32>> {
    (0..marks.len())
        .map(|k| {
            let mut acc = vec![0u32; marks[k].len() + 1];
            for i in 0..marks[k].len() {
                let on = (k.saturating_sub(1)..(k + 2).min(marks.len())).any(|j| marks[j][i]);
                acc[i + 1] = acc[i] + on as u32;
            }
            acc
        })
        .collect()
}

impl Edges {
    fn of(img: &RgbImage) -> Self {
        let t = thumbnail(img);
        let (w, h) = (t.width() as usize, t.height() as usize);
        let f: Vec<[f32; 3]> = t
            .pixels()
            .map(|p| [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32])
            .collect();
        let hm = steps(h, w, |y, x| f[y * w + x]);
        let vm = steps(w, h, |x, y| f[y * w + x]);
        Edges {
            w,
            h,
            hl: lines(&hm, w * 3 / 20),
            vl: lines(&vm, h * 3 / 20),
            rows: prefix(&hm),
            cols: prefix(&vm),
        }
    }

    /// Share of boundary `at` between `a` and `b` that lies on an edge (1 for the picture's own
    /// border).
    fn cover(sums: &[Vec<u32>], at: usize, a: usize, b: usize, border: usize) -> f32 {
        if at == 0 || at == border {
            return 1.0;
        }
        let s = &sums[at];
        (s[b] - s[a]) as f32 / (b - a).max(1) as f32
    }
}

/// The bands between lines that cross the whole picture (a collage's separators; a gap of a
/// few pixels between two pictures gives two lines, merged), as (start, end) along the axis of
/// length `n`; empty when no line crosses it. `across` is the length of the lines' own axis.
fn grid_cells(lines: &[Line], n: usize, across: usize) -> Vec<(usize, usize)> {
    let mut cuts: Vec<usize> = lines
        .iter()
        .filter(|l| (l.to - l.from) * 10 >= across * 9)
        .map(|l| l.at)
        .collect();
    if cuts.is_empty() {
        return Vec::new();
    }
    cuts.extend([0, n]);
    cuts.sort_unstable();
    // bands narrower than a tenth of the picture are gaps or frames, not cells
    cuts.windows(2)
        .filter(|p| (p[1] - p[0]) * 10 >= n)
        .map(|p| (p[0], p[1]))
        .collect()
}

fn iou(a: &[usize; 4], b: &[usize; 4]) -> f32 {
    let ix = a[2].min(b[2]).saturating_sub(a[0].max(b[0]));
    let iy = a[3].min(b[3]).saturating_sub(a[1].max(b[1]));
    let inter = (ix * iy) as f32;
    let area = |r: &[usize; 4]| ((r[2] - r[0]) * (r[3] - r[1])) as f32;
    inter / (area(a) + area(b) - inter).max(1.0)
}

/// Up to `max` windows framing rectangles the picture is made of, best first (fractions of the
/// picture, as `pipeline::View`).
pub fn rectangles(img: &RgbImage, max: usize) -> Vec<View> {
    if img.width() < 16 || img.height() < 16 || max == 0 {
        return Vec::new();
    }
    let e = Edges::of(img);
    let (w, h) = (e.w, e.h);
    let border = |at: usize, n: usize| Line { at, from: 0, to: n };
    let mut ys: Vec<Line> = e.hl.clone();
    ys.extend([border(0, w), border(h, w)]);
    let mut xs: Vec<Line> = e.vl.clone();
    xs.extend([border(0, h), border(w, h)]);
    ys.sort_by_key(|l| l.at);
    xs.sort_by_key(|l| l.at);
    let mut found: Vec<(f32, [usize; 4])> = Vec::new();
    for (i, top) in ys.iter().enumerate() {
        for bottom in &ys[i + 1..] {
            let (y0, y1) = (top.at, bottom.at);
            if (y1 - y0) * 20 < h * 3 {
                continue;
            }
            for (j, left) in xs.iter().enumerate() {
                for right in &xs[j + 1..] {
                    let (x0, x1) = (left.at, right.at);
                    let share = ((y1 - y0) * (x1 - x0)) as f32 / (w * h) as f32;
                    if (x1 - x0) * 20 < w * 3 || !(MIN_AREA..=MAX_AREA).contains(&share) {
                        continue;
                    }
                    let sides = [
                        (Edges::cover(&e.rows, y0, x0, x1, h), y0 == 0),
                        (Edges::cover(&e.rows, y1, x0, x1, h), y1 == h),
                        (Edges::cover(&e.cols, x0, y0, y1, w), x0 == 0),
                        (Edges::cover(&e.cols, x1, y0, y1, w), x1 == w),
                    ];
                    // at least two sides must be real edges inside the picture
                    let inner: Vec<f32> = sides.iter().filter(|s| !s.1).map(|s| s.0).collect();
                    if inner.len() < 2 || inner.iter().any(|&c| c < MIN_COVER) {
                        continue;
                    }
                    // a rectangle crossed by another full line is a union of cells (two
                    // collage pictures, a picture and its caption bar): rank it after its parts
                    let split = ys
                        .iter()
                        .filter(|l| l.at > y0 + (y1 - y0) / 8 && l.at + (y1 - y0) / 8 < y1)
                        .any(|l| Edges::cover(&e.rows, l.at, x0, x1, h) >= MIN_COVER)
                        || xs
                            .iter()
                            .filter(|l| l.at > x0 + (x1 - x0) / 8 && l.at + (x1 - x0) / 8 < x1)
                            .any(|l| Edges::cover(&e.cols, l.at, y0, y1, w) >= MIN_COVER);
                    let score = inner.iter().sum::<f32>() / inner.len() as f32
                        + 0.05 * inner.len() as f32
                        - if split { 0.15 } else { 0.0 };
                    found.push((score, [x0, y0, x1, y1]));
                }
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    // a collage's separators cross the whole picture: its cells come first
    let mut kept: Vec<[usize; 4]> = grid_cells(&e.hl, h, w)
        .iter()
        .flat_map(|&(y0, y1)| {
            grid_cells(&e.vl, w, h)
                .into_iter()
                .map(move |(x0, x1)| [x0, y0, x1, y1])
        })
        .collect();
    if kept.len() < 2 || kept.len() > max {
        kept.clear();
    }
    for (_, r) in found {
        if kept.len() == max {
            break;
        }
        if kept.iter().all(|k| iou(k, &r) < 0.7) {
            kept.push(r);
        }
    }
    kept.into_iter()
        .map(|[x0, y0, x1, y1]| {
            [
                x0 as f32 / w as f32,
                y0 as f32 / h as f32,
                (x1 - x0) as f32 / w as f32,
                (y1 - y0) as f32 / h as f32,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A textured picture (a photo stand-in): smooth waves plus a little noise.
    fn texture(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let n = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ seed) % 23;
            let a = ((x as f32 / 17.0 + seed as f32).sin() * 60.0 + 120.0) as u32;
            let b = ((y as f32 / 11.0).cos() * 50.0 + 100.0) as u32;
            Rgb([(a + n) as u8, (b + n) as u8, ((a + b) / 2) as u8])
        })
    }

    fn best_iou(found: &[View], truth: View) -> f32 {
        let px = |v: &View| {
            [
                (v[0] * 1000.0) as usize,
                (v[1] * 1000.0) as usize,
                ((v[0] + v[2]) * 1000.0) as usize,
                ((v[1] + v[3]) * 1000.0) as usize,
            ]
        };
        found
            .iter()
            .map(|f| iou(&px(f), &px(&truth)))
            .fold(0.0, f32::max)
    }

    #[test]
    fn finds_a_photo_pasted_into_another() {
        for (i, (x, y, w, h)) in [(40, 60, 180, 130), (300, 20, 160, 200), (10, 250, 220, 120)]
            .into_iter()
            .enumerate()
        {
            let mut bg = texture(512, 384, i as u32);
            let inset = image::imageops::colorops::huerotate(&texture(w, h, 99), 120);
            image::imageops::overlay(&mut bg, &inset, x as i64, y as i64);
            let found = rectangles(&bg, 6);
            let truth = [
                x as f32 / 512.0,
                y as f32 / 384.0,
                w as f32 / 512.0,
                h as f32 / 384.0,
            ];
            let q = best_iou(&found, truth);
            assert!(q > 0.85, "inset {i}: best IoU {q}, found {found:?}");
        }
    }

    #[test]
    fn finds_the_cells_of_a_collage() {
        let (cw, ch, gap) = (160u32, 120u32, 4u32);
        let mut c = RgbImage::from_pixel(3 * cw + 4 * gap, 2 * ch + 3 * gap, Rgb([255; 3]));
        for k in 0..6 {
            let (x, y) = (gap + (k % 3) * (cw + gap), gap + (k / 3) * (ch + gap));
            image::imageops::overlay(&mut c, &texture(cw, ch, k * 7), x as i64, y as i64);
        }
        let found = rectangles(&c, 8);
        let (w, h) = (c.width() as f32, c.height() as f32);
        for k in 0..6 {
            let (x, y) = (gap + (k % 3) * (cw + gap), gap + (k / 3) * (ch + gap));
            let truth = [x as f32 / w, y as f32 / h, cw as f32 / w, ch as f32 / h];
            let q = best_iou(&found, truth);
            assert!(q > 0.8, "cell {k}: best IoU {q}, found {found:?}");
        }
    }

    #[test]
    fn a_plain_photo_gets_few_or_no_windows() {
        let found = rectangles(&texture(512, 384, 3), 6);
        assert!(found.len() <= 1, "{found:?}");
        assert!(rectangles(&RgbImage::new(10, 10), 6).is_empty());
    }
}
