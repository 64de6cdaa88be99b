//! The mask-evolution picture: rows are images, columns are training progress; each tile shows
//! the image with masked patches turned to flat grey (what the encoder never sees), visible
//! patches in their own colours, and the hierarchy cut outlined in yellow — readable at a
//! glance: whole grey groups late in training are the groups the model found.
use super::hierarchy::Grid;
use crate::draw::{draw_text, text_width};
use image::{Rgb, RgbImage};

/// One tile's content.
pub struct Tile<'a> {
    pub image: &'a RgbImage,
    /// Segment label per patch (None: no hierarchy, e.g. random masking).
    pub segments: Option<&'a [u32]>,
    /// 1.0 = masked per patch (None: show the plain image).
    pub mask: Option<&'a [f32]>,
}

const GAP: u32 = 4;
const HEADER: u32 = 14;
const BORDER: Rgb<u8> = Rgb([255, 214, 0]);

/// Render `rows × cols` tiles of `tile` pixels; `headers` (one per column, may be empty) are
/// written above the columns.
pub fn render(tiles: &[Vec<Tile>], grid: Grid, tile: u32, headers: &[String]) -> RgbImage {
    let rows = tiles.len() as u32;
    let cols = tiles.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let top = if headers.is_empty() {
        GAP
    } else {
        HEADER + GAP
    };
    let mut out = RgbImage::from_pixel(
        cols * (tile + GAP) + GAP,
        top + rows * (tile + GAP),
        Rgb([255, 255, 255]),
    );
    for (c, h) in headers.iter().enumerate() {
        let x0 = GAP + c as u32 * (tile + GAP);
        let x = x0 as i64 + (tile as i64 - text_width(h, 1) as i64).max(0) / 2;
        draw_text(&mut out, x, 3, h, [0, 0, 0], 1);
    }
    // patch of a tile pixel, and whether the pixel lies on a patch edge (for the outlines)
    let patch_of = |x: u32, y: u32| {
        (
            (y as usize * grid.h) / tile as usize,
            (x as usize * grid.w) / tile as usize,
        )
    };
    for (r, row) in tiles.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            let img =
                image::imageops::resize(t.image, tile, tile, image::imageops::FilterType::Triangle);
            let (x0, y0) = (GAP + c as u32 * (tile + GAP), top + r as u32 * (tile + GAP));
            for y in 0..tile {
                for x in 0..tile {
                    let (pr, pc) = patch_of(x, y);
                    let p = pr * grid.w + pc;
                    let mut px = img.get_pixel(x, y).0;
                    if t.mask.is_some_and(|m| m[p] > 0.5) {
                        // masked: flat light grey with a faint trace of the image
                        let lum = (px[0] as u32 * 3 + px[1] as u32 * 6 + px[2] as u32) / 10;
                        px = [(150 + lum / 8) as u8; 3];
                    }
                    if let Some(seg) = t.segments {
                        // a 2-pixel outline along patch edges between different segments:
                        // the pixel's patch differs from the patch one pixel away
                        let (l, r) = (
                            patch_of(x.saturating_sub(1), y),
                            patch_of((x + 1).min(tile - 1), y),
                        );
                        let (u, d) = (
                            patch_of(x, y.saturating_sub(1)),
                            patch_of(x, (y + 1).min(tile - 1)),
                        );
                        let other = |(rr, cc): (usize, usize)| seg[rr * grid.w + cc] != seg[p];
                        let edge = other(l) || other(r) || other(u) || other(d);
                        if edge {
                            px = BORDER.0;
                        }
                    }
                    out.put_pixel(x0 + x, y0 + y, Rgb(px));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_patches_are_grey_and_segments_outlined() {
        let img = RgbImage::from_pixel(8, 8, Rgb([200, 30, 30]));
        let mask = vec![1.0, 0.0, 0.0, 0.0];
        let seg = vec![0, 0, 1, 1];
        let g = Grid::square(2);
        let pic = render(
            &[vec![Tile {
                image: &img,
                segments: Some(&seg),
                mask: Some(&mask),
            }]],
            g,
            16,
            &[],
        );
        assert_eq!(pic.dimensions(), (24, 24));
        let at = |x: u32, y: u32| pic.get_pixel(GAP + x, GAP + y).0;
        let masked = at(3, 3);
        assert_eq!(masked[0], masked[1], "masked patches are grey: {masked:?}");
        assert_eq!(
            at(12, 12),
            [200, 30, 30],
            "visible patches keep their colour"
        );
        // the boundary between the top row (segment 0) and the bottom row (segment 1)
        assert_eq!(at(4, 8), BORDER.0);
        assert_eq!(at(12, 2), [200, 30, 30], "no outline inside a segment");
        // headers add a text row on top
        let with_header = render(
            &[vec![Tile {
                image: &img,
                segments: None,
                mask: None,
            }]],
            g,
            16,
            &["t = 0".into()],
        );
        assert_eq!(with_header.height(), 24 + HEADER);
    }
}
