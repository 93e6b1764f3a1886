//! An ensemble's reduction, pure: its members' rows of one output reduced row by row into one
//! answer (Mean, Max, Vote), or their post-processed labels into one label per row.

use serde_json::{Value, json};
use serval_api::Reduce;

use crate::agreement::RowValues;

/// The index of the largest value, the first on a tie; `None` for an empty row or a NaN.
fn argmax(row: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in row.iter().copied().enumerate() {
        if v.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// The winner of a vote: the most common choice, ties to the one whose first voter is listed
/// first.
fn winner<T: PartialEq + Clone>(choices: &[T]) -> Option<T> {
    let mut best: Option<(usize, &T)> = None;
    for c in choices {
        let n = choices.iter().filter(|d| *d == c).count();
        if best.is_none_or(|(m, _)| n > m) {
            best = Some((n, c));
        }
    }
    best.map(|(_, c)| c.clone())
}

/// Members' tensors (in member order, same rows and row size) reduced row by row: the reduced
/// values and each row's class (its argmax; for a vote, the majority, ties to the first
/// member's). A vote's row is the share of votes per class.
pub fn reduce_tensors(
    members: &[&[f64]],
    rows: usize,
    size: usize,
    how: Reduce,
) -> (Vec<f64>, Vec<Option<usize>>) {
    let n = members.len() as f64;
    let mut out = vec![0.0; rows * size];
    let mut classes = Vec::with_capacity(rows);
    for r in 0..rows {
        let range = r * size..(r + 1) * size;
        let row = &mut out[range.clone()];
        match how {
            Reduce::Mean => {
                for m in members {
                    row.iter_mut()
                        .zip(&m[range.clone()])
                        .for_each(|(o, v)| *o += v / n);
                }
                classes.push(argmax(row));
            }
            Reduce::Max => {
                row.fill(f64::NEG_INFINITY);
                for m in members {
                    row.iter_mut()
                        .zip(&m[range.clone()])
                        .for_each(|(o, v)| *o = o.max(*v));
                }
                classes.push(argmax(row));
            }
            Reduce::Vote => {
                let votes: Vec<Option<usize>> =
                    members.iter().map(|m| argmax(&m[range.clone()])).collect();
                for v in votes.iter().flatten() {
                    row[*v] += 1.0 / n;
                }
                classes.push(winner(&votes).flatten());
            }
        }
    }
    (out, classes)
}

/// Members' post-processed rows (label and score, in member order) reduced row by row: a vote
/// takes the majority label (ties to the first member's) with its voters' mean score; a mean
/// the label with the largest summed score, over the members; a max the highest-scored one.
pub fn reduce_labels(members: &[&[(Value, f64)]], how: Reduce) -> Vec<(Value, f64)> {
    let rows = members.first().map_or(0, |m| m.len());
    let n = members.len() as f64;
    (0..rows)
        .map(|r| {
            let row: Vec<&(Value, f64)> = members.iter().map(|m| &m[r]).collect();
            let labels: Vec<&Value> = row.iter().map(|(l, _)| l).collect();
            let summed = |label: &Value| -> f64 {
                row.iter().filter(|(l, _)| l == label).map(|(_, s)| s).sum()
            };
            match how {
                Reduce::Vote => {
                    let label = winner(&labels).cloned().unwrap_or(Value::Null);
                    let voters = labels.iter().filter(|l| ***l == label).count().max(1);
                    let score = summed(&label) / voters as f64;
                    (label, score)
                }
                Reduce::Mean => {
                    let mut best: Option<(&Value, f64)> = None;
                    for l in &labels {
                        let s = summed(l) / n;
                        if best.is_none_or(|(_, b)| s > b) {
                            best = Some((l, s));
                        }
                    }
                    best.map(|(l, s)| (l.clone(), s))
                        .unwrap_or((Value::Null, 0.0))
                }
                Reduce::Max => row
                    .iter()
                    .fold(None, |best: Option<&(Value, f64)>, c| match best {
                        Some(b) if b.1 >= c.1 => Some(b),
                        _ => Some(c),
                    })
                    .cloned()
                    .unwrap_or((Value::Null, 0.0)),
            }
        })
        .collect()
}

/// The ensemble's answer from its members' answers (in member order, at least one), as JSON:
/// Open Inference Protocol outputs `output` (reduced, FP32) and `label` (each row's class,
/// INT64) when they answered tensors; `{"label", "score"}` or V1 `predictions` when they
/// post-processed. `first` is the first member's answer, whose `model_name` and `id` are kept;
/// `parameters.serval_members` names the members reduced.
pub fn answer(
    first: &Value,
    answers: &[RowValues],
    output: &str,
    how: Reduce,
    members: &[&str],
) -> Result<Value, String> {
    let mut out = match answers.first() {
        Some(RowValues::Tensor { rows, size, .. }) => {
            let (rows, size) = (*rows, *size);
            let values: Vec<&[f64]> = answers
                .iter()
                .map(|a| match a {
                    RowValues::Tensor {
                        rows: r,
                        size: s,
                        values,
                    } if *r == rows && *s == size => Ok(values.as_slice()),
                    _ => Err(format!(
                        "members answered {output:?} in different shapes or kinds"
                    )),
                })
                .collect::<Result<_, _>>()?;
            let (reduced, classes) = reduce_tensors(&values, rows, size, how);
            let shape = if size == 1 && rows > 0 {
                json!([rows])
            } else {
                json!([rows, size])
            };
            let mut outputs = vec![json!({"name": output, "datatype": "FP32", "shape": shape,
                "data": reduced.iter().map(|v| *v as f32).collect::<Vec<_>>()})];
            if output != "label" {
                outputs.push(json!({"name": "label", "datatype": "INT64", "shape": [rows],
                    "data": classes.iter().map(|c| c.map_or(-1, |c| c as i64)).collect::<Vec<_>>()}));
            }
            json!({ "outputs": outputs })
        }
        Some(RowValues::Labels(first_rows)) => {
            let rows: Vec<&[(Value, f64)]> = answers
                .iter()
                .map(|a| match a {
                    RowValues::Labels(l) if l.len() == first_rows.len() => Ok(l.as_slice()),
                    _ => Err("members answered labels for different rows".to_owned()),
                })
                .collect::<Result<_, _>>()?;
            let reduced = reduce_labels(&rows, how);
            let row = |(l, s): &(Value, f64)| json!({"label": l, "score": s});
            if first.get("predictions").is_some() {
                json!({"predictions": reduced.iter().map(row).collect::<Vec<_>>()})
            } else {
                reduced.first().map(row).unwrap_or(Value::Null)
            }
        }
        None => return Err("no member answered".to_owned()),
    };
    if let Some(o) = out.as_object_mut() {
        for key in ["model_name", "model_version", "id"] {
            if let Some(v) = first.get(key) {
                o.insert(key.to_owned(), v.clone());
            }
        }
        o.insert(
            "parameters".to_owned(),
            json!({ "serval_members": members }),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_max_and_vote_reduce_each_row() {
        let a = [0.6, 0.4, 0.1, 0.9];
        let b = [0.2, 0.8, 0.3, 0.7];
        let c = [0.7, 0.3, 0.6, 0.4];
        let members: Vec<&[f64]> = vec![&a, &b, &c];
        let (mean, classes) = reduce_tensors(&members, 2, 2, Reduce::Mean);
        let close = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-9);
        assert!(close(&mean, &[0.5, 0.5, 1.0 / 3.0, 2.0 / 3.0]), "{mean:?}");
        // Row 0 ties at 0.5 each: the first class.
        assert_eq!(classes, vec![Some(0), Some(1)]);
        let (max, classes) = reduce_tensors(&members, 2, 2, Reduce::Max);
        assert_eq!(max, vec![0.7, 0.8, 0.6, 0.9]);
        assert_eq!(classes, vec![Some(1), Some(1)]);
        let (votes, classes) = reduce_tensors(&members, 2, 2, Reduce::Vote);
        assert!(close(&votes, &[2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0]));
        assert_eq!(classes, vec![Some(0), Some(1)]);
    }

    #[test]
    fn a_tied_vote_goes_to_the_first_member() {
        // Three members, three classes, each votes differently: the first member's choice.
        let a = [0.1, 0.1, 0.8];
        let b = [0.9, 0.05, 0.05];
        let c = [0.1, 0.8, 0.1];
        let (_, classes) = reduce_tensors(&[&a, &b, &c], 1, 3, Reduce::Vote);
        assert_eq!(classes, vec![Some(2)]);
        // Two of four against two: still the first member's side.
        let d = [0.1, 0.8, 0.1];
        let e = [0.1, 0.1, 0.8];
        let (_, classes) = reduce_tensors(&[&c, &a, &d, &e], 1, 3, Reduce::Vote);
        assert_eq!(classes, vec![Some(1)]);
    }

    #[test]
    fn post_processed_labels_are_voted_averaged_and_maxed() {
        let l = |s: &str, p: f64| (Value::from(s), p);
        let a = [l("cat", 0.6)];
        let b = [l("dog", 0.9)];
        let c = [l("cat", 0.8)];
        let members: Vec<&[(Value, f64)]> = vec![&a, &b, &c];
        let vote = reduce_labels(&members, Reduce::Vote);
        assert_eq!(vote[0].0, "cat");
        assert!((vote[0].1 - 0.7).abs() < 1e-9);
        let mean = reduce_labels(&members, Reduce::Mean);
        assert_eq!(mean[0].0, "cat");
        assert!((mean[0].1 - 1.4 / 3.0).abs() < 1e-9);
        assert_eq!(reduce_labels(&members, Reduce::Max)[0], l("dog", 0.9));
    }

    #[test]
    fn the_answer_has_the_reduced_output_and_a_label_per_row() {
        let first = json!({"model_name": "digits", "id": "7", "outputs": []});
        let t = |values: Vec<f64>| RowValues::Tensor {
            rows: 2,
            size: 2,
            values,
        };
        let answers = [t(vec![0.9, 0.1, 0.4, 0.6]), t(vec![0.7, 0.3, 0.2, 0.8])];
        let a = answer(&first, &answers, "p", Reduce::Mean, &["a", "b"]).unwrap();
        assert_eq!(a["model_name"], "digits");
        assert_eq!(a["id"], "7");
        assert_eq!(a["outputs"][0]["name"], "p");
        assert_eq!(a["outputs"][0]["shape"], json!([2, 2]));
        assert_eq!(
            a["outputs"][1],
            json!({"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]})
        );
        assert_eq!(a["parameters"]["serval_members"], json!(["a", "b"]));
        let ragged = [
            t(vec![0.9, 0.1, 0.4, 0.6]),
            RowValues::Tensor {
                rows: 1,
                size: 2,
                values: vec![0.5, 0.5],
            },
        ];
        assert!(answer(&first, &ragged, "p", Reduce::Mean, &["a", "b"]).is_err());
    }
}
