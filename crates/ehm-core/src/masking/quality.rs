//! How good a hierarchy is: the standard superpixel scores of one cut (a partition of the
//! patch grid) against an exact per-pixel object map — the Tux Paint composite set of
//! `ehm-train make-segdata`, whose masks are the stamps' own alpha channels.
//!
//! - **ASA** (achievable segmentation accuracy): label every segment with the object it
//!   overlaps most; the fraction of pixels that gets right. 1 = no segment straddles objects.
//! - **Boundary recall**: the fraction of object-boundary pixels that lie within `tolerance`
//!   pixels of a segment boundary (segments live on the patch grid, so the tolerance is half a
//!   patch: a boundary anywhere inside a patch row counts if the cut splits there).
//! - **Best IoU**: per object (each class present, background excluded), the IoU of the single
//!   segment that covers it best; averaged over objects. 1 = some segment *is* the object.
//!
//! Each score is computed for the cut at a given segment count and compared with a fixed grid
//! partition of (about) the same count and with an untrained teacher's cut: a hierarchy that
//! follows objects scores above both.
use super::hierarchy::Grid;
use image::GrayImage;
use serde::{Deserialize, Serialize};

/// Scores of one partition against one object map (each in [0, 1]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub asa: f64,
    pub boundary_recall: f64,
    pub best_iou: f64,
}

impl Scores {
    /// The mean of several images' scores.
    pub fn mean(all: &[Scores]) -> Scores {
        let n = all.len().max(1) as f64;
        Scores {
            asa: all.iter().map(|s| s.asa).sum::<f64>() / n,
            boundary_recall: all.iter().map(|s| s.boundary_recall).sum::<f64>() / n,
            best_iou: all.iter().map(|s| s.best_iou).sum::<f64>() / n,
        }
    }
}

/// Score the patch partition `labels` (row-major over `grid`) against `truth` (class per pixel,
/// any size; `ignore` pixels are left out; class 0 is background).
pub fn score(labels: &[u32], grid: Grid, truth: &GrayImage, ignore: u8) -> Scores {
    let (w, h) = (truth.width() as usize, truth.height() as usize);
    let segment = |x: usize, y: usize| labels[(y * grid.h / h) * grid.w + x * grid.w / w] as usize;
    let nseg = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let t = truth.as_raw();
    // overlap[s][c]: pixels of segment s with class c
    let mut overlap = vec![[0u32; 256]; nseg];
    let mut valid = 0u64;
    for y in 0..h {
        for x in 0..w {
            let c = t[y * w + x];
            if c != ignore {
                overlap[segment(x, y)][c as usize] += 1;
                valid += 1;
            }
        }
    }
    let asa = overlap
        .iter()
        .map(|o| *o.iter().max().unwrap() as u64)
        .sum::<u64>() as f64
        / valid.max(1) as f64;

    // boundary recall: object boundaries (a right/down neighbour of another class) near a
    // segment boundary
    let tol = (w / grid.w).max(h / grid.h).div_ceil(2).max(1);
    let mut seg_edge = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let s = segment(x, y);
            if (x + 1 < w && segment(x + 1, y) != s) || (y + 1 < h && segment(x, y + 1) != s) {
                seg_edge[y * w + x] = true;
            }
        }
    }
    let near_edge = |x: usize, y: usize| {
        let (x0, x1) = (x.saturating_sub(tol), (x + tol).min(w - 1));
        let (y0, y1) = (y.saturating_sub(tol), (y + tol).min(h - 1));
        (y0..=y1).any(|yy| (x0..=x1).any(|xx| seg_edge[yy * w + xx]))
    };
    let (mut edges, mut recalled) = (0u64, 0u64);
    for y in 0..h {
        for x in 0..w {
            let c = t[y * w + x];
            if c == ignore {
                continue;
            }
            let differs = |xx: usize, yy: usize| {
                let d = t[yy * w + xx];
                d != ignore && d != c
            };
            if (x + 1 < w && differs(x + 1, y)) || (y + 1 < h && differs(x, y + 1)) {
                edges += 1;
                recalled += near_edge(x, y) as u64;
            }
        }
    }
    let boundary_recall = if edges == 0 {
        1.0
    } else {
        recalled as f64 / edges as f64
    };

    // best IoU per object class present
    let mut class_px = [0u64; 256];
    for o in &overlap {
        for (c, &v) in o.iter().enumerate() {
            class_px[c] += v as u64;
        }
    }
    let seg_px: Vec<u64> = overlap
        .iter()
        .map(|o| o.iter().map(|&v| v as u64).sum())
        .collect();
    let objects: Vec<usize> = (1..256)
        .filter(|&c| c != ignore as usize && class_px[c] > 0)
        .collect();
    let best_iou = if objects.is_empty() {
        1.0
    } else {
        objects
            .iter()
            .map(|&c| {
                (0..nseg)
                    .map(|s| {
                        let inter = overlap[s][c] as f64;
                        inter / (seg_px[s] as f64 + class_px[c] as f64 - inter)
                    })
                    .fold(0.0, f64::max)
            })
            .sum::<f64>()
            / objects.len() as f64
    };
    Scores {
        asa,
        boundary_recall,
        best_iou,
    }
}

