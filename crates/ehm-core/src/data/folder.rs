//! Image folders: a flat collection, or ImageNet-style `root/<class>/<image>` with labels.
use super::image_io::{has_image_extension, load_rgb};
use super::Dataset;
use crate::error::{Error, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub paths: Vec<PathBuf>,
    labels: Option<Vec<usize>>,
    classes: Vec<String>,
}

/// All image files under `root` (recursive), sorted for a stable order.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        return Err(Error::MissingData(format!(
            "{}: no such folder",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for e in rd {
            let p = e.map_err(|e| Error::io(&dir, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if has_image_extension(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl ImageFolder {
    /// If `root` holds only sub-folders that contain images, they are the classes
    /// (ImageNet layout); otherwise the folder is an unlabelled collection.
    pub fn open(root: &Path) -> Result<Self> {
        let paths = list_images(root)?;
        if paths.is_empty() {
            return Err(Error::MissingData(format!(
                "{}: no images found (jpg, png, webp, bmp, gif)",
                root.display()
            )));
        }
        let top_level_files = paths.iter().any(|p| p.parent() == Some(root));
        let (labels, classes) = if top_level_files {
            (None, vec![])
        } else {
            let mut classes: Vec<String> = paths
                .iter()
                .filter_map(|p| p.strip_prefix(root).ok()?.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            classes.sort();
            classes.dedup();
            let labels = paths
                .iter()
                .map(|p| {
                    let c = p.strip_prefix(root).unwrap().components().next().unwrap();
                    classes
                        .binary_search(&c.as_os_str().to_string_lossy().into_owned())
                        .unwrap()
                })
                .collect();
            (Some(labels), classes)
        };
        Ok(ImageFolder {
            root: root.to_path_buf(),
            paths,
            labels,
            classes,
        })
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        load_rgb(&self.paths[i])
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.labels.as_ref().map(|l| l[i])
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self, i: usize) -> String {
        self.paths[i].display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn imagenet_layout_gives_labels() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("dog/1.png"), 4, 4, 1);
        png(&d.path().join("cat/a.png"), 4, 4, 2);
        png(&d.path().join("cat/b.PNG"), 4, 4, 3);
        std::fs::write(d.path().join("cat/notes.txt"), "x").unwrap();
        let ds = ImageFolder::open(d.path()).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.classes(), &["cat".to_string(), "dog".to_string()]);
        assert_eq!(ds.label(2), Some(1));
        assert_eq!(ds.image(1).unwrap().get_pixel(0, 0).0, [3, 3, 3]);
    }

    #[test]
    fn flat_folder_is_unlabelled_and_bad_images_error() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("x.png"), 3, 3, 9);
        std::fs::write(d.path().join("y.jpg"), b"this is not a jpeg").unwrap();
        let ds = ImageFolder::open(d.path()).unwrap();
        assert_eq!(ds.label(0), None);
        let e = ds.image(1).unwrap_err().to_string();
        assert!(
            e.contains("y.jpg") && e.contains("not a readable image"),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(ImageFolder::open(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no images"));
    }
}
