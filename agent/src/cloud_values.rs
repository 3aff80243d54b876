//! Reading cloud-config values in the loose forms cloud-init accepts, shared
//! by the modules that parse its keys ([`crate::users`], [`crate::os_config`]).

use serde_json::Value;

/// A string or a list of strings (`groups: docker` or `groups: [docker]`);
/// absent, null or `false` is none. `what` names the key in errors.
pub fn string_list(v: Option<&Value>, what: &str) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what} entries must be strings"))
            })
            .collect(),
        Some(_) => Err(format!("{what} must be a string or a list of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_many_or_none() {
        assert_eq!(string_list(Some(&json!("a")), "k").unwrap(), ["a"]);
        assert_eq!(
            string_list(Some(&json!(["a", "b"])), "k").unwrap(),
            ["a", "b"]
        );
        assert!(string_list(None, "k").unwrap().is_empty());
        assert!(string_list(Some(&json!(false)), "k").unwrap().is_empty());
        assert!(string_list(Some(&json!([1])), "k")
            .unwrap_err()
            .contains("k entries"));
        assert!(string_list(Some(&json!({"a": 1})), "k").is_err());
    }
}
