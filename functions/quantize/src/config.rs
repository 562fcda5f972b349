//! The function's settings, read once from the environment in `main`.

use llm_convert::QuantType;

#[derive(Debug, Clone)]
pub struct Config {
    /// Types converted when the job file lists none (`QUANTIZE_DEFAULT_TYPES`, comma-separated).
    pub default_types: Vec<QuantType>,
    /// Conservative conversion speed in MiB of input per second per type
    /// (`QUANTIZE_MIB_PER_SECOND`): a job whose estimate does not fit the time left is refused.
    pub mib_per_second: f64,
    /// The function's memory (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, MB); `None` outside Lambda.
    pub memory_mb: Option<u64>,
    /// Multipart upload part size (`QUANTIZE_PART_MIB`).
    pub part_size: usize,
}

/// Measured here at 79–172 MiB/s on 2 cores (q4_k_m to q4_0); a Lambda function's vCPUs are
/// slower and fewer at small memory sizes.
const DEFAULT_MIB_PER_SECOND: f64 = 40.0;
const DEFAULT_TYPES: &str = "q4_k_m,q8_0";

impl Default for Config {
    fn default() -> Self {
        Self { default_types: parse_types(DEFAULT_TYPES).unwrap_or_default(), mib_per_second: DEFAULT_MIB_PER_SECOND, memory_mb: None, part_size: 64 << 20 }
    }
}

impl Config {
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str| -> Result<Option<f64>, String> {
            var(name).map(|v| v.trim().parse::<f64>().ok().filter(|x| *x > 0.0).ok_or_else(|| format!("{name}=`{v}` is not a positive number"))).transpose()
        };
        let defaults = Self::default();
        Ok(Self {
            default_types: match var("QUANTIZE_DEFAULT_TYPES") {
                Some(list) => parse_types(&list)?,
                None => defaults.default_types,
            },
            mib_per_second: number("QUANTIZE_MIB_PER_SECOND")?.unwrap_or(defaults.mib_per_second),
            memory_mb: number("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")?.map(|mb| mb as u64),
            part_size: number("QUANTIZE_PART_MIB")?.map_or(defaults.part_size, |mib| (mib as usize) << 20),
        })
    }
}

/// `q4_k_m,q8_0` → types, in order, without repeats.
pub fn parse_types(list: &str) -> Result<Vec<QuantType>, String> {
    let mut types = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let t: QuantType = name.parse().map_err(|e: llm_convert::ConvertError| e.to_string())?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    if types.is_empty() {
        return Err("no types listed".into());
    }
    Ok(types)
}
