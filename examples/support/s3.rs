//! A local S3-compatible server (s3s-fs: real SigV4 checks, objects stored as plain files) and a
//! presigner, for live smoke tests against a running imagegen server. Test credentials only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rusty_s3::actions::S3Action as _;
use rusty_s3::{Bucket, Credentials, UrlStyle};
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "AKIDLOCALSMOKE";
pub const SECRET_KEY: &str = "local/smoke/test/secret";
pub const BUCKET: &str = "images";

pub struct LocalS3 {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub bucket: Bucket,
    pub creds: Credentials,
}

impl LocalS3 {
    /// Serves `root` (bucket folders inside it) on `addr` until the runtime stops.
    pub async fn start(root: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root.join(BUCKET))?;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("s3s-fs root {}: {e:?}", root.display()))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(Self::client(root, addr))
    }

    /// A presigner for a server already running at `addr` over `root`.
    pub fn client(root: &Path, addr: SocketAddr) -> Self {
        let bucket = Bucket::new(
            format!("http://{addr}").parse().expect("url"),
            UrlStyle::Path,
            BUCKET,
            "us-east-1",
        )
        .expect("bucket");
        Self {
            addr,
            root: root.to_path_buf(),
            bucket,
            creds: Credentials::new(ACCESS_KEY, SECRET_KEY),
        }
    }

    /// A presigned PUT URL that signs `content_type`, as production callers do.
    pub fn presign_put(&self, key: &str, content_type: &str) -> String {
        let mut action = self.bucket.put_object(Some(&self.creds), key);
        action.headers_mut().insert("content-type", content_type);
        action.sign(Duration::from_secs(3600)).to_string()
    }

    pub fn presign_get(&self, key: &str) -> String {
        self.bucket
            .get_object(Some(&self.creds), key)
            .sign(Duration::from_secs(3600))
            .to_string()
    }

    /// Where s3s-fs keeps an object.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}
