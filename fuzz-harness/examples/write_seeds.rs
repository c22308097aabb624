//! Writes every target's seeds into `fuzz/corpus/<target>/seed-<n>` (used by `scripts/fuzz`
//! before a run; existing files are left alone).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for t in fuzz_harness::TARGETS {
        let dir = corpus.join(t.name);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in fuzz_harness::seeds::seeds(t.name).iter().enumerate() {
            let path = dir.join(format!("seed-{i}"));
            if !path.exists() {
                std::fs::write(&path, seed)?;
            }
        }
    }
    Ok(())
}
