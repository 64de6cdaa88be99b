//! The mask-evolution picture: rows are sample images, columns are training progress; each
//! tile shows the hierarchy cut (colours) and the mask (masked patches dimmed) at that t.
use super::hierarchy::Grid;
use image::{Rgb, RgbImage};

/// One tile's content.
pub struct Tile<'a> {
    pub image: &'a RgbImage,
    /// Segment label per patch (None: no hierarchy, e.g. random masking).
    pub segments: Option<&'a [u32]>,
    /// 1.0 = masked per patch (None: show the plain image).
    pub mask: Option<&'a [f32]>,
}

/// Render `rows × cols` tiles of `tile` pixels with a 2-pixel white gutter.
pub fn render(tiles: &[Vec<Tile>], grid: Grid, tile: u32) -> RgbImage {
    let rows = tiles.len() as u32;
    let cols = tiles.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols * (tile + gap) + gap,
        rows * (tile + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (r, row) in tiles.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            let img =
                image::imageops::resize(t.image, tile, tile, image::imageops::FilterType::Triangle);
            let (x0, y0) = (gap + c as u32 * (tile + gap), gap + r as u32 * (tile + gap));
            for y in 0..tile {
                for x in 0..tile {
                    let (pr, pc) = (
                        (y as usize * grid.h) / tile as usize,
                        (x as usize * grid.w) / tile as usize,
                    );
                    let p = pr * grid.w + pc;
                    let mut px = img.get_pixel(x, y).0.map(|v| v as f32);
                    if let Some(seg) = t.segments {
                        let col = crate::picture::palette(seg[p]);
                        for k in 0..3 {
                            px[k] = 0.55 * px[k] + 0.45 * col[k] as f32;
                        }
                        // draw segment borders
                        let right = pc + 1 < grid.w
                            && seg[p + 1] != seg[p]
                            && (x + 1) * grid.w as u32 / tile != x * grid.w as u32 / tile;
                        let down = pr + 1 < grid.h
                            && seg[p + grid.w] != seg[p]
                            && (y + 1) * grid.h as u32 / tile != y * grid.h as u32 / tile;
                        if right || down {
                            px = [255.0, 255.0, 255.0];
                        }
                    }
                    if t.mask.is_some_and(|m| m[p] > 0.5) {
                        px = px.map(|v| 0.25 * v + 40.0);
                    }
                    out.put_pixel(x0 + x, y0 + y, Rgb(px.map(|v| v.clamp(0.0, 255.0) as u8)));
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
    fn masked_patches_are_darker() {
        let img = RgbImage::from_pixel(8, 8, Rgb([200, 200, 200]));
        let mask = vec![1.0, 0.0, 0.0, 0.0];
        let g = Grid::square(2);
        let pic = render(
            &[vec![Tile {
                image: &img,
                segments: None,
                mask: Some(&mask),
            }]],
            g,
            16,
        );
        assert_eq!(pic.dimensions(), (20, 20));
        let masked = pic.get_pixel(2 + 3, 2 + 3).0[0];
        let visible = pic.get_pixel(2 + 12, 2 + 12).0[0];
        assert!(masked < visible, "{masked} vs {visible}");
    }
}
