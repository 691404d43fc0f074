//! The artifact store: a local directory by default, S3-compatible object storage by
//! configuration, both through `object_store`. Uploads stream through a multipart
//! writer and are hashed on the way, so memory stays flat in the file size and an upload
//! whose SHA-256 does not match never becomes visible.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::configuration::Settings;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact store configuration: {0}")]
    Config(String),
    #[error("the upload exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the upload's SHA-256 is {actual}, not the declared {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("the upload was interrupted: {0}")]
    Body(String),
}

#[derive(Clone, Debug)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

pub struct Download {
    pub size: u64,
    pub bytes: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

impl ArtifactStore {
    pub fn open(settings: &Settings) -> Result<ArtifactStore, StorageError> {
        match &settings.storage.url {
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| StorageError::Config(format!("storage.url {url:?}: {e}")))?;
                // Credentials, region and endpoint come from the usual AWS_* variables.
                let options = std::env::vars()
                    .filter(|(key, _)| key.starts_with("AWS_"))
                    .map(|(key, value)| (key.to_ascii_lowercase(), value));
                let (store, prefix) = object_store::parse_url_opts(&parsed, options)?;
                Ok(ArtifactStore {
                    store: Arc::from(store),
                    prefix: prefix.to_string(),
                })
            }
            None => {
                let dir = settings.artifacts_dir();
                std::fs::create_dir_all(&dir).map_err(|e| {
                    StorageError::Config(format!("cannot create {}: {e}", dir.display()))
                })?;
                Ok(ArtifactStore {
                    store: Arc::new(LocalFileSystem::new_with_prefix(&dir)?),
                    prefix: String::new(),
                })
            }
        }
    }

    fn path(&self, key: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(key)
        } else {
            StorePath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Streams `body` to `key`, refusing more than `max_bytes` and any content whose
    /// SHA-256 is not `expected_sha256`. Returns the size.
    pub async fn put_verified<E: std::fmt::Display>(
        &self,
        key: &str,
        mut body: impl futures::Stream<Item = Result<Bytes, E>> + Unpin,
        max_bytes: u64,
        expected_sha256: &str,
    ) -> Result<u64, StorageError> {
        let upload = self.store.put_multipart(&self.path(key)).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let copied: Result<(), StorageError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| StorageError::Body(e.to_string()))?;
                size += chunk.len() as u64;
                if size > max_bytes {
                    return Err(StorageError::TooLarge(max_bytes));
                }
                hasher.update(&chunk);
                writer.wait_for_capacity(4).await?;
                writer.write(&chunk);
            }
            Ok(())
        }
        .await;
        if let Err(error) = copied {
            let _ = writer.abort().await;
            return Err(error);
        }
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(expected_sha256) {
            let _ = writer.abort().await;
            return Err(StorageError::ChecksumMismatch {
                expected: expected_sha256.to_owned(),
                actual,
            });
        }
        writer.finish().await?;
        Ok(size)
    }

    pub async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let result = self.store.get(&self.path(key)).await?;
        let size = result.meta.size;
        let bytes = result
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed();
        Ok(Download { size, bytes })
    }

    pub async fn delete(&self, key: &str) {
        if let Err(error) = self.store.delete(&self.path(key)).await {
            tracing::warn!(%error, key, "could not delete an artifact object");
        }
    }
}
