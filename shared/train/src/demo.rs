//! The demo task: a synthetic instruction task whose answers are exact (two-digit addition,
//! reversing and capitalising made-up words, capitals of countries), split so that what is
//! evaluated is never trained on, and the files the demo pipeline (`infra/demo/pipeline.sh`)
//! starts from: pretraining text, chat SFT data, held-out questions, a byte-level tokenizer with a
//! chat template, and the teacher's untrained checkpoint.

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Result, TrainError};
use crate::lora::seeded;
use crate::merge::write_json;

/// Countries and capitals: all are stated in the pretraining text; questions about the last
/// [`HELD_OUT_CAPITALS`] are asked only in the evaluation, so answering them needs what
/// pretraining taught, carried over to the chat format by SFT.
const CAPITALS: [(&str, &str); 72] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Hungary", "Budapest"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Ghana", "Accra"),
    ("Nepal", "Kathmandu"),
    ("Belgium", "Brussels"),
    ("Czechia", "Prague"),
    ("Brazil", "Brasilia"),
    ("Uruguay", "Montevideo"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Jamaica", "Kingston"),
    ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"),
    ("Uganda", "Kampala"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Sudan", "Khartoum"),
    ("Angola", "Luanda"),
    ("Zambia", "Lusaka"),
    ("Mali", "Bamako"),
    ("Syria", "Damascus"),
    ("Jordan", "Amman"),
    // Held out from here on.
    ("Lebanon", "Beirut"),
    ("Qatar", "Doha"),
    ("Oman", "Muscat"),
    ("Afghanistan", "Kabul"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Mongolia", "Ulaanbaatar"),
    ("Philippines", "Manila"),
    ("Cambodia", "Phnom Penh"),
    ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Bulgaria", "Sofia"),
    ("Armenia", "Yerevan"),
    ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"),
    ("Colombia", "Bogota"),
    ("Morocco", "Rabat"),
    ("Senegal", "Dakar"),
];
/// A third of the countries: enough held-out facts that one fact more or less moves the
/// capital task by about 4 points, not 12 as with 8 of 40.
const HELD_OUT_CAPITALS: usize = 24;

/// One question with its one right answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub task: String,
    pub prompt: String,
    pub answer: String,
}

/// The tasks, in the order the evaluation reports them.
pub const TASKS: [&str; 4] = ["add", "reverse", "upper", "capital"];

/// Draws questions of `task` from the training or the held-out side of the split.
fn question(task: &str, rng: &mut StdRng, held_out: bool) -> Question {
    let q = |prompt: String, answer: String| Question { task: task.to_string(), prompt, answer };
    match task {
        "add" => loop {
            let (a, b) = (rng.random_range(0..100u32), rng.random_range(0..100u32));
            if held_out_key(&format!("{a}+{b}")) == held_out {
                return q(format!("What is {a} + {b}?"), (a + b).to_string());
            }
        },
        "reverse" | "upper" => loop {
            let word = made_up_word(rng);
            if held_out_key(&word) == held_out {
                return match task {
                    "reverse" => q(format!("Reverse the word {word}."), word.chars().rev().collect()),
                    _ => q(format!("Write {word} in capitals."), word.to_uppercase()),
                };
            }
        },
        _ => {
            let split = CAPITALS.len() - HELD_OUT_CAPITALS;
            let (country, city) = match held_out {
                true => CAPITALS[rng.random_range(split..CAPITALS.len())],
                false => CAPITALS[rng.random_range(0..split)],
            };
            match rng.random_bool(0.5) {
                true => q(format!("What is the capital of {country}?"), city.to_string()),
                false => q(format!("Which city is the capital of {country}?"), city.to_string()),
            }
        }
    }
}

/// Whether an instance belongs to the held-out side: a fixed hash, so the split does not
/// depend on the seed or on how many examples are drawn.
fn held_out_key(key: &str) -> bool {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash % 10 == 0
}

fn made_up_word(rng: &mut StdRng) -> String {
    let len = rng.random_range(3..=6);
    (0..len).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect()
}

/// Sizes of the generated sets.
#[derive(Debug, Clone)]
pub struct DemoSizes {
    pub pretrain: usize,
    pub sft: usize,
    /// Held-out questions per task.
    pub eval_per_task: usize,
    pub seed: u64,
}

/// The teacher's shape: hidden and MLP sizes are multiples of 256 so that Q4_K and the other
/// K-quants apply (their blocks are 256 wide), as they would on a real Llama.
#[derive(Debug, Clone)]
pub struct TeacherShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Default for TeacherShape {
    fn default() -> Self {
        Self { hidden: 256, intermediate: 512, layers: 5, heads: 4, kv_heads: 2 }
    }
}

/// Writes into `dir`: `pretrain.jsonl` (`{"text"}`: every capital stated, and training-side
/// questions with their answers as plain text), `sft.jsonl` (`{"messages"}`, with a fifth of
/// pretraining lines replayed among them), `sft-eval.jsonl`
/// (held-out chats, for the trainers' eval loss), `eval.jsonl` (held-out [`Question`]s),
/// `tokenizer/` (the demo tokenizer's files) and `teacher-init/`, a Hugging Face checkpoint of
/// `shape` with transformers' initialisation and that tokenizer.
pub fn write_demo(dir: &Path, sizes: &DemoSizes, shape: &TeacherShape) -> Result<()> {
    let mut rng = seeded(sizes.seed);
    let draw = |held_out: bool, rng: &mut StdRng| question(TASKS[rng.random_range(0..TASKS.len())], rng, held_out);

    let mut pretrain = Vec::with_capacity(sizes.pretrain);
    for i in 0..sizes.pretrain {
        let text = match i % 4 {
            // A quarter states facts, both ways round.
            0 => {
                let (country, city) = CAPITALS[rng.random_range(0..CAPITALS.len())];
                match rng.random_bool(0.5) {
                    true => format!("The capital of {country} is {city}."),
                    false => format!("{city} is the capital of {country}."),
                }
            }
            _ => {
                let q = draw(false, &mut rng);
                format!("{} {}", q.prompt, q.answer)
            }
        };
        pretrain.push(json!({ "text": text }));
    }
    let chat = |q: &Question| json!({ "messages": [{ "role": "user", "content": q.prompt }, { "role": "assistant", "content": q.answer }] });
    let mut sft: Vec<_> = (0..sizes.sft).map(|_| chat(&draw(false, &mut rng))).collect();
    let eval: Vec<Question> = TASKS.iter().flat_map(|task| (0..sizes.eval_per_task).map(|_| question(task, &mut rng, true)).collect::<Vec<_>>()).collect();
    // Replay: every fourth chat is followed by a pretraining line, so that SFT keeps what
    // pretraining taught (the held-out capitals are stated only there).
    for (i, line) in pretrain.iter().step_by(4).take(sizes.sft / 4).enumerate() {
        sft.insert(i * 5 + 4, line.clone());
    }
    let sft_eval: Vec<_> = eval.iter().step_by(4).map(chat).collect();

    std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
    write_jsonl(&dir.join("pretrain.jsonl"), &pretrain)?;
    write_jsonl(&dir.join("sft.jsonl"), &sft)?;
    write_jsonl(&dir.join("sft-eval.jsonl"), &sft_eval)?;
    write_jsonl(&dir.join("eval.jsonl"), &eval)?;
    let tokenizer = dir.join("tokenizer");
    write_tokenizer(&tokenizer)?;
    let config = dir.join("teacher-config.json");
    write_json(&config, &teacher_config(shape))?;
    crate::distill::fresh_model(&tokenizer, &config, sizes.seed, &dir.join("teacher-init"))
}

/// Reads held-out questions written by [`write_demo`] (or any JSONL of `task`/`prompt`/`answer`).
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| serde_json::from_str(line).map_err(|e| TrainError::file(path, format!("line {}: {e}", i + 1))))
        .collect()
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| TrainError::file(path, e))?);
    for row in rows {
        serde_json::to_writer(&mut out, row).map_err(|e| TrainError::file(path, e))?;
        out.write_all(b"\n").map_err(|e| TrainError::file(path, e))?;
    }
    out.flush().map_err(|e| TrainError::file(path, e))
}

