//! Outbound I/O: SSRF-safe downloads, presigned uploads, image decoding and encoding.

pub mod codecs;
pub mod fetch;
pub mod ssrf;
pub mod upload;

pub use codecs::{CodecError, OutputFormat, decode_rgb, encode};
pub use fetch::{FetchConfig, FetchError, Fetcher};
pub use ssrf::UrlPolicy;
pub use upload::{UploadConfig, UploadError, UploadReport, Uploader, output_url};
