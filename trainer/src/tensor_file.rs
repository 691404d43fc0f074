//! Writing safetensors files as the Python ecosystem expects them: `{"format": "pt"}` in
//! the header (transformers' loaders check it) and the permissions any new file gets
//! (`0666` less the umask), so a serving container running as another user can read
//! them. The safetensors crate writes through a temporary file, which is always `0600`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Result, TrainerError};

/// The umask a file created now would be masked with. Linux reports it in
/// `/proc/self/status`; elsewhere the common default `022` is assumed.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix("Umask:")?.trim();
                u32::from_str_radix(value, 8).ok()
            })
        })
        .unwrap_or(0o022)
}

/// Writes `tensors` to `path` (replacing it atomically) with PyTorch-format metadata.
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| {
        TrainerError::Candle(candle_core::Error::Msg(format!(
            "writing {}: {e}",
            path.display()
        )))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask())).map_err(
        |source| TrainerError::Io {
            path: path.display().to_string(),
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn files_carry_pytorch_metadata_and_the_umask_permissions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("weights.safetensors");
        let tensors = HashMap::from([(
            "w".to_owned(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("tensor"),
        )]);
        save(&tensors, &path).expect("saved");

        let bytes = std::fs::read(&path).expect("read");
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        let metadata = header.metadata().as_ref().expect("metadata");
        assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));

        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o666 & !umask());
    }
}
