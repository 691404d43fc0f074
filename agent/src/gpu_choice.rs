//! Which of the host's GPUs this agent uses, so that a multi-GPU host runs one agent per GPU.
//!
//! CUDA sees the GPUs `CUDA_VISIBLE_DEVICES` lists (all when it is unset) and the trainer
//! trains on the first of them, while NVML, which the telemetry reads, sees every GPU of
//! the host whatever that variable says. So the agent reports only the GPUs CUDA sees, in
//! CUDA's order: the scheduler fits a job to the GPU that will run it, and a step's GPU
//! utilization and memory are that GPU's. The `gpu` setting picks one GPU, by index or by
//! UUID, and sets the variable for the process.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The variable through which CUDA is told which GPUs the process may use.
pub const VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// CUDA numbers GPUs fastest first unless this says PCI bus order, the order of NVML and
/// `nvidia-smi`; the agent asks for the latter so that an index means one GPU everywhere.
const DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";

/// One GPU: its index as `nvidia-smi` numbers it, or its UUID (`GPU-…`, as
/// `nvidia-smi -L` prints it; a unique prefix will do, as for CUDA).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Written", into = "Written")]
pub enum GpuChoice {
    Index(u32),
    Uuid(String),
}

/// How a choice is written in TOML or the environment: a number or a string.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Written {
    Number(i64),
    Text(String),
}

impl FromStr for GpuChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<GpuChoice, String> {
        let text = text.trim();
        if let Ok(index) = text.parse::<u32>() {
            return Ok(GpuChoice::Index(index));
        }
        match text.strip_prefix("GPU-") {
            Some(rest) if !rest.is_empty() && !text.contains(',') => {
                Ok(GpuChoice::Uuid(text.to_owned()))
            }
            _ => Err(format!(
                "gpu: {text:?} is neither a GPU index (0, 1, … as nvidia-smi numbers them) nor \
                 a GPU UUID (GPU-…, as `nvidia-smi -L` prints them)"
            )),
        }
    }
}

impl TryFrom<Written> for GpuChoice {
    type Error = String;

    fn try_from(written: Written) -> Result<GpuChoice, String> {
        match written {
            Written::Number(number) => u32::try_from(number)
                .map(GpuChoice::Index)
                .map_err(|_| format!("gpu: {number} is not a GPU index (0, 1, …)")),
            Written::Text(text) => text.parse(),
        }
    }
}

impl From<GpuChoice> for Written {
    fn from(choice: GpuChoice) -> Written {
        match choice {
            GpuChoice::Index(index) => Written::Number(index.into()),
            GpuChoice::Uuid(uuid) => Written::Text(uuid),
        }
    }
}

impl fmt::Display for GpuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuChoice::Index(index) => write!(f, "{index}"),
            GpuChoice::Uuid(uuid) => f.write_str(uuid),
        }
    }
}

/// Sets the process's CUDA environment for `choice`. Call it first thing in `main`, before
/// any thread starts (the environment is not synchronised, and CUDA reads it once). An
/// operator's own `CUDA_VISIBLE_DEVICES` stands where it is written as `choice` is; written
/// otherwise, even for the same GPU, it is refused rather than guessed at.
pub fn apply(choice: Option<&GpuChoice>) -> Result<(), String> {
    let order = std::env::var_os(DEVICE_ORDER);
    let listed = std::env::var(VISIBLE_DEVICES).ok();
    let visible = visible_devices_for(choice, listed.as_deref())?;
    if order.is_none() {
        std::env::set_var(DEVICE_ORDER, "PCI_BUS_ID");
    }
    if let Some(visible) = visible {
        std::env::set_var(VISIBLE_DEVICES, visible);
    }
    Ok(())
}

/// What `CUDA_VISIBLE_DEVICES` must be set to for `choice`, given what it is (`listed`):
/// `None` to leave it as it is.
fn visible_devices_for(
    choice: Option<&GpuChoice>,
    listed: Option<&str>,
) -> Result<Option<String>, String> {
    let Some(choice) = choice else {
        return Ok(None);
    };
    let wanted = choice.to_string();
    match listed {
        Some(listed) if listed.trim() != wanted => Err(format!(
            "gpu = {wanted:?} and {VISIBLE_DEVICES}={listed:?} in the environment disagree: \
             set one of them"
        )),
        Some(_) => Ok(None),
        None => Ok(Some(wanted)),
    }
}

