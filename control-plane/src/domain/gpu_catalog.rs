//! GPU models and their hourly prices, read from a TOML catalog (configs/gpu-catalog.toml).

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GpuType {
    Spot,
    Ondemand,
}

impl GpuType {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuType::Spot => "spot",
            GpuType::Ondemand => "ondemand",
        }
    }

    pub fn parse(s: &str) -> Option<GpuType> {
        s.parse().ok()
    }
}

impl std::str::FromStr for GpuType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spot" => Ok(GpuType::Spot),
            "ondemand" => Ok(GpuType::Ondemand),
            _ => Err(format!("unknown GPU type {s:?}; expected spot or ondemand")),
        }
    }
}

impl std::fmt::Display for GpuType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

super::vocabulary::sql_text!(GpuType);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuOffer {
    pub model: String,
    pub memory_gb: f64,
    pub spot_hourly: f64,
    pub ondemand_hourly: f64,
    /// Dense bf16 peak, in TFLOP/s: what modelled estimates start from.
    #[serde(default)]
    pub bf16_tflops: Option<f64>,
}

impl GpuOffer {
    pub fn hourly(&self, gpu_type: GpuType) -> f64 {
        match gpu_type {
            GpuType::Spot => self.spot_hourly,
            GpuType::Ondemand => self.ondemand_hourly,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuCatalog {
    #[serde(rename = "gpu")]
    pub gpus: Vec<GpuOffer>,
    #[serde(default)]
    pub pricing: Pricing,
}

/// What storing and downloading artifacts costs (GB = 10⁹ bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pricing {
    /// Dollars per GB held for a month (30.4375 days), prorated by the second.
    pub storage_gb_month: f64,
    /// Dollars per GB downloaded through a signed link.
    pub network_gb: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        // S3 Standard and internet egress list prices.
        Pricing {
            storage_gb_month: 0.023,
            network_gb: 0.09,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read GPU catalog {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid GPU catalog {path}: {message}")]
    Invalid { path: String, message: String },
}

const BUILT_IN: &str = include_str!("../../../configs/gpu-catalog.toml");

impl GpuCatalog {
    pub fn load(path: Option<&Path>) -> Result<GpuCatalog, CatalogError> {
        let (name, text) = match path {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            ),
            None => (
                "configs/gpu-catalog.toml (built in)".to_owned(),
                BUILT_IN.to_owned(),
            ),
        };
        let invalid = |message: String| CatalogError::Invalid {
            path: name.clone(),
            message,
        };
        let catalog: GpuCatalog = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if catalog.gpus.is_empty() {
            return Err(invalid("it lists no GPU".into()));
        }
        let pricing = catalog.pricing;
        if !(pricing.storage_gb_month >= 0.0 && pricing.network_gb >= 0.0) {
            return Err(invalid(
                "pricing: storage_gb_month and network_gb must be at least 0".into(),
            ));
        }
        for gpu in &catalog.gpus {
            if !(gpu.spot_hourly >= 0.0 && gpu.ondemand_hourly >= 0.0 && gpu.memory_gb > 0.0) {
                return Err(invalid(format!(
                    "{}: prices and memory must be positive",
                    gpu.model
                )));
            }
        }
        Ok(catalog)
    }

    pub fn find(&self, model: &str) -> Option<&GpuOffer> {
        self.gpus
            .iter()
            .find(|gpu| gpu.model.eq_ignore_ascii_case(model))
    }

    pub fn model_names(&self) -> String {
        self.gpus
            .iter()
            .map(|g| g.model.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_parses() {
        let catalog = GpuCatalog::load(None).expect("built-in catalog");
        let h100 = catalog.find("h100-80gb").expect("H100 listed");
        assert!(h100.hourly(GpuType::Spot) < h100.hourly(GpuType::Ondemand));
    }
}
