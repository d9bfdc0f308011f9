//! Downloads of user-supplied URLs (reference images, /upscale input): one shared client,
//! redirects followed by hand and re-checked, a byte cap while streaming, and one deadline for
//! the whole download (every hop and the body): reqwest's own timeout is per request, so a
//! redirect chain could otherwise take `max_redirects + 1` times the limit.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{StatusCode, header};
use url::Url;

use super::ssrf::{UrlPolicy, UrlRefused, guarded_client, redact};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL '{url}': {message}")]
    InvalidUrl { url: String, message: String },
    #[error("{0}")]
    Refused(#[from] UrlRefused),
    #[error("HTTP {status} fetching {url}")]
    Status { status: StatusCode, url: String },
    #[error("more than {max} redirects fetching {url}")]
    TooManyRedirects { max: u32, url: String },
    #[error("redirect without a valid Location from {url}")]
    BadRedirect { url: String },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    /// The whole download (all hops and the body) ran past its deadline.
    #[error(
        "download of {url} ran past its total deadline of {}s (DOWNLOAD_TIMEOUT_SECS) after {hops} redirect(s), {stage}",
        limit.as_secs_f64()
    )]
    Deadline {
        url: String,
        limit: Duration,
        hops: u32,
        /// What it was doing: "waiting for an answer" or "reading the body".
        stage: &'static str,
    },
}

/// Limits and policy of the downloader.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub timeout: Duration,
    pub max_bytes: u64,
    pub max_redirects: u32,
    pub policy: UrlPolicy,
}

/// The shared downloader.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    config: FetchConfig,
}

impl Fetcher {
    pub fn new(config: FetchConfig) -> anyhow::Result<Self> {
        let client = guarded_client(config.timeout, config.policy)?;
        Ok(Self { client, config })
    }

    /// GETs `url` and returns the body, following at most `max_redirects` redirects, all
    /// within one deadline of `timeout`.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let mut current = Url::parse(url).map_err(|e| FetchError::InvalidUrl {
            url: redact(url).to_string(),
            message: e.to_string(),
        })?;
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let expired = |hops: u32, stage: &'static str| FetchError::Deadline {
            url: redact(url).to_string(),
            limit: self.config.timeout,
            hops,
            stage,
        };
        let mut hops = 0;
        loop {
            self.config.policy.check_url(&current)?;
            let shown = redact(current.as_str()).to_string();
            let response =
                tokio::time::timeout_at(deadline, self.client.get(current.clone()).send())
                    .await
                    .map_err(|_| expired(hops, "waiting for an answer"))?
                    .map_err(|e| transport_error(&shown, &e))?;
            let status = response.status();
            if status.is_redirection() {
                hops += 1;
                if hops > self.config.max_redirects {
                    return Err(FetchError::TooManyRedirects {
                        max: self.config.max_redirects,
                        url: shown,
                    });
                }
                let next = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|loc| current.join(loc).ok())
                    .ok_or(FetchError::BadRedirect { url: shown })?;
                current = next;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status { status, url: shown });
            }
            return tokio::time::timeout_at(deadline, self.read_capped(response, shown))
                .await
                .map_err(|_| expired(hops, "reading the body"))?;
        }
    }

    async fn read_capped(
        &self,
        response: reqwest::Response,
        url: String,
    ) -> Result<Vec<u8>, FetchError> {
        let limit = self.config.max_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(FetchError::TooLarge { url, limit });
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| transport_error(&url, &e))?;
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(FetchError::TooLarge { url, limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// reqwest's error text without the URL (which may carry a presigned query), plus the root cause.
fn transport_error(url: &str, e: &reqwest::Error) -> FetchError {
    FetchError::Transport {
        url: url.to_string(),
        message: describe_reqwest_error(e),
    }
}

pub(crate) fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "error reading body"
    } else {
        "error"
    };
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    if std::ptr::eq(
        root as *const dyn std::error::Error as *const u8,
        e as *const reqwest::Error as *const u8,
    ) {
        kind.to_string()
    } else {
        format!("{kind}: {root}")
    }
}