/// Special tokens after the 256 byte tokens; the template uses the role markers.
const SPECIAL: [&str; 5] = ["<|begin_of_text|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"];
const BOS_ID: usize = 256;
const EOS_ID: usize = 257;
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// A Llama 3 style byte-level BPE tokenizer with no merges: one token per byte (GPT-2's
/// byte-to-character map), so digits and letters are single tokens and every text encodes.
/// llama.cpp reads it as `gpt2` / `llama-bpe`, transformers as `PreTrainedTokenizerFast`.
fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        llm_engine::byte_level_chars().iter().enumerate().map(|(byte, c)| (c.to_string(), json!(byte))).collect();
    let added: Vec<_> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, content)| json!({ "id": 256 + i, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true }))
        .collect();
    let bos = SPECIAL[0];
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": LLAMA3_SPLIT }, "behavior": "Isolated", "invert": false },
            { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
        ]},
        "post_processor": { "type": "TemplateProcessing",
            "single": [{ "SpecialToken": { "id": bos, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
            "pair": [{ "SpecialToken": { "id": bos, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }, { "SpecialToken": { "id": bos, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } }],
            "special_tokens": { bos: { "id": bos, "ids": [BOS_ID], "tokens": [bos] } },
        },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": true, "vocab": vocab, "merges": [] },
    });
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": bos,
            "eos_token": SPECIAL[1],
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": 256,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_json(&dir.join("generation_config.json"), &json!({ "bos_token_id": BOS_ID, "eos_token_id": EOS_ID }))
}

/// Llama 3's pre-tokenizer split (what llama.cpp calls `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn teacher_config(s: &TeacherShape) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256 + SPECIAL.len(),
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden / s.heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_questions_never_appear_in_training() {
        let mut rng = seeded(1);
        for task in TASKS {
            let train: std::collections::HashSet<String> = (0..2000).map(|_| question(task, &mut rng, false).prompt).collect();
            for _ in 0..200 {
                let q = question(task, &mut rng, true);
                assert!(!train.contains(&q.prompt), "{} leaked into training", q.prompt);
            }
        }
    }

    #[test]
    fn answers_are_right() {
        let mut rng = seeded(2);
        let q = question("add", &mut rng, false);
        let (a, b) = q.prompt.trim_start_matches("What is ").trim_end_matches('?').split_once(" + ").unwrap();
        assert_eq!(q.answer, (a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap()).to_string());
        let q = question("reverse", &mut rng, true);
        let word = q.prompt.trim_start_matches("Reverse the word ").trim_end_matches('.');
        assert_eq!(q.answer, word.chars().rev().collect::<String>());
    }
}