/// A fixed partition of the grid into about `count` near-square blocks (the baseline a
/// hierarchy must beat): `round(√count)` rows of blocks, as many columns as needed.
pub fn grid_partition(grid: Grid, count: usize) -> Vec<u32> {
    let rows = ((count as f64).sqrt().round() as usize).clamp(1, grid.h);
    let cols = count.div_ceil(rows).clamp(1, grid.w);
    (0..grid.n())
        .map(|i| {
            let (r, c) = (i / grid.w, i % grid.w);
            ((r * rows / grid.h) * cols + c * cols / grid.w) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32×32 map: background with a 16×16 object (class 3) at the top left.
    fn square_object() -> GrayImage {
        GrayImage::from_fn(32, 32, |x, y| {
            image::Luma([if x < 16 && y < 16 { 3 } else { 0 }])
        })
    }

    #[test]
    fn a_partition_that_is_the_object_scores_one() {
        let g = Grid::square(4); // patches of 8×8 pixels
        let exact: Vec<u32> = (0..16)
            .map(|i| ((i / 4) < 2 && (i % 4) < 2) as u32)
            .collect();
        let s = score(&exact, g, &square_object(), 255);
        assert_eq!((s.asa, s.boundary_recall, s.best_iou), (1.0, 1.0, 1.0));
    }

    #[test]
    fn a_partition_across_the_object_scores_lower() {
        let g = Grid::square(4);
        // one segment covering the left half (object + background below it), one the right
        let halves: Vec<u32> = (0..16).map(|i| (i % 4 >= 2) as u32).collect();
        let s = score(&halves, g, &square_object(), 255);
        assert!((s.asa - 0.75).abs() < 1e-12, "{s:?}"); // the object's 256 px lost in the left half
        assert!((s.best_iou - 0.5).abs() < 1e-12, "{s:?}"); // 256 / 512
        assert!(s.boundary_recall < 1.0 && s.boundary_recall > 0.0, "{s:?}");
        // one segment: the object cannot be told apart at all
        let one = vec![0u32; 16];
        let s1 = score(&one, g, &square_object(), 255);
        assert_eq!(s1.boundary_recall, 0.0);
        assert!((s1.best_iou - 0.25).abs() < 1e-12);
    }

    #[test]
    fn ignored_pixels_do_not_count() {
        let g = Grid::square(4);
        let mut t = square_object();
        for x in 16..32 {
            for y in 0..32 {
                t.put_pixel(x, y, image::Luma([255]));
            }
        }
        let halves: Vec<u32> = (0..16).map(|i| (i % 4 >= 2) as u32).collect();
        // the left half holds 256 object + 256 background pixels; the right half is ignored
        assert!((score(&halves, g, &t, 255).asa - 0.5).abs() < 1e-12);
    }

    #[test]
    fn grid_partitions_have_about_the_asked_count() {
        let g = Grid::square(8);
        for (count, want) in [(1, 1), (4, 4), (8, 9), (16, 16), (64, 64)] {
            let p = grid_partition(g, count);
            let k = *p.iter().max().unwrap() as usize + 1;
            assert!(k == want || k == count, "{count}: {k}");
            assert!(super::super::hierarchy::is_contiguous_partition(&p, g));
        }
    }
}
