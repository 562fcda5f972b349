//! CloudWatch Embedded Metric Format: one JSON object per line on stdout, with an `_aws`
//! member that declares which of its fields are metrics and which are dimensions.
//! <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>

use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Seconds,
    Milliseconds,
    Bytes,
    BytesPerSecond,
    CountPerSecond,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Seconds => "Seconds",
            Unit::Milliseconds => "Milliseconds",
            Unit::Bytes => "Bytes",
            Unit::BytesPerSecond => "Bytes/Second",
            Unit::CountPerSecond => "Count/Second",
        }
    }
}

/// One EMF record: metrics sharing a namespace and a set of dimensions.
#[derive(Debug, Clone)]
pub struct Metrics {
    namespace: String,
    dimensions: Vec<(String, String)>,
    values: Vec<(String, f64, Unit)>,
    properties: Map<String, Value>,
}

impl Metrics {
    pub fn new(namespace: &str) -> Self {
        Self { namespace: namespace.into(), dimensions: Vec::new(), values: Vec::new(), properties: Map::new() }
    }

    pub fn dimension(mut self, name: &str, value: &str) -> Self {
        self.dimensions.push((name.into(), value.into()));
        self
    }

    pub fn metric(mut self, name: &str, value: f64, unit: Unit) -> Self {
        self.values.push((name.into(), value, unit));
        self
    }

    /// A searchable field that is not a metric (e.g. a request id).
    pub fn property(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    pub fn to_json(&self, timestamp_ms: u128) -> Value {
        let mut record = self.properties.clone();
        for (name, value) in &self.dimensions {
            record.insert(name.clone(), json!(value));
        }
        for (name, value, _) in &self.values {
            record.insert(name.clone(), json!(value));
        }
        let dimension_names: Vec<&str> = self.dimensions.iter().map(|(n, _)| n.as_str()).collect();
        let metrics: Vec<Value> = self.values.iter().map(|(n, _, u)| json!({"Name": n, "Unit": u.name()})).collect();
        record.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms as u64,
                "CloudWatchMetrics": [{"Namespace": self.namespace, "Dimensions": [dimension_names], "Metrics": metrics}],
            }),
        );
        Value::Object(record)
    }

    /// Writes the record as one line on stdout, where Lambda's log agent picks it up.
    pub fn emit(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        println!("{}", self.to_json(now.as_millis()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_declares_its_metrics_and_dimensions() {
        let record = Metrics::new("llm-serverless")
            .dimension("Function", "quantize")
            .metric("InputBytes", 1024.0, Unit::Bytes)
            .property("model", "tiny")
            .to_json(1_700_000_000_000);
        assert_eq!(record["Function"], "quantize");
        assert_eq!(record["InputBytes"], 1024.0);
        assert_eq!(record["model"], "tiny");
        let directive = &record["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "llm-serverless");
        assert_eq!(directive["Dimensions"], json!([["Function"]]));
        assert_eq!(directive["Metrics"], json!([{"Name": "InputBytes", "Unit": "Bytes"}]));
        assert_eq!(record["_aws"]["Timestamp"], 1_700_000_000_000u64);
    }
}
