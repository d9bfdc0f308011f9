//! A local S3-compatible server for trying the API by hand and for `scripts/check-vastai-readme.sh`.
//!
//!   cargo run --example local_s3 -- serve --root /tmp/s3 --port 9000
//!   cargo run --example local_s3 -- presign-put --port 9000 out.png image/png
//!   cargo run --example local_s3 -- presign-get --port 9000 ref.png
//!
//! Objects are plain files under `<root>/images/`. Test credentials only; never expose it.

#[path = "support/s3.rs"]
#[allow(dead_code)] // shared with api_smoke, which reads objects back
mod s3;

use std::net::SocketAddr;
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: local_s3 serve --root DIR --port P\n       \
         local_s3 presign-put --port P KEY CONTENT_TYPE\n       \
         local_s3 presign-get --port P KEY"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut root = PathBuf::from("/tmp/imagegen-s3");
    let mut port = 9000u16;
    let mut rest = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--root" => root = it.next().unwrap_or_else(|| usage()).into(),
            "--port" => port = it.next().unwrap_or_else(|| usage()).parse()?,
            _ => rest.push(a.clone()),
        }
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match (args.first().map(String::as_str), rest.as_slice()) {
        (Some("serve"), []) => {
            let s3 = s3::LocalS3::start(&root, addr).await?;
            println!(
                "local S3 on http://{} (bucket '{}', root {})",
                s3.addr,
                s3::BUCKET,
                root.display()
            );
            tokio::signal::ctrl_c().await?;
        }
        (Some("presign-put"), [key, ct]) => {
            println!("{}", s3::LocalS3::client(&root, addr).presign_put(key, ct))
        }
        (Some("presign-get"), [key]) => {
            println!("{}", s3::LocalS3::client(&root, addr).presign_get(key))
        }
        _ => usage(),
    }
    Ok(())
}