/// A GPU as NVML lists it.
#[derive(Debug, Clone)]
pub struct HostGpu {
    pub index: u32,
    pub uuid: String,
}

/// The NVML indices of the GPUs CUDA sees, in CUDA's order (its device 0 first), for the
/// host's `gpus` and the value of `CUDA_VISIBLE_DEVICES` (`None`: unset, all of them).
/// CUDA reads the list up to its first entry that names no GPU, or one already named, and
/// so does this; an index is one in PCI bus order (see [`apply`]), a UUID may be a unique
/// prefix. MIG instances are not followed (NVML reports their parent GPU).
pub fn visible(gpus: &[HostGpu], listed: Option<&str>) -> Vec<u32> {
    let Some(listed) = listed else {
        return gpus.iter().map(|gpu| gpu.index).collect();
    };
    let mut seen = Vec::new();
    for entry in listed.split(',').map(str::trim) {
        let named = match entry.parse::<GpuChoice>() {
            Ok(GpuChoice::Index(index)) => gpus.iter().find(|gpu| gpu.index == index),
            Ok(GpuChoice::Uuid(prefix)) => {
                let mut matching = gpus.iter().filter(|gpu| gpu.uuid.starts_with(&prefix));
                match (matching.next(), matching.next()) {
                    (Some(gpu), None) => Some(gpu),
                    _ => None,
                }
            }
            Err(_) => None,
        };
        match named {
            Some(gpu) if !seen.contains(&gpu.index) => seen.push(gpu.index),
            _ => break,
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<HostGpu> {
        ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-bbbc-3", "GPU-dddd-4"]
            .iter()
            .enumerate()
            .map(|(index, uuid)| HostGpu {
                index: index as u32,
                uuid: (*uuid).to_owned(),
            })
            .collect()
    }

    #[test]
    fn unset_shows_every_gpu_and_empty_none() {
        assert_eq!(visible(&host(), None), vec![0, 1, 2, 3]);
        assert_eq!(visible(&host(), Some("")), Vec::<u32>::new());
    }

    #[test]
    fn the_list_gives_cuda_order_by_index_or_uuid_prefix() {
        assert_eq!(visible(&host(), Some("2,0")), vec![2, 0]);
        assert_eq!(visible(&host(), Some("GPU-dddd, 1")), vec![3, 1]);
        assert_eq!(visible(&host(), Some("GPU-bbbc-3")), vec![2]);
    }

    #[test]
    fn the_list_ends_at_an_entry_that_names_no_single_new_gpu() {
        // Past the host's GPUs, an ambiguous prefix, a repeat, a MIG instance, nonsense.
        assert_eq!(visible(&host(), Some("1,7,0")), vec![1]);
        assert_eq!(visible(&host(), Some("0,GPU-bbb,3")), vec![0]);
        assert_eq!(visible(&host(), Some("3,3,0")), vec![3]);
        assert_eq!(visible(&host(), Some("MIG-1234,0")), Vec::<u32>::new());
        assert_eq!(visible(&host(), Some("2,x")), vec![2]);
    }

    #[test]
    fn a_choice_is_an_index_or_a_uuid() {
        assert_eq!("3".parse(), Ok(GpuChoice::Index(3)));
        assert_eq!(
            " GPU-5f2c ".parse(),
            Ok(GpuChoice::Uuid("GPU-5f2c".to_owned()))
        );
        for wrong in ["-1", "gpu0", "GPU-", "0,1", "GPU-a,GPU-b", ""] {
            let error = wrong.parse::<GpuChoice>().expect_err(wrong);
            assert!(error.contains("neither a GPU index"), "{error}");
        }
    }

    #[test]
    fn a_choice_sets_the_variable_unless_the_environment_names_other_gpus() {
        let three = GpuChoice::Index(3);
        assert_eq!(visible_devices_for(None, Some("1")), Ok(None));
        assert_eq!(
            visible_devices_for(Some(&three), None),
            Ok(Some("3".to_owned()))
        );
        assert_eq!(visible_devices_for(Some(&three), Some(" 3")), Ok(None));
        let error = visible_devices_for(Some(&three), Some("0,1")).expect_err("other GPUs");
        assert!(error.contains("gpu = \"3\""), "{error}");
        assert!(error.contains("CUDA_VISIBLE_DEVICES=\"0,1\""), "{error}");
    }
}
