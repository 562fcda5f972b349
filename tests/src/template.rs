//! `template.yaml` read as data (CloudFormation's short-form tags kept), and its IAM statements
//! evaluated against recorded calls: enough of IAM's rules (Allow statements, `*`/`?`
//! wildcards, a `StringLike` condition on `s3:prefix`) for the policies this template writes.

use serde_yaml::Value;

use crate::recording_proxy::Call;
use crate::workspace_root;

pub struct Template(pub Value);

impl Template {
    pub fn load() -> Self {
        let path = workspace_root().join("template.yaml");
        let text = std::fs::read_to_string(&path).expect("template.yaml");
        Self(serde_yaml::from_str(&text).expect("template.yaml is YAML"))
    }

    pub fn resource(&self, name: &str) -> &Value {
        let resource = &self.0["Resources"][name];
        assert!(!resource.is_null(), "template.yaml has no resource {name}");
        resource
    }

    /// Names of the resources of `kind` (e.g. `AWS::Serverless::Function`).
    pub fn resources_of(&self, kind: &str) -> Vec<String> {
        let resources = self.0["Resources"].as_mapping().expect("Resources");
        resources.iter().filter(|(_, r)| r["Type"] == kind).filter_map(|(name, _)| name.as_str().map(String::from)).collect()
    }

    /// The Allow statements of a serverless function's inline policies or of a role's policies,
    /// with `!Sub`/`!Ref` resolved through `names` (`AWS::Partition` → `aws`, …).
    pub fn statements(&self, resource: &str, names: &[(&str, &str)]) -> Vec<Statement> {
        let properties = &self.resource(resource)["Properties"];
        let documents: Vec<&Value> = properties["Policies"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{resource} has no Policies"))
            .iter()
            .map(|p| if p["PolicyDocument"].is_null() { p } else { &p["PolicyDocument"] })
            .collect();
        documents
            .iter()
            .flat_map(|d| d["Statement"].as_sequence().unwrap_or_else(|| panic!("{resource}: only inline statements are checked")))
            .map(|s| {
                assert_eq!(s["Effect"], "Allow", "{resource}: {s:?}");
                Statement {
                    sid: s["Sid"].as_str().unwrap_or_default().to_string(),
                    actions: strings(&s["Action"], names),
                    resources: strings(&s["Resource"], names),
                    prefixes: (!s["Condition"]["StringLike"]["s3:prefix"].is_null()).then(|| strings(&s["Condition"]["StringLike"]["s3:prefix"], names)),
                }
            })
            .collect()
    }

    /// A function's environment variable names.
    pub fn environment(&self, function: &str) -> Vec<String> {
        let variables = &self.resource(function)["Properties"]["Environment"]["Variables"];
        variables.as_mapping().map_or(Vec::new(), |m| m.keys().filter_map(|k| k.as_str().map(String::from)).collect())
    }
}

#[derive(Debug, Clone)]
pub struct Statement {
    pub sid: String,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
    /// `Condition: StringLike: s3:prefix`, when the statement has one.
    pub prefixes: Option<Vec<String>>,
}

impl Statement {
    fn covers(&self, action: &str, resource: &str, call: &Call) -> bool {
        // Action names are case-insensitive in IAM.
        glob(&action.to_lowercase(), &call.action.to_lowercase())
            && glob(resource, &call.resource)
            && self.prefixes.as_ref().is_none_or(|ps| call.prefix.as_deref().is_some_and(|p| ps.iter().any(|pattern| glob(pattern, p))))
    }

    fn allows(&self, call: &Call) -> bool {
        self.actions.iter().any(|a| self.resources.iter().any(|r| self.covers(a, r, call)))
    }
}

/// Calls none of the statements allow.
pub fn denied(statements: &[Statement], calls: &[Call]) -> Vec<String> {
    calls.iter().filter(|c| !statements.iter().any(|s| s.allows(c))).map(ToString::to_string).collect()
}

/// Grants (statement, action, resource, `s3:prefix` pattern) that none of the calls used,
/// except those `exempt` names by `Sid` and action (each with its reason in the test).
pub fn unused(statements: &[Statement], calls: &[Call], exempt: &[(&str, &str)]) -> Vec<String> {
    let mut unused = Vec::new();
    for s in statements {
        let prefixes: Vec<Option<&String>> = s.prefixes.as_ref().map_or(vec![None], |ps| ps.iter().map(Some).collect());
        for action in s.actions.iter().filter(|a| !exempt.contains(&(s.sid.as_str(), a.as_str()))) {
            for resource in &s.resources {
                for prefix in &prefixes {
                    let narrowed = Statement { prefixes: prefix.map(|p| vec![p.clone()]), ..s.clone() };
                    if !calls.iter().any(|c| narrowed.covers(action, resource, c)) {
                        unused.push(format!("{}: {action} on {resource}{}", s.sid, prefix.map_or(String::new(), |p| format!(" (prefix {p})"))));
                    }
                }
            }
        }
    }
    unused
}

/// A string, a list, `!Sub "…${Name}…"` or `!Ref Name`, resolved through `names`.
pub fn strings(value: &Value, names: &[(&str, &str)]) -> Vec<String> {
    let lookup = |name: &str| names.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()).unwrap_or_else(|| panic!("no value for {name}"));
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items.iter().flat_map(|v| strings(v, names)).collect(),
        Value::Tagged(tagged) if tagged.tag == "!Ref" => vec![lookup(tagged.value.as_str().expect("!Ref Name"))],
        Value::Tagged(tagged) if tagged.tag == "!Sub" => {
            let mut text = tagged.value.as_str().expect("!Sub with a string").to_string();
            while let Some(start) = text.find("${") {
                let end = start + text[start..].find('}').expect("closed ${");
                text.replace_range(start..=end, &lookup(&text[start + 2..end]));
            }
            vec![text]
        }
        other => panic!("unsupported value in a policy: {other:?}"),
    }
}

/// IAM's wildcards: `*` any run of characters, `?` one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}
