//! Prints Serval's CRDs as YAML, or writes one file per CRD with `--out-dir`.
//!
//! `crds/` holds this output; a test fails when it drifts.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out_dir = match (args.next().as_deref(), args.next()) {
        (Some("--out-dir"), Some(dir)) => Some(PathBuf::from(dir)),
        (None, _) => None,
        _ => anyhow::bail!("usage: crdgen [--out-dir DIR]"),
    };
    for crd in serval_api::crd::crds() {
        let yaml = serval_api::crd::crd_yaml(&crd)?;
        match &out_dir {
            Some(dir) => std::fs::write(dir.join(serval_api::crd::crd_file_name(&crd)), yaml)?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
