//! One error type for the library. Every message names the file (or flag) and what is wrong,
//! so the tools can print it as one line and exit non-zero.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be (truncated, wrong magic, ...).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// An image that cannot be decoded.
    #[error("{path}: not a readable image ({msg})")]
    BadImage { path: PathBuf, msg: String },
    /// Expected data that is not there (a data set not set up, an empty folder, ...).
    #[error("{0}")]
    MissingData(String),
    /// A configuration value that makes no sense.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Tensor shapes or model files that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// Training went wrong in a way the user must see (non-finite loss, ...).
    #[error("{0}")]
    Training(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: one_line(&msg.into()),
        }
    }
    pub fn bad_image(path: impl AsRef<Path>, msg: impl ToString) -> Self {
        Error::BadImage {
            path: path.as_ref().to_path_buf(),
            msg: one_line(&msg.to_string()),
        }
    }
}

/// Decoder messages sometimes span lines; a user gets one line per problem.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Attach the path to an io::Error.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
