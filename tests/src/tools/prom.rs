//! A strict reader of the Prometheus text exposition format, version 0.0.4: what the shim's
//! `--metrics` serves must parse here. Checked on the way: metric and label names, label
//! value quoting, one HELP and one TYPE per family and before its samples, a family's
//! lines together, values that are floats (or +Inf/-Inf/NaN), counters not negative, and a
//! histogram's buckets cumulative with `le="+Inf"` equal to `_count`, and `_sum` present.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub families: BTreeMap<String, Family>,
}

fn metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("not a value: {s:?}")),
    }
}

/// `{a="x",b="y\"z"}` → labels, and the rest of the line.
fn labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let (name, r) = rest
            .split_once("=\"")
            .ok_or(format!("bad label in {s:?}"))?;
        if !label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut v = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value in {s:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => v.push('\\'),
                    Some((_, '"')) => v.push('"'),
                    Some((_, 'n')) => v.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some((_, c)) => v.push(c),
            }
        };
        if out.insert(name.to_string(), v).is_some() {
            return Err(format!("label {name} twice in {s:?}"));
        }
        rest = &r[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        }
    }
}

/// The family a sample belongs to: `x_bucket`, `x_sum`, `x_count` of a histogram `x`.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families
                .get(base)
                .is_some_and(|f| f.kind == "histogram" || f.kind == "summary")
            {
                return base;
            }
        }
    }
    name
}

pub fn parse(text: &str) -> Result<Metrics, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line does not end with a newline".into());
    }
    let mut m = Metrics::default();
    let mut current: Option<String> = None;
    let mut closed: Vec<String> = Vec::new();
    let mut enter = |name: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(name) {
            if closed.iter().any(|c| c == name) {
                return Err(format!("the lines of {name} are not together"));
            }
            if let Some(c) = current.take() {
                closed.push(c);
            }
            *current = Some(name.to_string());
        }
        Ok(())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (kw, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            match kw {
                "HELP" | "TYPE" => {
                    let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                    if !metric_name(name) {
                        return Err(format!("bad metric name in {line:?}"));
                    }
                    enter(name, &mut current)?;
                    let f = m.families.entry(name.to_string()).or_default();
                    if !f.samples.is_empty() {
                        return Err(format!("{kw} after samples: {line:?}"));
                    }
                    if kw == "HELP" {
                        if f.help.replace(arg.to_string()).is_some() {
                            return Err(format!("two HELP lines for {name}"));
                        }
                    } else {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                            return Err(format!("bad type in {line:?}"));
                        }
                        if !f.kind.is_empty() {
                            return Err(format!("two TYPE lines for {name}"));
                        }
                        f.kind = arg.to_string();
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or(format!("no value: {line:?}"))?;
        let name = &line[..name_end];
        if !metric_name(name) {
            return Err(format!("bad metric name in {line:?}"));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            labels(&line[name_end..])?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut parts = rest.split_whitespace();
        let v = value(parts.next().ok_or(format!("no value: {line:?}"))?)?;
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .map_err(|_| format!("bad timestamp in {line:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("trailing text in {line:?}"));
        }
        let family = family_of(name, &m.families).to_string();
        enter(&family, &mut current)?;
        let f = m.families.entry(family.clone()).or_default();
        if f.kind.is_empty() {
            f.kind = "untyped".into();
        }
        if f.kind == "counter" && (v < 0.0 || v.is_nan()) {
            return Err(format!("negative counter: {line:?}"));
        }
        if f.samples
            .iter()
            .any(|s| s.name == name && s.labels == labels)
        {
            return Err(format!("sample twice: {line:?}"));
        }
        f.samples.push(Sample {
            name: name.to_string(),
            labels,
            value: v,
        });
    }
    for (name, f) in &m.families {
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
    }
    Ok(m)
}

fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for s in f
        .samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
    {
        let le = s
            .labels
            .get("le")
            .ok_or(format!("{name}: bucket without le"))?;
        buckets.push((value(le)?, s.value));
    }
    if buckets
        .windows(2)
        .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
    {
        return Err(format!(
            "{name}: buckets not ascending and cumulative: {buckets:?}"
        ));
    }
    let inf = buckets
        .last()
        .filter(|b| b.0 == f64::INFINITY)
        .ok_or(format!("{name}: no +Inf bucket"))?;
    let sample = |suffix: &str| {
        f.samples
            .iter()
            .find(|s| s.name == format!("{name}{suffix}"))
            .map(|s| s.value)
            .ok_or(format!("{name}: no {name}{suffix}"))
    };
    if sample("_count")? != inf.1 {
        return Err(format!("{name}: _count differs from the +Inf bucket"));
    }
    sample("_sum")?;
    Ok(())
}

impl Metrics {
    /// The value of `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let f = self.families.get(family_of(name, &self.families))?;
        f.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Metrics::get`], panicking if it is not there.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no metric {name}{labels:?} in {:#?}", self.families.keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_format() {
        let m = parse(
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{r=\"x\"} 3\na_total{r=\"y\\\"z\"} 4\n\
             # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n\
             # TYPE g gauge\ng -1.5e3 1700000000000\n",
        )
        .unwrap();
        assert_eq!(m.value("a_total", &[("r", "y\"z")]), 4.0);
        assert_eq!(m.value("h_count", &[]), 2.0);
        assert_eq!(m.value("g", &[]), -1500.0);
        assert_eq!(m.families["a_total"].help.as_deref(), Some("Things."));
    }

    #[test]
    fn refuses_what_prometheus_refuses() {
        for bad in [
            "a 1",                                              // no newline at the end
            "1a 1\n",                                           // name
            "a{1b=\"x\"} 1\n",                                  // label name
            "a{b=\"x} 1\n",                                     // quoting
            "a one\n",                                          // value
            "# TYPE a counter\na -1\n",                         // negative counter
            "# TYPE a counter\n# TYPE a counter\na 1\n",        // two TYPEs
            "a 1\n# TYPE a counter\n",                          // TYPE after samples
            "a 1\nb 1\na{x=\"y\"} 2\n",                         // not together
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
            "a 1\na 2\n",                                       // twice
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
