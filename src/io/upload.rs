//! Uploads to presigned S3 PUT URLs: a sized body (S3 refuses chunked uploads), the format's
//! Content-Type (it is usually part of the signature), no redirects, bounded retries.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{StatusCode, header};
use url::Url;

use super::fetch::describe_reqwest_error;
use super::ssrf::{UrlPolicy, UrlRefused, guarded_client, redact};

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("invalid upload URL '{url}': {message}")]
    InvalidUrl { url: String, message: String },
    #[error("{0}")]
    Refused(#[from] UrlRefused),
    #[error("upload to {url} failed: HTTP {status}{detail}")]
    Status {
        status: StatusCode,
        url: String,
        /// The S3 error code, when the body has one (e.g. ": SignatureDoesNotMatch").
        detail: String,
    },
    #[error("upload to {url} failed after {attempts} attempts: {message}")]
    Transport {
        url: String,
        attempts: u32,
        message: String,
    },
    /// The whole upload (every attempt and backoff wait) ran past its deadline.
    #[error(
        "upload to {url} ran past its total deadline of {}s (UPLOAD_DEADLINE_SECS) in attempt {attempts}; last error: {last}",
        limit.as_secs_f64()
    )]
    Deadline {
        url: String,
        limit: Duration,
        attempts: u32,
        last: String,
    },
}

#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// Per attempt.
    pub timeout: Duration,
    /// For the whole upload: every attempt and every backoff wait.
    pub deadline: Duration,
    pub retries: u32,
    pub retry_base: Duration,
    pub policy: UrlPolicy,
}

/// The shared uploader.
#[derive(Debug, Clone)]
pub struct Uploader {
    client: reqwest::Client,
    config: UploadConfig,
}

/// What an upload did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReport {
    pub retries: u32,
}

impl Uploader {
    pub fn new(config: UploadConfig) -> anyhow::Result<Self> {
        let client = guarded_client(config.timeout, config.policy)?;
        Ok(Self { client, config })
    }

    /// PUTs `body` to `url`. Retries connection errors, timeouts and 5xx with exponential
    /// backoff; a 3xx or 4xx answer fails at once (retrying cannot fix a bad signature). All of
    /// it happens within one deadline (`deadline`); each attempt also has its own `timeout`.
    pub async fn put(
        &self,
        url: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<UploadReport, UploadError> {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let last = std::sync::Mutex::new(String::from("none yet"));
        let limit = self.config.deadline;
        match tokio::time::timeout(
            limit,
            self.put_retrying(url, body, content_type, &attempts, &last),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(UploadError::Deadline {
                url: redact(url).to_string(),
                limit,
                attempts: attempts.load(std::sync::atomic::Ordering::Relaxed),
                last: last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            }),
        }
    }

    async fn put_retrying(
        &self,
        url: &str,
        body: Bytes,
        content_type: &str,
        attempts: &std::sync::atomic::AtomicU32,
        last: &std::sync::Mutex<String>,
    ) -> Result<UploadReport, UploadError> {
        let shown = redact(url).to_string();
        let parsed = Url::parse(url).map_err(|e| UploadError::InvalidUrl {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        self.config.policy.check_url(&parsed)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            attempts.store(attempt, std::sync::atomic::Ordering::Relaxed);
            let result = self
                .client
                .put(parsed.clone())
                .header(header::CONTENT_TYPE, content_type)
                .body(body.clone())
                .send()
                .await;
            let retryable_message = match result {
                Ok(resp) if resp.status().is_success() => {
                    return Ok(UploadReport {
                        retries: attempt - 1,
                    });
                }
                Ok(resp) if resp.status().is_server_error() => {
                    format!("HTTP {}", resp.status())
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(UploadError::Status {
                        status,
                        url: shown,
                        detail: s3_error_code(&text)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default(),
                    });
                }
                Err(e) if e.is_builder() => {
                    return Err(UploadError::InvalidUrl {
                        url: shown,
                        message: describe_reqwest_error(&e),
                    });
                }
                Err(e) => describe_reqwest_error(&e),
            };
            retryable_message.clone_into(&mut last.lock().unwrap_or_else(|p| p.into_inner()));
            if attempt > self.config.retries {
                return Err(UploadError::Transport {
                    url: shown,
                    attempts: attempt,
                    message: retryable_message,
                });
            }
            let delay = self.config.retry_base * 2u32.saturating_pow(attempt - 1);
            tracing::warn!(url = %shown, attempt, error = %retryable_message, "upload failed, retrying in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }
}

/// `<Code>...</Code>` from an S3 XML error body.
fn s3_error_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let end = start + body[start..].find("</Code>")?;
    Some(&body[start..end])
}

/// The URL to report for an uploaded object: everything before the first `?`, as the original.
pub fn output_url(upload_url: &str) -> String {
    upload_url
        .split_once('?')
        .map_or(upload_url, |(head, _)| head)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_url_strips_the_query_only() {
        assert_eq!(
            output_url("https://b.s3.amazonaws.com/a/b.png?X-Amz-Signature=1&x=2"),
            "https://b.s3.amazonaws.com/a/b.png"
        );
        assert_eq!(output_url("http://h/k#f"), "http://h/k#f");
    }

    #[test]
    fn s3_error_codes_are_extracted() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code></Error>";
        assert_eq!(s3_error_code(body), Some("SignatureDoesNotMatch"));
        assert_eq!(s3_error_code("nope"), None);
    }
}
