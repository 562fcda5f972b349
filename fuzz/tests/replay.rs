//! Every committed fuzzing input — the corpus each target reached, and the inputs that once
//! crashed one (`regressions/`) — replayed through its target: none may panic. The seeds
//! (`seed-*`, infra/fuzz/seeds.sh) must also be accepted, or the fuzzer would only ever explore
//! the first check that rejects them; the hand-made hostile headers (`hostile-*`,
//! infra/fuzz/hostile.py) must be refused — and without allocating what they declare, or the
//! process would abort.

use std::path::Path;

#[test]
fn corpora_replay_without_a_panic_and_the_seeds_are_accepted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, target) in llm_fuzz::TARGETS {
        let inputs: Vec<_> = ["corpus", "regressions"].iter().flat_map(|kind| llm_fuzz::inputs(&root.join(kind).join(name))).collect();
        let mut seeds = 0;
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let accepted = std::panic::catch_unwind(|| target(&data)).unwrap_or_else(|_| panic!("{name} panicked on {}", input.display()));
            let file = input.file_name().unwrap().to_string_lossy();
            if file.starts_with("seed-") {
                assert!(accepted, "the {name} target rejects its seed {}", input.display());
                seeds += 1;
            }
            assert!(!(file.starts_with("hostile-") && accepted), "the {name} target accepts {}", input.display());
        }
        assert!(seeds > 0, "no seeds for the {name} target: run infra/fuzz/seeds.sh");
        eprintln!("{name}: {} inputs", inputs.len());
    }
}
